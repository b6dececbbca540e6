package store

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// Background chats run through River on both backends: the job is inserted
// with the chat, a runner started on another handle (as another worker
// process would) runs it, a dead process's chats are handed back at once,
// cancellation reaches the job, idempotency keys name one chat.

func TestSQLiteBackgroundChats(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "server.db")
	runBackgroundSuite(t, func(t *testing.T, host string) *Store { return openSQLiteTest(t, path, host) })
}

func TestPostgresBackgroundChats(t *testing.T) {
	db := newPostgresDB(t)
	runBackgroundSuite(t, func(t *testing.T, host string) *Store { return openPostgresTest(t, db.url, host) })
}

func runBackgroundSuite(t *testing.T, open func(t *testing.T, host string) *Store) {
	ctx := t.Context()
	st := open(t, "host-a")
	if err := st.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	by := Origin{Worker: 1, PID: 100}

	// The job is in the chat's transaction: a refused chat leaves no job.
	if _, err := st.StartChat(ctx, Chat{AgentID: "nobody", Message: "m", Origin: by, Background: true}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("StartChat(background, unknown agent) = %v, want ErrNotFound", err)
	}
	if n := countJobs(t, st); n != 0 {
		t.Fatalf("river jobs after a refused chat = %d, want 0", n)
	}

	// Idempotency: same key and hash names the first chat; another hash is
	// refused; keys are free again after the window (not tested: 24 h).
	first, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "once", Origin: by, Background: true, IdemKey: "k1", IdemHash: "h1"})
	if err != nil || first.Type != "chat.queued" {
		t.Fatalf("StartChat(background) = %+v, %v, want a chat.queued activity", first, err)
	}
	_, err = st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "once", Origin: by, Background: true, IdemKey: "k1", IdemHash: "h1"})
	if dup, ok := errors.AsType[*DuplicateError](err); !ok || dup.ChatID != first.ChatID || !errors.Is(err, ErrDuplicate) {
		t.Fatalf("StartChat(same key, same request) = %v, want a DuplicateError naming %s", err, first.ChatID)
	}
	if _, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "other", Origin: by, IdemKey: "k1", IdemHash: "h2"}); !errors.Is(err, ErrKeyReused) {
		t.Fatalf("StartChat(same key, other request) = %v, want ErrKeyReused", err)
	}
	if n := countJobs(t, st); n != 1 {
		t.Fatalf("river jobs = %d, want 1 (one per accepted background chat)", n)
	}

	// The queue bound counts queued chats.
	if _, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "full", Origin: by, Background: true, QueueMax: 1}); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("StartChat(queue of 1 holding 1) = %v, want ErrQueueFull", err)
	}

	// Cancelling a queued chat cancels its job.
	cq, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "cancel me", Origin: by, Background: true})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	if _, err := st.EndChat(ctx, cq.ChatID, Outcome{Status: ChatCancelled, Data: map[string]any{"reason": "test"}}); err != nil {
		t.Fatalf("EndChat(queued, cancelled) = %v", err)
	}
	if state := jobState(t, st, cq.ChatID); state != "cancelled" {
		t.Fatalf("job of a cancelled queued chat is %q, want cancelled", state)
	}

	// A runner on another handle runs the queued chat once.
	worker := open(t, "host-a")
	var mu sync.Mutex
	runs := map[string]int{}
	runner, err := worker.RunChats(ctx, RunConfig{Run: func(ctx context.Context, id, _ string) error {
		mu.Lock()
		runs[id]++
		mu.Unlock()
		c, err := worker.BeginAttempt(ctx, id, Origin{Worker: 2, PID: 200})
		if err != nil {
			return err
		}
		if c.Message == "retry later, die" {
			// Handed back with an upstream's Retry-After, then the
			// process dies before River hears of it.
			if _, err := worker.RequeueChat(ctx, id, c.Attempts, Requeue{Reason: "upstream_429", After: time.Hour}); err != nil {
				return err
			}
			<-ctx.Done()
			return ctx.Err()
		}
		if c.Message == "die" {
			<-ctx.Done() // stands in for a process that dies mid-chat
			return ctx.Err()
		}
		_, err = worker.EndChat(ctx, id, Outcome{Status: ChatCompleted, Reply: "re: " + c.Message, Attempt: c.Attempts})
		return err
	}})
	if err != nil {
		t.Fatalf("RunChats() = %v", err)
	}
	t.Cleanup(func() { runner.Stop(context.Background()) })
	waitFor(t, 10*time.Second, func() error {
		c, err := st.ChatByID(ctx, first.ChatID)
		if err != nil || c.Status != ChatCompleted || c.Reply != "re: once" || c.Attempts != 1 {
			return fmt.Errorf("chat = %+v, %v, want completed with reply %q after 1 attempt", c, err, "re: once")
		}
		return nil
	})
	mu.Lock()
	if runs[first.ChatID] != 1 || runs[cq.ChatID] != 0 {
		t.Fatalf("runs = %v, want the queued chat once and the cancelled one never", runs)
	}
	mu.Unlock()

	// A chat whose process "died": handed back at once, available again,
	// then failed once it has had its attempts.
	die, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "die", Origin: by, Background: true})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	waitRunning := func(attempts int) {
		waitFor(t, 10*time.Second, func() error {
			c, err := st.ChatByID(ctx, die.ChatID)
			if err != nil || c.Status != ChatRunning || c.Attempts != attempts || c.PID != 200 {
				return fmt.Errorf("chat = %+v, %v, want running attempt %d in pid 200", c, err, attempts)
			}
			return nil
		})
	}
	waitRunning(1)
	requeued, failed, err := st.HandBackChats(ctx, 200, "worker_died", 2)
	if err != nil || requeued != 1 || failed != 0 {
		t.Fatalf("HandBackChats(200) = %d, %d, %v, want 1 requeued", requeued, failed, err)
	}
	// The runner still holds the first attempt here (nothing killed it);
	// River makes the job available and another fetch takes it.
	waitRunning(2)
	requeued, failed, err = st.HandBackChats(ctx, 200, "worker_died", 2)
	if err != nil || requeued != 0 || failed != 1 {
		t.Fatalf("second HandBackChats(200) = %d, %d, %v, want 1 failed", requeued, failed, err)
	}
	c, err := st.ChatByID(ctx, die.ChatID)
	if err != nil || c.Status != ChatFailed || c.Attempts != 2 {
		t.Fatalf("chat after its last attempt died = %+v, %v, want failed after 2 attempts", c, err)
	}
	acts, err := st.Activities(ctx, Filter{Type: "chat.retried"})
	if err != nil || len(acts) != 1 || acts[0].ChatID != die.ChatID || acts[0].Data["reason"] != "worker_died" {
		t.Fatalf("chat.retried activities = %+v, %v, want one for %s, reason worker_died", acts, err, die.ChatID)
	}

	// A chat the dead process had handed back with a wait: its job, still
	// "running" for River, is rescued for the time the process gave.
	later, err := st.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "retry later, die", Origin: by, Background: true})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	waitFor(t, 10*time.Second, func() error {
		c, err := st.ChatByID(ctx, later.ChatID)
		if err != nil || c.Status != ChatQueued || c.Attempts != 1 {
			return fmt.Errorf("chat = %+v, %v, want queued again after attempt 1", c, err)
		}
		return nil
	})
	if _, _, err := st.HandBackChats(ctx, 200, "worker_died", 2); err != nil {
		t.Fatalf("HandBackChats(200) = %v", err)
	}
	var state string
	var at time.Time
	if err := st.db.QueryRowContext(ctx, st.q(`SELECT river_job.state, river_job.scheduled_at FROM river_job JOIN chats ON chats.job_id = river_job.id WHERE chats.id = ?`), later.ChatID).Scan(&state, &at); err != nil {
		t.Fatal(err)
	}
	if wait := time.Until(at); state != "available" || wait < 59*time.Minute {
		t.Fatalf("job of a chat handed back for an hour, then orphaned = %s in %v, want available in about an hour", state, wait.Round(time.Second))
	}

	// Deltas: appended in batches, read back after a cursor.
	if err := st.AppendChatEvents(ctx, []ChatDelta{{first.ChatID, 1, "a"}, {die.ChatID, 1, "x"}, {first.ChatID, 1, "b"}}); err != nil {
		t.Fatalf("AppendChatEvents() = %v", err)
	}
	evs, err := st.ChatEvents(ctx, first.ChatID, 1, 10)
	if err != nil || len(evs) != 1 || evs[0].Seq != 2 || evs[0].Text != "b" {
		t.Fatalf("ChatEvents(after 1) = %+v, %v, want seq 2 %q", evs, err, "b")
	}

	q, err := st.ChatQueueStats(ctx)
	if err != nil || q.Queued != 1 || q.Retried != 2 || q.OldestQueued.IsZero() {
		t.Fatalf("ChatQueueStats() = %+v, %v, want the chat that waits an hour queued, and 2 retries", q, err)
	}
}

func countJobs(t *testing.T, st *Store) int {
	t.Helper()
	var n int
	if err := st.db.QueryRowContext(t.Context(), `SELECT count(*) FROM river_job`).Scan(&n); err != nil {
		t.Fatalf("count river jobs: %v", err)
	}
	return n
}

func jobState(t *testing.T, st *Store, chatID string) string {
	t.Helper()
	var state string
	err := st.db.QueryRowContext(t.Context(), st.q(`SELECT river_job.state FROM river_job JOIN chats ON chats.job_id = river_job.id WHERE chats.id = ?`), chatID).Scan(&state)
	if err != nil {
		t.Fatalf("job state of %s: %v", chatID, err)
	}
	return state
}

// TestRequeueChatRetryAt: a chat handed back with a wait keeps the time of
// its next attempt as retry_at in its activity and detail; one that has
// had its last attempt fails without one.
func TestRequeueChatRetryAt(t *testing.T) {
	ctx := t.Context()
	s := newMigrated(t)
	act, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m", Background: true})
	if err != nil {
		t.Fatal(err)
	}
	by := Origin{Worker: 1, PID: 1}
	retryAt := func(detail string) (time.Time, bool) {
		t.Helper()
		var d map[string]any
		if err := json.Unmarshal([]byte(detail), &d); err != nil {
			t.Fatalf("detail %q: %v", detail, err)
		}
		v, ok := d["retry_at"].(string)
		if !ok {
			return time.Time{}, false
		}
		at, err := time.Parse(time.RFC3339Nano, v)
		if err != nil {
			t.Fatalf("retry_at %q: %v", v, err)
		}
		return at, true
	}
	for _, step := range []struct {
		attempt int
		status  string
		retry   bool
	}{{1, ChatQueued, true}, {2, ChatFailed, false}} {
		if _, err := s.BeginAttempt(ctx, act.ChatID, by); err != nil {
			t.Fatalf("BeginAttempt(%d) = %v", step.attempt, err)
		}
		before := time.Now()
		requeued, err := s.RequeueChat(ctx, act.ChatID, step.attempt, Requeue{Reason: "upstream_429", MaxAttempts: 2, After: time.Minute})
		if err != nil || requeued != step.retry {
			t.Fatalf("RequeueChat(attempt %d) = %v, %v, want %v", step.attempt, requeued, err, step.retry)
		}
		c, err := s.ChatByID(ctx, act.ChatID)
		if err != nil || c.Status != step.status {
			t.Fatalf("chat after attempt %d = %+v, %v, want %s", step.attempt, c, err, step.status)
		}
		at, ok := retryAt(c.Detail)
		switch {
		case step.retry && (!ok || at.Before(before.Add(time.Minute-time.Second)) || at.After(time.Now().Add(time.Minute))):
			t.Errorf("attempt %d: retry_at %v (present %v), want a minute after %v", step.attempt, at, ok, before)
		case !step.retry && ok:
			t.Errorf("attempt %d failed the chat, yet its detail has retry_at %v", step.attempt, at)
		}
		acts, err := s.Activities(ctx, Filter{AgentID: DefaultAgentID, Limit: MaxLimit})
		if err != nil {
			t.Fatal(err)
		}
		last := acts[len(acts)-1]
		if _, ok := last.Data["retry_at"]; ok != step.retry {
			t.Errorf("attempt %d: %s activity data %v, want retry_at %v", step.attempt, last.Type, last.Data, step.retry)
		}
	}
}
