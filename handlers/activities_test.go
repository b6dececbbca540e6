package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/corralhq/corral/handlers/store"
)

// spyStore is the real store, reporting each WaitActivity call on waiting
// so that a test knows a long-poll is parked before it writes.
type spyStore struct {
	*store.Store
	waiting chan int64
}

func (s *spyStore) WaitActivity(ctx context.Context, after int64) error {
	select {
	case s.waiting <- after:
	default:
	}
	return s.Store.WaitActivity(ctx, after)
}

// racyStore is the real store with a write by another store slipped in
// just before the first LastActivityID call: the moment when a reader that
// queried first would count that write as seen without having read it.
type racyStore struct {
	*store.Store
	other *store.Store
	once  sync.Once
	wrote chan string // the agent id written
}

func (s *racyStore) LastActivityID(ctx context.Context) (int64, error) {
	s.once.Do(func() {
		a, err := s.other.CreateAgent(ctx, store.Agent{Name: "slipped in", SystemPrompt: "p"}, store.Origin{})
		if err != nil {
			a.ID = "error: " + err.Error()
		}
		s.wrote <- a.ID
	})
	return s.Store.LastActivityID(ctx)
}

// downStore is a store whose database cannot serve.
type downStore struct{ *store.Store }

var errDiskIO = fmt.Errorf("sqlite3: disk I/O error: %w", store.ErrUnavailable)

func (downStore) Agents(context.Context, store.AgentPage) ([]store.Agent, string, error) {
	return nil, "", fmt.Errorf("list agents: %w", errDiskIO)
}

func (downStore) Activities(context.Context, store.Filter) ([]store.Activity, error) {
	return nil, fmt.Errorf("list activities: %w", errDiskIO)
}

func (downStore) CreateAgent(context.Context, store.Agent, store.Origin) (store.Agent, error) {
	return store.Agent{}, fmt.Errorf("create agent: %w", errDiskIO)
}

func (downStore) StartChat(context.Context, store.Chat) (store.Activity, error) {
	return store.Activity{}, fmt.Errorf("start chat: %w", errDiskIO)
}

// createAgents creates n agents through st and returns their ids.
func createAgents(t *testing.T, st *store.Store, n int, by store.Origin) []string {
	t.Helper()
	var ids []string
	for i := range n {
		a, err := st.CreateAgent(t.Context(), store.Agent{Name: fmt.Sprintf("agent %d", i), SystemPrompt: "p"}, by)
		if err != nil {
			t.Fatalf("CreateAgent() = %v", err)
		}
		ids = append(ids, a.ID)
	}
	return ids
}

func (a *testAPI) activities(query string) activityPage {
	a.t.Helper()
	r := a.get("/api/activities?" + query)
	wantStatus(a.t, "GET /api/activities?"+query, r, http.StatusOK)
	p := decodeBody[activityPage](a.t, "GET /api/activities?"+query, r)
	if p.Activities == nil || p.NextAfter == nil {
		a.t.Fatalf("GET /api/activities?%s = %s, want activities (a list) and next_after", query, r.body)
	}
	return p
}

func TestActivitiesPaging(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	ids := createAgents(t, a.st, 60, store.Origin{Worker: 1, PID: 7})

	p := a.activities(fmt.Sprintf("after=%d", cursor))
	if len(p.Activities) != defaultActivityLimit {
		t.Fatalf("activities without limit = %d, want the default %d", len(p.Activities), defaultActivityLimit)
	}
	for i, act := range p.Activities {
		if act.ID <= cursor || (i > 0 && act.ID <= p.Activities[i-1].ID) {
			t.Fatalf("activity ids %d then %d, want ascending and after %d", p.Activities[max(i-1, 0)].ID, act.ID, cursor)
		}
		if act.Type != "agent.created" || act.AgentID != ids[i] || act.Worker != 1 || act.PID != 7 {
			t.Fatalf("activity %d = %+v, want agent.created of %s by worker 1 pid 7", i, act, ids[i])
		}
	}
	if last := p.Activities[len(p.Activities)-1].ID; *p.NextAfter != last {
		t.Errorf("next_after = %d, want the last id %d", *p.NextAfter, last)
	}

	p2 := a.activities(fmt.Sprintf("after=%d&limit=500", *p.NextAfter))
	if len(p2.Activities) != 10 || p2.Activities[0].AgentID != ids[50] {
		t.Errorf("second page = %d activities from %s, want 10 from %s", len(p2.Activities), p2.Activities[0].AgentID, ids[50])
	}
	p3 := a.activities(fmt.Sprintf("after=%d&limit=1", *p2.NextAfter))
	if len(p3.Activities) != 0 || *p3.NextAfter != *p2.NextAfter {
		t.Errorf("past the end = %d activities, next_after %d; want none and next_after %d", len(p3.Activities), *p3.NextAfter, *p2.NextAfter)
	}
	if p := a.activities("limit=2"); len(p.Activities) != 2 || p.Activities[0].AgentID != store.DefaultAgentID {
		t.Errorf("limit=2 from the start = %+v, want 2 beginning with the default agent's creation", p.Activities)
	}
}

func TestActivitiesFilters(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	other := createAgents(t, a.st, 1, store.Origin{})[0]
	for _, agent := range []string{"default", other, "default"} {
		wantStatus(t, "chat", a.post("/api/chat", `{"agent_id": "`+agent+`", "message": "hi"}`), http.StatusOK)
	}

	p := a.activities(fmt.Sprintf("after=%d&agent_id=%s", cursor, other))
	if len(p.Activities) != 3 {
		t.Errorf("agent_id=%s = %d activities, want 3 (created, started, completed)", other, len(p.Activities))
	}
	for _, act := range p.Activities {
		if act.AgentID != other {
			t.Errorf("agent_id=%s returned %+v", other, act)
		}
	}
	p = a.activities(fmt.Sprintf("after=%d&type=chat.completed", cursor))
	if len(p.Activities) != 3 {
		t.Errorf("type=chat.completed = %d activities, want 3", len(p.Activities))
	}
	for _, act := range p.Activities {
		if act.Type != "chat.completed" {
			t.Errorf("type=chat.completed returned %+v", act)
		}
	}
	p = a.activities(fmt.Sprintf("after=%d&type=chat.started&agent_id=default", cursor))
	if len(p.Activities) != 2 {
		t.Errorf("type=chat.started&agent_id=default = %d activities, want 2", len(p.Activities))
	}
}

func TestActivitiesQueryValidation(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	for _, tc := range []struct{ query, want string }{
		{"after=-1", "after="},
		{"after=abc", "after="},
		{"after=1.5", "after="},
		{"after=99999999999999999999", "after="},
		{"limit=0", "limit="},
		{"limit=501", "limit="},
		{"limit=ten", "limit="},
		{"limit=-3", "limit="},
		{"wait=61", "wait="},
		{"wait=-1", "wait="},
		{"wait=soon", "wait="},
		{"wait=NaN", "wait="},
		{"wait=Inf", "wait="},
	} {
		for _, path := range []string{"/api/activities?", "/api/activities/stream?"} {
			wantError(t, path+tc.query, a.get(path+tc.query), http.StatusBadRequest, "bad_request", tc.want)
		}
	}
	// An unknown type is refused at once, with the list of known ones,
	// rather than answered with nothing or, with wait=, after the wait.
	for _, query := range []string{"type=bogus", "type=chat.complete&wait=5", "type=CHAT.COMPLETED", "type=chat.*"} {
		for _, path := range []string{"/api/activities?", "/api/activities/stream?"} {
			wantError(t, path+query, a.get(path+query), http.StatusBadRequest, "bad_request",
				"parameter type=", "agent.created, agent.deleted, chat.queued, chat.started, chat.retried, chat.completed, chat.failed, chat.cancelled")
		}
	}
	// A parameter given twice is refused, naming it, whichever value
	// would have counted; on every route.
	for _, tc := range []struct{ path, want string }{
		{"/api/activities?limit=1&after=0&limit=2", `parameter "limit" is given 2 times`},
		{"/api/activities/stream?wait=1&wait=1", `parameter "wait" is given 2 times`},
		{"/api/agents?after=a&after=b&after=c", `parameter "after" is given 3 times`},
		{"/api/chats/0123456789abcdef?wait=0&wait=1", `parameter "wait" is given 2 times`},
	} {
		wantError(t, tc.path, a.get(tc.path), http.StatusBadRequest, "bad_request", tc.want)
	}
	wantError(t, "stream with Last-Event-ID: x", a.get("/api/activities/stream", "Last-Event-ID", "x"),
		http.StatusBadRequest, "bad_request", "Last-Event-ID")
	for _, ok := range []string{"after=0", "limit=1", "limit=500", "wait=0", "wait=0.05", "agent_id=&type="} {
		a.activities(ok)
	}
	for _, typ := range activityTypes {
		a.activities("type=" + typ)
	}
}

// TestActivitiesLongPollWakesOnOtherStore parks a long-poll, then writes
// through a second Store on the same file (what another worker process
// has): the poll must answer with that write, soon.
func TestActivitiesLongPollWakesOnOtherStore(t *testing.T) {
	// Not parallel: the latency is measured.
	spy := &spyStore{waiting: make(chan int64, 16)}
	a := newWrappedAPI(t, Config{}, func(st *store.Store) Store { spy.Store = st; return spy })
	other := openStore(t, a.dbURL)
	cursor := lastActivity(t, a.st)

	type result struct {
		page activityPage
		at   time.Time
	}
	done := make(chan result, 1)
	go func() {
		// No t.Fatal off the test goroutine: errors come back as a page.
		r := a.get(fmt.Sprintf("/api/activities?after=%d&wait=20", cursor))
		var p activityPage
		if r.status != http.StatusOK || json.Unmarshal(r.body, &p) != nil {
			p.Activities = []store.Activity{{Type: fmt.Sprintf("status %d: %s", r.status, r.body)}}
		}
		done <- result{p, time.Now()}
	}()
	select {
	case <-spy.waiting:
	case res := <-done:
		t.Fatalf("long-poll answered %+v before anything was written, want it to wait", res.page)
	case <-time.After(10 * time.Second):
		t.Fatal("long-poll never waited")
	}
	created := createAgents(t, other, 1, store.Origin{Worker: 2, PID: 99})[0]
	wrote := time.Now()
	var res result
	select {
	case res = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("long-poll not woken 10 s after a write by another store")
	}
	latency := res.at.Sub(wrote)
	t.Logf("long-poll woke %v after another store's write", latency)
	if len(res.page.Activities) != 1 || res.page.Activities[0].AgentID != created || res.page.Activities[0].Type != "agent.created" {
		t.Fatalf("long-poll answered %+v, want the agent.created of %s", res.page.Activities, created)
	}
	if *res.page.NextAfter != res.page.Activities[0].ID {
		t.Errorf("next_after = %d, want %d", *res.page.NextAfter, res.page.Activities[0].ID)
	}
	if latency > time.Second {
		t.Errorf("long-poll woke %v after the write, want within about 250 ms (bound 1 s)", latency)
	}
}

// TestActivitiesLongPollFiltered: writes that do not match the filter do
// not end a filtered long-poll; the first that does, does.
func TestActivitiesLongPollFiltered(t *testing.T) {
	t.Parallel()
	spy := &spyStore{waiting: make(chan int64, 16)}
	a := newWrappedAPI(t, Config{}, func(st *store.Store) Store { spy.Store = st; return spy })
	other := openStore(t, a.dbURL)
	cursor := lastActivity(t, a.st)

	done := make(chan response, 1)
	go func() { done <- a.get(fmt.Sprintf("/api/activities?after=%d&wait=20&agent_id=wanted", cursor)) }()
	select {
	case <-spy.waiting:
	case <-time.After(10 * time.Second):
		t.Fatal("filtered long-poll never waited")
	}
	createAgents(t, other, 2, store.Origin{}) // not "wanted"
	if _, err := other.CreateAgent(t.Context(), store.Agent{ID: "wanted", Name: "w", SystemPrompt: "p"}, store.Origin{}); err != nil {
		t.Fatalf("CreateAgent(wanted) = %v", err)
	}
	var r response
	select {
	case r = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("filtered long-poll not woken by a matching write")
	}
	wantStatus(t, "filtered long-poll", r, http.StatusOK)
	p := decodeBody[activityPage](t, "filtered long-poll", r)
	if len(p.Activities) != 1 || p.Activities[0].AgentID != "wanted" {
		t.Errorf("filtered long-poll = %+v, want only the activity of agent wanted", p.Activities)
	}
}

func TestActivitiesLongPollTimesOut(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	start := time.Now()
	p := a.activities(fmt.Sprintf("after=%d&wait=0.3", cursor))
	d := time.Since(start)
	if len(p.Activities) != 0 || *p.NextAfter != cursor {
		t.Errorf("timed-out long-poll = %d activities, next_after %d; want none and next_after %d", len(p.Activities), *p.NextAfter, cursor)
	}
	if d < 300*time.Millisecond || d > 5*time.Second {
		t.Errorf("wait=0.3 answered after %v, want about 300ms", d)
	}
	// Something already newer than after: no wait at all.
	start = time.Now()
	if p := a.activities("after=0&wait=30"); len(p.Activities) == 0 {
		t.Errorf("after=0&wait=30 = nothing, want the existing activities")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("after=0&wait=30 took %v, want an immediate answer", d)
	}
}

func TestActivityStream(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	other := openStore(t, a.dbURL)
	cursor := lastActivity(t, a.st)
	ids := createAgents(t, a.st, 3, store.Origin{})

	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	res := a.openStream(ctx, http.MethodGet, fmt.Sprintf("/api/activities/stream?after=%d", cursor), "")
	if cc := res.Header.Get("Cache-Control"); cc != "no-cache" {
		t.Errorf("Cache-Control = %q, want no-cache", cc)
	}
	sr := newSSEReader(res.Body)
	first, err := sr.next()
	if err != nil || first.retry != "1000" {
		t.Errorf("first block = %+v, %v; want retry: 1000", first, err)
	}
	var eventIDs []string
	read := func(wantAgent string) store.Activity {
		t.Helper()
		ev, err := sr.nextEvent()
		if err != nil {
			t.Fatalf("activity stream: %v, want an event for agent %s", err, wantAgent)
		}
		var act store.Activity
		if err := json.Unmarshal([]byte(ev.data), &act); err != nil {
			t.Fatalf("activity event data %q: %v", ev.data, err)
		}
		if ev.event != "activity" || ev.id != strconv.FormatInt(act.ID, 10) || act.AgentID != wantAgent {
			t.Fatalf("event = %+v, want event: activity with id: %d for agent %s", ev, act.ID, wantAgent)
		}
		eventIDs = append(eventIDs, ev.id)
		return act
	}
	for _, id := range ids {
		read(id)
	}
	// Live: written by another store (another worker) after we caught up.
	live := createAgents(t, other, 1, store.Origin{Worker: 2})[0]
	read(live)
	cancel()

	// Resume from the second event: the third and the live one follow.
	ctx2, cancel2 := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel2()
	res2 := a.openStream(ctx2, http.MethodGet, "/api/activities/stream?after=0", "", "Last-Event-ID", eventIDs[1])
	sr = newSSEReader(res2.Body)
	read(ids[2])
	read(live)
}

func TestActivityStreamKeepAlive(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{KeepAliveInterval: 50 * time.Millisecond})
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	res := a.openStream(ctx, http.MethodGet, fmt.Sprintf("/api/activities/stream?after=%d", lastActivity(t, a.st)), "")
	sr := newSSEReader(res.Body)
	for {
		ev, err := sr.next()
		if err != nil {
			t.Fatalf("idle activity stream: %v, want a keep-alive comment", err)
		}
		if ev.event != "" {
			t.Fatalf("idle activity stream sent %+v, want only a keep-alive comment", ev)
		}
		if ev.comment != "" {
			return
		}
	}
}

func TestStoreUnavailable(t *testing.T) {
	t.Parallel()
	a := newWrappedAPI(t, Config{}, func(st *store.Store) Store { return downStore{st} })
	for _, tc := range []struct {
		what string
		r    response
	}{
		{"GET /api/agents", a.get("/api/agents")},
		{"POST /api/agents", a.post("/api/agents", `{"name": "n", "system_prompt": "p"}`)},
		{"GET /api/activities", a.get("/api/activities")},
		{"POST /api/chat", a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`)},
	} {
		wantError(t, tc.what, tc.r, http.StatusServiceUnavailable, "unavailable", "database")
		if got := tc.r.header.Get("Retry-After"); got != "1" {
			t.Errorf("%s: Retry-After %q, want 1", tc.what, got)
		}
	}
}

// TestActivitiesNoLostWakeup: a write that lands between the reader's
// query and its read of the last id must still be delivered, by the
// long-poll and by the stream, rather than waited past.
func TestActivitiesNoLostWakeup(t *testing.T) {
	t.Parallel()
	newRacy := func(t *testing.T) (*testAPI, *racyStore) {
		racy := &racyStore{wrote: make(chan string, 1)}
		a := newWrappedAPI(t, Config{}, func(st *store.Store) Store { racy.Store = st; return racy })
		racy.other = openStore(t, a.dbURL)
		return a, racy
	}
	t.Run("long-poll", func(t *testing.T) {
		t.Parallel()
		a, racy := newRacy(t)
		cursor := lastActivity(t, racy.other)
		start := time.Now()
		p := a.activities(fmt.Sprintf("after=%d&wait=5", cursor))
		id := <-racy.wrote
		if len(p.Activities) != 1 || p.Activities[0].AgentID != id {
			t.Fatalf("long-poll after %v = %+v, want the activity of %s written while it started", time.Since(start), p.Activities, id)
		}
	})
	t.Run("stream", func(t *testing.T) {
		t.Parallel()
		a, racy := newRacy(t)
		cursor := lastActivity(t, racy.other)
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		res := a.openStream(ctx, http.MethodGet, fmt.Sprintf("/api/activities/stream?after=%d", cursor), "")
		ev, err := newSSEReader(res.Body).nextEvent()
		id := <-racy.wrote
		var act store.Activity
		if err == nil {
			err = json.Unmarshal([]byte(ev.data), &act)
		}
		if err != nil || act.AgentID != id {
			t.Fatalf("stream = %+v, %v; want the activity of %s written while it started", ev, err, id)
		}
	})
}
