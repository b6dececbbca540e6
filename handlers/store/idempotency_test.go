package store

import (
	"errors"
	"path/filepath"
	"testing"
)

// An idempotency key names its chat for the window, except a synchronous
// chat that ended without answering its caller: the retry the key exists
// for starts a new chat.

func TestSQLiteUnansweredChatFreesKey(t *testing.T) {
	st := openSQLiteTest(t, filepath.Join(t.TempDir(), "server.db"), "host-a")
	runUnansweredSuite(t, st)
}

func TestPostgresUnansweredChatFreesKey(t *testing.T) {
	db := newPostgresDB(t)
	runUnansweredSuite(t, openPostgresTest(t, db.url, "host-a"))
}

func runUnansweredSuite(t *testing.T, st *Store) {
	ctx := t.Context()
	if err := st.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	start := func(key string, pid int, background bool) (Activity, error) {
		return st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: pid},
			Background: background, IdemKey: key, IdemHash: "h"})
	}
	for _, tc := range []struct {
		name       string
		background bool
		end        func(id string, pid int) error // nil: still running
		free       bool
	}{
		{name: "running"},
		{name: "completed", end: func(id string, _ int) error {
			_, err := st.EndChat(ctx, id, Outcome{Status: ChatCompleted, Reply: "r"})
			return err
		}},
		{name: "cancelled on request", end: func(id string, _ int) error {
			_, err := st.EndChat(ctx, id, Outcome{Status: ChatCancelled, Data: map[string]any{"reason": "cancel_requested"}})
			return err
		}},
		{name: "failed upstream", end: func(id string, _ int) error {
			_, err := st.EndChat(ctx, id, Outcome{Status: ChatFailed, Data: map[string]any{"reason": "upstream_error", "status": 502}})
			return err
		}},
		{name: "client gone", free: true, end: func(id string, _ int) error {
			_, err := st.EndChat(ctx, id, Outcome{Status: ChatCancelled, Data: map[string]any{"reason": "client_disconnected"}})
			return err
		}},
		{name: "worker died", free: true, end: func(_ string, pid int) error {
			_, err := st.FailOrphanedChats(ctx, pid, "worker_died")
			return err
		}},
		{name: "background, failed for good", background: true, end: func(id string, pid int) error {
			c, err := st.BeginAttempt(ctx, id, Origin{Worker: 1, PID: pid})
			if err == nil {
				_, err = st.EndChat(ctx, id, Outcome{Status: ChatFailed, Attempt: c.Attempts, Data: map[string]any{"reason": "worker_died"}})
			}
			return err
		}},
	} {
		key, pid := "key "+tc.name, 1000+len(tc.name)
		first, err := start(key, pid, tc.background)
		if err != nil {
			t.Fatalf("%s: StartChat() = %v", tc.name, err)
		}
		if tc.end != nil {
			if err := tc.end(first.ChatID, pid); err != nil {
				t.Fatalf("%s: end the chat: %v", tc.name, err)
			}
		}
		again, err := start(key, pid+1, tc.background)
		dup, isDup := errors.AsType[*DuplicateError](err)
		switch {
		case tc.free && (err != nil || again.ChatID == first.ChatID):
			t.Errorf("%s: StartChat(same key) = %+v, %v; want a new chat", tc.name, again, err)
		case !tc.free && (!isDup || dup.ChatID != first.ChatID):
			t.Errorf("%s: StartChat(same key) = %+v, %v; want a DuplicateError naming %s", tc.name, again, err, first.ChatID)
		}
		if tc.free {
			// The key now names the new chat.
			if _, err := start(key, pid+2, tc.background); !errors.Is(err, ErrDuplicate) {
				t.Errorf("%s: StartChat(same key, third time) = %v, want ErrDuplicate", tc.name, err)
			}
		}
	}
}
