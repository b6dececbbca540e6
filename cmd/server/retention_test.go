package main

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestRetention runs the server with RETENTION=3s: a finished chat, its
// activities and the agent's are deleted by the master (and only by it)
// once they are older than that, the newest activity stays, and a chat
// stays for the whole period. Bad values and one shorter than the
// idempotency window are refused, naming the setting.
func TestRetention(t *testing.T) {
	s := startServer(t, "WORKERS=2", "RETENTION=3s", "IDEMPOTENCY_WINDOW=1s", "SIMULATED_LATENCY=0")
	var first struct {
		ID string `json:"id"`
	}
	if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "old"}, &first); err != nil {
		t.Fatal(err)
	}
	chatStatus := func(id string) int {
		t.Helper()
		resp, err := fresh.Get(s.url("/api/chats/" + id))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if st := chatStatus(first.ID); st != http.StatusOK {
		t.Fatalf("GET /api/chats/%s = %d, want 200", first.ID, st)
	}
	waitFor(t, 20*time.Second, func() error {
		if st := chatStatus(first.ID); st != http.StatusNotFound {
			return fmt.Errorf("GET /api/chats/%s = %d, want 404 once older than the retention", first.ID, st)
		}
		return nil
	})
	// The feed keeps its newest activity; everything of the old chat is gone.
	p, err := s.activities("limit=500")
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range p.Activities {
		if a.ChatID == first.ID && a.ID != p.NextAfter {
			t.Errorf("activity %d of the deleted chat is still in the feed", a.ID)
		}
	}
	if len(p.Activities) == 0 {
		t.Errorf("the feed is empty, want its newest activity kept")
	}
	// A new chat stays through the passes (one a second) of its period, and
	// goes after it: first seen gone no sooner than 3 s after it was sent.
	var recent struct {
		ID string `json:"id"`
	}
	sent := time.Now()
	if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "new"}, &recent); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		if st := chatStatus(recent.ID); st != http.StatusNotFound {
			return fmt.Errorf("GET /api/chats/%s = %d, want 404 once older than the retention", recent.ID, st)
		}
		return nil
	})
	if kept := time.Since(sent); kept < 3*time.Second {
		t.Errorf("chat %s deleted %v after it was sent, within the 3 s retention", recent.ID, kept)
	}
	lines := s.logs.find("deleted chats and activities past the retention period", nil)
	if len(lines) == 0 {
		t.Fatalf("no retention pass logged:\n%s", s.logs)
	}
	for _, l := range lines {
		if fmt.Sprint(l["pid"]) != fmt.Sprint(s.cmd.Process.Pid) && l["pid"] != nil {
			t.Errorf("retention logged by pid %v, want the master %d only", l["pid"], s.cmd.Process.Pid)
		}
		if l["worker"] != nil {
			t.Errorf("retention logged by worker %v, want the master only", l["worker"])
		}
	}

	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"RETENTION=30"}, "RETENTION"},
		{[]string{"RETENTION=-1d"}, "RETENTION"},
		{[]string{"RETENTION=1h"}, "--idempotency-window"},
	} {
		_, err := loadConfig(nil, func(k string) (string, bool) {
			for _, e := range tc.env {
				if name, v, _ := strings.Cut(e, "="); name == k {
					return v, true
				}
			}
			return "", false
		})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want an error naming %s", tc.env, err, tc.want)
		}
	}
	for env, want := range map[string]time.Duration{"off": 0, "30d": 30 * 24 * time.Hour, "36h": 36 * time.Hour} {
		c, err := loadConfig(nil, func(k string) (string, bool) {
			if k == "RETENTION" {
				return env, true
			}
			return "", false
		})
		if err != nil || c.Retention != want {
			t.Errorf("RETENTION=%s: %v %v, want %v", env, c.Retention, err, want)
		}
	}
}
