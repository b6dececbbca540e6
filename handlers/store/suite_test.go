package store

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// backend is what the behaviour suite needs from a store. It is written
// once, against this interface, so the PostgreSQL store runs the same suite.
type backend interface {
	Migrate(ctx context.Context) error
	CreateAgent(ctx context.Context, a Agent, by Origin) (Agent, error)
	Agent(ctx context.Context, id string) (Agent, error)
	Agents(ctx context.Context, p AgentPage) ([]Agent, string, error)
	DeleteAgent(ctx context.Context, id string, by Origin) error
	StartChat(ctx context.Context, c Chat) (Activity, error)
	FinishChat(ctx context.Context, chatID, status string, data map[string]any) (Activity, error)
	FailOrphanedChats(ctx context.Context, pid int, reason string) (int, error)
	FailAllStarted(ctx context.Context, reason string) (int, error)
	ClaimInstance(ctx context.Context) error
	Activities(ctx context.Context, f Filter) ([]Activity, error)
	LastActivityID(ctx context.Context) (int64, error)
	WaitActivity(ctx context.Context, after int64) error
	Close() error
}

var _ backend = (*Store)(nil)

// opener opens one more independent handle (its own connections, its own
// poller: as good as another process) on one database, for host. Handles
// close when the test ends.
type opener func(t *testing.T, host string) backend

// newDatabase creates an empty database and returns its opener.
type newDatabase func(t *testing.T) opener

func TestSQLiteSuite(t *testing.T) {
	runSuite(t, func(t *testing.T) opener {
		path := filepath.Join(t.TempDir(), "data", "server.db")
		return func(t *testing.T, host string) backend { return openSQLiteTest(t, path, host) }
	})
}

func runSuite(t *testing.T, newDB newDatabase) {
	// migrated returns a migrated database's first handle and its opener.
	migrated := func(t *testing.T) (backend, opener) {
		t.Helper()
		open := newDB(t)
		b := open(t, "host-a")
		if err := b.Migrate(t.Context()); err != nil {
			t.Fatalf("Migrate() = %v", err)
		}
		return b, open
	}
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, b backend, open opener)
	}{
		{"DefaultAgent", suiteDefaultAgent},
		{"MigrateTwice", suiteMigrateTwice},
		{"Agents", suiteAgents},
		{"Activities", suiteActivities},
		{"ActivitiesLimit", suiteActivitiesLimit},
		{"ChatLifecycle", suiteChatLifecycle},
		{"ChatFinishesOnce", suiteChatFinishesOnce},
		{"FailOrphanedChats", suiteFailOrphaned},
		{"ClaimInstance", suiteClaimInstance},
		{"WaitActivity", suiteWaitActivity},
		{"WaitActivityManyWaiters", suiteManyWaiters},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, open := migrated(t)
			tc.run(t, b, open)
		})
	}
}

var hexID = regexp.MustCompile(`^[0-9a-f]{16}$`)

func suiteDefaultAgent(t *testing.T, b backend, _ opener) {
	ctx := t.Context()
	agents, _, err := b.Agents(ctx, AgentPage{})
	if err != nil {
		t.Fatalf("Agents() = %v", err)
	}
	if len(agents) != 1 || agents[0].ID != DefaultAgentID || agents[0].Name != "Default agent" || agents[0].SystemPrompt == "" {
		t.Fatalf("Agents() after Migrate = %+v, want only the default agent", agents)
	}
	acts, err := b.Activities(ctx, Filter{})
	if err != nil {
		t.Fatalf("Activities() = %v", err)
	}
	if len(acts) != 1 || acts[0].Type != "agent.created" || acts[0].AgentID != DefaultAgentID {
		t.Fatalf("Activities() after Migrate = %+v, want one agent.created for %q", acts, DefaultAgentID)
	}
}

func suiteMigrateTwice(t *testing.T, b backend, open opener) {
	ctx := t.Context()
	if err := b.Migrate(ctx); err != nil {
		t.Fatalf("second Migrate() = %v", err)
	}
	if err := open(t, "host-b").Migrate(ctx); err != nil {
		t.Fatalf("Migrate() from another handle = %v", err)
	}
	agents, _, _ := b.Agents(ctx, AgentPage{})
	acts, _ := b.Activities(ctx, Filter{})
	if len(agents) != 1 || len(acts) != 1 {
		t.Fatalf("after three Migrates: %d agents, %d activities, want 1 and 1", len(agents), len(acts))
	}
}

func suiteAgents(t *testing.T, b backend, open opener) {
	ctx := t.Context()
	by := Origin{Worker: 2, PID: 4242}
	a, err := b.CreateAgent(ctx, Agent{Name: "Writer", SystemPrompt: "Write.", Model: "m1"}, by)
	if err != nil {
		t.Fatalf("CreateAgent() = %v", err)
	}
	if !hexID.MatchString(a.ID) || a.CreatedAt.IsZero() || a.CreatedAt.Location() != time.UTC {
		t.Fatalf("CreateAgent() = %+v, want a 16-hex id and a UTC creation time", a)
	}
	named, err := b.CreateAgent(ctx, Agent{ID: "named", Name: "Named"}, by)
	if err != nil || named.ID != "named" {
		t.Fatalf("CreateAgent(named) = %+v, %v", named, err)
	}
	if _, err := b.CreateAgent(ctx, Agent{ID: "named", Name: "Again"}, by); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateAgent(named) again = %v, want ErrExists", err)
	}

	// Another handle sees the same agent, time included.
	other := open(t, "host-b")
	got, err := other.Agent(ctx, a.ID)
	if err != nil {
		t.Fatalf("Agent(%s) = %v", a.ID, err)
	}
	if got.ID != a.ID || got.Name != a.Name || got.SystemPrompt != a.SystemPrompt || got.Model != a.Model || !got.CreatedAt.Equal(a.CreatedAt) {
		t.Fatalf("Agent(%s) = %+v, want %+v", a.ID, got, a)
	}
	agents, _, err := b.Agents(ctx, AgentPage{})
	if err != nil {
		t.Fatalf("Agents() = %v", err)
	}
	if ids := agentIDs(agents); fmt.Sprint(ids) != fmt.Sprint([]string{DefaultAgentID, a.ID, "named"}) {
		t.Fatalf("Agents() ids = %v, want default, %s, named (creation order)", ids, a.ID)
	}

	if err := b.DeleteAgent(ctx, a.ID, by); err != nil {
		t.Fatalf("DeleteAgent(%s) = %v", a.ID, err)
	}
	if _, err := b.Agent(ctx, a.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Agent(%s) after delete = %v, want ErrNotFound", a.ID, err)
	}
	if err := b.DeleteAgent(ctx, a.ID, by); !errors.Is(err, ErrNotFound) {
		t.Fatalf("DeleteAgent(%s) twice = %v, want ErrNotFound", a.ID, err)
	}
	acts, err := b.Activities(ctx, Filter{AgentID: a.ID})
	if err != nil {
		t.Fatalf("Activities() = %v", err)
	}
	if len(acts) != 2 || acts[0].Type != "agent.created" || acts[1].Type != "agent.deleted" ||
		acts[1].Worker != by.Worker || acts[1].PID != by.PID || acts[1].Data["name"] != "Writer" {
		t.Fatalf("Activities(agent %s) = %+v, want agent.created then agent.deleted by %+v", a.ID, acts, by)
	}
}

func agentIDs(agents []Agent) []string {
	ids := make([]string, len(agents))
	for i, a := range agents {
		ids[i] = a.ID
	}
	return ids
}

func suiteActivities(t *testing.T, b backend, _ opener) {
	ctx := t.Context()
	by := Origin{Worker: 1, PID: 100}
	for _, id := range []string{"a1", "a2"} {
		if _, err := b.CreateAgent(ctx, Agent{ID: id, Name: id}, by); err != nil {
			t.Fatalf("CreateAgent(%s) = %v", id, err)
		}
	}
	for i := range 3 {
		agent := []string{"a1", "a2", "a1"}[i]
		st, err := b.StartChat(ctx, Chat{AgentID: agent, Message: "hi", Origin: by})
		if err != nil {
			t.Fatalf("StartChat() = %v", err)
		}
		if _, err := b.FinishChat(ctx, st.ChatID, ChatCompleted, map[string]any{"n": i}); err != nil {
			t.Fatalf("FinishChat() = %v", err)
		}
	}
	all, err := b.Activities(ctx, Filter{})
	if err != nil {
		t.Fatalf("Activities() = %v", err)
	}
	// default, a1, a2 created; 3 x (started, completed).
	if len(all) != 9 {
		t.Fatalf("Activities() = %d entries, want 9: %+v", len(all), all)
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID <= all[i-1].ID {
			t.Fatalf("Activities() ids %d then %d, want strictly increasing", all[i-1].ID, all[i].ID)
		}
	}
	last, err := b.LastActivityID(ctx)
	if err != nil || last != all[8].ID {
		t.Fatalf("LastActivityID() = %d, %v, want %d", last, err, all[8].ID)
	}
	if got := all[8].Data["n"]; got != float64(2) {
		t.Errorf("last activity data n = %v (%T), want 2", got, got)
	}

	for _, tc := range []struct {
		f    Filter
		want []int64 // indexes into all
	}{
		{Filter{After: all[3].ID}, []int64{4, 5, 6, 7, 8}},
		{Filter{After: all[3].ID, Limit: 2}, []int64{4, 5}},
		{Filter{AgentID: "a2"}, []int64{2, 5, 6}},
		{Filter{Type: "chat.completed"}, []int64{4, 6, 8}},
		{Filter{AgentID: "a1", Type: "chat.started", After: all[3].ID}, []int64{7}},
		{Filter{After: last}, nil},
		{Filter{Limit: -5}, []int64{0, 1, 2, 3, 4, 5, 6, 7, 8}},
	} {
		got, err := b.Activities(ctx, tc.f)
		if err != nil {
			t.Fatalf("Activities(%+v) = %v", tc.f, err)
		}
		var want []int64
		for _, i := range tc.want {
			want = append(want, all[i].ID)
		}
		if fmt.Sprint(activityIDs(got)) != fmt.Sprint(want) {
			t.Errorf("Activities(%+v) ids = %v, want %v", tc.f, activityIDs(got), want)
		}
	}
}

func activityIDs(acts []Activity) []int64 {
	var ids []int64
	for _, a := range acts {
		ids = append(ids, a.ID)
	}
	return ids
}

func suiteActivitiesLimit(t *testing.T, b backend, _ opener) {
	ctx := t.Context()
	by := Origin{Worker: 1, PID: 100}
	for i := range MaxLimit + 5 {
		if _, err := b.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: fmt.Sprint(i), Origin: by}); err != nil {
			t.Fatalf("StartChat() = %v", err)
		}
	}
	for _, tc := range []struct{ limit, want int }{{0, DefaultLimit}, {MaxLimit + 100, MaxLimit}, {7, 7}} {
		got, err := b.Activities(ctx, Filter{Limit: tc.limit})
		if err != nil || len(got) != tc.want {
			t.Errorf("Activities(Limit %d) = %d entries, %v, want %d", tc.limit, len(got), err, tc.want)
		}
	}
}

func suiteChatLifecycle(t *testing.T, b backend, _ opener) {
	ctx := t.Context()
	by := Origin{Worker: 3, PID: 300}
	if _, err := b.StartChat(ctx, Chat{AgentID: "nobody", Message: "hi", Origin: by}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("StartChat(unknown agent) = %v, want ErrNotFound", err)
	}
	st, err := b.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "hello", Origin: by})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	if st.Type != "chat.started" || !hexID.MatchString(st.ChatID) || st.AgentID != DefaultAgentID || st.Worker != 3 || st.PID != 300 || st.ID == 0 {
		t.Fatalf("StartChat() = %+v, want chat.started with a generated chat id, by worker 3 pid 300", st)
	}
	if _, err := b.StartChat(ctx, Chat{ID: st.ChatID, AgentID: DefaultAgentID, Origin: by}); !errors.Is(err, ErrExists) {
		t.Fatalf("StartChat(same id) = %v, want ErrExists", err)
	}
	if _, err := b.FinishChat(ctx, st.ChatID, "done", nil); err == nil || errors.Is(err, ErrChatFinished) {
		t.Fatalf("FinishChat(status done) = %v, want an invalid-status error", err)
	}
	if _, err := b.FinishChat(ctx, "nope", ChatCompleted, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("FinishChat(unknown) = %v, want ErrNotFound", err)
	}
	for _, status := range []string{ChatCompleted, ChatFailed, ChatCancelled} {
		c, err := b.StartChat(ctx, Chat{ID: "c-" + status, AgentID: DefaultAgentID, Message: "m", Origin: by})
		if err != nil {
			t.Fatalf("StartChat() = %v", err)
		}
		fin, err := b.FinishChat(ctx, c.ChatID, status, map[string]any{"reply": "ok"})
		if err != nil {
			t.Fatalf("FinishChat(%s) = %v", status, err)
		}
		if fin.Type != "chat."+status || fin.ChatID != c.ChatID || fin.AgentID != DefaultAgentID || fin.Worker != 3 || fin.PID != 300 || fin.ID <= c.ID {
			t.Fatalf("FinishChat(%s) = %+v, want chat.%s after %d by the chat's worker", status, fin, status, c.ID)
		}
		got, err := b.Activities(ctx, Filter{After: fin.ID - 1, Limit: 1})
		if err != nil || len(got) != 1 || got[0].Data["reply"] != "ok" || !got[0].Time.Equal(fin.Time) {
			t.Fatalf("Activities() at %d = %+v, %v, want the finish with its data", fin.ID, got, err)
		}
	}
}

func suiteChatFinishesOnce(t *testing.T, b backend, open opener) {
	ctx := t.Context()
	other := open(t, "host-a")
	st, err := b.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "race", Origin: Origin{Worker: 1, PID: 1}})
	if err != nil {
		t.Fatalf("StartChat() = %v", err)
	}
	const n = 16
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for i := range n {
		h := []backend{b, other}[i%2]
		status := []string{ChatCompleted, ChatFailed, ChatCancelled}[i%3]
		wg.Go(func() {
			_, err := h.FinishChat(ctx, st.ChatID, status, nil)
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	won := 0
	for err := range errs {
		switch {
		case err == nil:
			won++
		case !errors.Is(err, ErrChatFinished):
			t.Errorf("FinishChat() = %v, want nil or ErrChatFinished", err)
		}
	}
	if won != 1 {
		t.Fatalf("%d of %d concurrent FinishChat calls succeeded, want exactly 1", won, n)
	}
	acts, _ := b.Activities(ctx, Filter{After: st.ID})
	if len(acts) != 1 {
		t.Fatalf("activities after chat.started = %+v, want one finish", acts)
	}
}

func suiteFailOrphaned(t *testing.T, a backend, open opener) {
	ctx := t.Context()
	b := open(t, "host-b")
	start := func(h backend, id string, pid int) {
		t.Helper()
		if _, err := h.StartChat(ctx, Chat{ID: id, AgentID: DefaultAgentID, Message: "m", Origin: Origin{Worker: 1, PID: pid}}); err != nil {
			t.Fatalf("StartChat(%s) = %v", id, err)
		}
	}
	start(a, "a-100-x", 100)
	start(a, "a-100-y", 100)
	start(a, "a-200", 200)
	start(b, "b-100", 100) // same pid, other host: not ours to fail
	start(a, "a-100-done", 100)
	if _, err := a.FinishChat(ctx, "a-100-done", ChatCompleted, nil); err != nil {
		t.Fatalf("FinishChat() = %v", err)
	}
	last, _ := a.LastActivityID(ctx)

	n, err := a.FailOrphanedChats(ctx, 100, "worker 1 exited: signal: killed")
	if err != nil || n != 2 {
		t.Fatalf("FailOrphanedChats(100) = %d, %v, want 2", n, err)
	}
	acts, _ := a.Activities(ctx, Filter{After: last})
	if len(acts) != 2 {
		t.Fatalf("activities after FailOrphanedChats = %+v, want 2", acts)
	}
	for i, act := range acts {
		want := []string{"a-100-x", "a-100-y"}[i] // oldest chat first
		if act.Type != "chat.failed" || act.ChatID != want || act.PID != 100 || act.Data["reason"] != "worker 1 exited: signal: killed" {
			t.Errorf("activity %d = %+v, want chat.failed of %s, pid 100, with the reason", i, act, want)
		}
	}
	if _, err := a.FinishChat(ctx, "a-100-x", ChatCompleted, nil); !errors.Is(err, ErrChatFinished) {
		t.Errorf("FinishChat(orphan) = %v, want ErrChatFinished", err)
	}
	if n, err := a.FailOrphanedChats(ctx, 100, "again"); err != nil || n != 0 {
		t.Errorf("FailOrphanedChats(100) again = %d, %v, want 0", n, err)
	}

	if n, err := a.FailAllStarted(ctx, "previous run"); err != nil || n != 1 {
		t.Fatalf("FailAllStarted() on host-a = %d, %v, want 1 (a-200)", n, err)
	}
	if _, err := b.FinishChat(ctx, "b-100", ChatCompleted, nil); err != nil {
		t.Fatalf("FinishChat(b-100) = %v, want host-b's chat untouched", err)
	}
	if n, err := b.FailAllStarted(ctx, "previous run"); err != nil || n != 0 {
		t.Fatalf("FailAllStarted() on host-b = %d, %v, want 0", n, err)
	}
}

// suiteClaimInstance: one claimant per host name at a time, any number of
// host names, and a claim ends with its handle.
func suiteClaimInstance(t *testing.T, a backend, open opener) {
	ctx := t.Context()
	if err := a.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-a) = %v", err)
	}
	if err := a.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-a) again on the same handle = %v, want nil", err)
	}
	second := open(t, "host-a")
	err := second.ClaimInstance(ctx)
	if !errors.Is(err, ErrInstanceInUse) || !strings.Contains(err.Error(), `"host-a"`) || !strings.Contains(err.Error(), "--instance-id") {
		t.Fatalf("ClaimInstance(host-a) from a second handle = %v, want ErrInstanceInUse naming the id and the flag", err)
	}
	t.Logf("second claimant: %v", err)
	if err := open(t, "host-b").ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-b) = %v, want another host name free", err)
	}
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if err := second.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-a) after the first handle closed = %v", err)
	}
}

func suiteWaitActivity(t *testing.T, a backend, open opener) {
	ctx := t.Context()
	b := open(t, "host-b")
	last, err := a.LastActivityID(ctx)
	if err != nil {
		t.Fatalf("LastActivityID() = %v", err)
	}

	// A newer activity exists: a fresh handle, which has seen nothing yet,
	// returns without waiting for a write.
	fresh := open(t, "host-c")
	t0 := time.Now()
	if err := fresh.WaitActivity(ctxTimeout(t, 5*time.Second), last-1); err != nil {
		t.Fatalf("WaitActivity(%d) with %d present = %v", last-1, last, err)
	}
	t.Logf("WaitActivity with a newer activity present returned in %v", time.Since(t0))

	// Nothing newer: the deadline ends the wait with the context's error.
	if err := a.WaitActivity(ctxTimeout(t, 100*time.Millisecond), last); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("WaitActivity(%d) with nothing newer = %v, want context.DeadlineExceeded", last, err)
	}

	// A write through another handle wakes the waiter.
	woke := make(chan error, 1)
	var wokeAt time.Time
	go func() {
		err := a.WaitActivity(ctxTimeout(t, 5*time.Second), last)
		wokeAt = time.Now()
		woke <- err
	}()
	if s, ok := a.(*Store); ok {
		waitFor(t, 2*time.Second, func() error {
			if !s.feed.hasWaiters() {
				return errors.New("WaitActivity has not started waiting")
			}
			return nil
		})
	}
	if _, err := b.CreateAgent(ctx, Agent{Name: "wake"}, Origin{Worker: 2, PID: 2}); err != nil {
		t.Fatalf("CreateAgent() = %v", err)
	}
	committed := time.Now()
	select {
	case err := <-woke:
		if err != nil {
			t.Fatalf("WaitActivity(%d) after another handle's write = %v", last, err)
		}
		t.Logf("WaitActivity woke %v after another handle's commit", wokeAt.Sub(committed))
	case <-time.After(3 * time.Second):
		t.Fatalf("WaitActivity(%d) still waiting 3s after another handle's write", last)
	}

	// Close ends waits.
	c := open(t, "host-c")
	closed := make(chan error, 1)
	go func() { closed <- c.WaitActivity(ctxTimeout(t, 5*time.Second), last+100) }()
	if err := c.Close(); err != nil {
		t.Fatalf("Close() = %v", err)
	}
	if err := <-closed; !errors.Is(err, ErrClosed) {
		t.Fatalf("WaitActivity() across Close = %v, want ErrClosed", err)
	}
}

func suiteManyWaiters(t *testing.T, a backend, open opener) {
	ctx := t.Context()
	b := open(t, "host-b")
	last, _ := a.LastActivityID(ctx)
	const n = 2000
	errs := make(chan error, n)
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() { errs <- a.WaitActivity(ctxTimeout(t, 10*time.Second), last) })
	}
	if _, err := b.CreateAgent(ctx, Agent{Name: "wake all"}, Origin{}); err != nil {
		t.Fatalf("CreateAgent() = %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("WaitActivity() of one of %d waiters = %v", n, err)
		}
	}
}
