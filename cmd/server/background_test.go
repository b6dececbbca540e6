package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Background chats through the binary: 202 and Location, ?wait=, a worker
// killed under its chat, events replayed and resumed, cancellation from
// another connection, idempotency keys, a restart in the middle of a chat.

// chatState is GET /api/chats/{id}'s answer.
type chatState struct {
	ID       string `json:"id"`
	Status   string `json:"status"`
	Attempts int    `json:"attempts"`
	Reply    string `json:"reply"`
	PID      int    `json:"pid"`
	Instance string `json:"instance"`
	Error    *struct {
		Code string `json:"code"`
	} `json:"error"`
}

// postJSON posts body to u with the headers (name, value, ...) and returns
// the status, the Location header and the body.
func postJSON(t *testing.T, u, body string, headers ...string) (int, http.Header, []byte) {
	t.Helper()
	req, _ := http.NewRequest("POST", u, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatalf("POST %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, b
}

// startBackground posts a background chat to s and returns its id after
// checking the 202 answer.
func startBackground(t *testing.T, base, message string) string {
	t.Helper()
	return startBackgroundWith(t, base, message)
}

// startBackgroundWith is startBackground with request headers, given as
// name, value pairs.
func startBackgroundWith(t *testing.T, base, message string, headers ...string) string {
	t.Helper()
	code, h, b := postJSON(t, base+"/api/chat", fmt.Sprintf(`{"agent_id":"default","message":%q,"background":true}`, message), headers...)
	var c chatState
	json.Unmarshal(b, &c)
	if code != http.StatusAccepted || c.Status != "queued" || c.ID == "" || h.Get("Location") != "/api/chats/"+c.ID {
		t.Fatalf("POST background chat = %d %s (Location %q), want 202, status queued and Location /api/chats/{id}", code, b, h.Get("Location"))
	}
	return c.ID
}

// getChat answers GET /api/chats/{id}?wait=wait.
func getChat(base, id string, wait int) (chatState, error) {
	var c chatState
	c2 := &http.Client{Timeout: time.Duration(wait+10) * time.Second}
	resp, err := c2.Get(fmt.Sprintf("%s/api/chats/%s?wait=%d", base, id, wait))
	if err != nil {
		return c, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return c, fmt.Errorf("GET /api/chats/%s = %d %s", id, resp.StatusCode, b)
	}
	return c, json.Unmarshal(b, &c)
}

// waitRunning waits until chat id runs in a process other than notPID.
func waitRunning(t *testing.T, base, id string, notPID int) chatState {
	t.Helper()
	var c chatState
	waitFor(t, 15*time.Second, func() error {
		var err error
		c, err = getChat(base, id, 0)
		if err != nil || c.Status != "running" || c.PID == 0 || c.PID == notPID {
			return fmt.Errorf("chat %s = %+v, %v, want running in a pid other than %d", id, c, err, notPID)
		}
		return nil
	})
	return c
}

// sseEvent is one parsed server-sent event.
type sseEvent struct{ id, name, data string }

// readEvents reads the chat's events (after lastID when not empty) until
// the stream ends.
func readEvents(t *testing.T, base, id, lastID string) []sseEvent {
	t.Helper()
	return readEventsUntil(t, base, id, lastID, nil)
}

// readEventsUntil is readEvents that hangs up after the first event for
// which stop, if not nil, reports true.
func readEventsUntil(t *testing.T, base, id, lastID string, stop func(sseEvent) bool) []sseEvent {
	t.Helper()
	req, _ := http.NewRequest("GET", base+"/api/chats/"+id+"/events", nil)
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("GET events: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("GET events = %d %s, want 200 text/event-stream", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var evs []sseEvent
	var ev sseEvent
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if ev.name != "" {
				evs = append(evs, ev)
				if stop != nil && stop(ev) {
					return evs
				}
			}
			ev = sseEvent{}
		case strings.HasPrefix(line, "id: "):
			ev.id = line[4:]
		case strings.HasPrefix(line, "event: "):
			ev.name = line[7:]
		case strings.HasPrefix(line, "data: "):
			ev.data = line[6:]
		}
	}
	return evs
}

// replyOf joins the text of the last attempt's deltas.
func replyOf(evs []sseEvent) string {
	var b strings.Builder
	for _, e := range evs {
		switch e.name {
		case "retry":
			b.Reset()
		case "delta":
			var d struct{ Text string }
			json.Unmarshal([]byte(e.data), &d)
			b.WriteString(d.Text)
		}
	}
	return b.String()
}

// TestBackgroundChatEventsLive: a client follows a running background
// chat's events as they are written, hangs up after the first delta, and
// resumes with Last-Event-ID while the chat still runs: the deltas of both
// connections follow each other with no gap and no repeat and spell the
// reply.
func TestBackgroundChatEventsLive(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=8s")
	base := strings.TrimSuffix(s.url(""), "/")
	id := startBackground(t, base, "follow me as I go")
	first := readEventsUntil(t, base, id, "", func(e sseEvent) bool { return e.name == "delta" })
	if n := len(first); n == 0 || first[n-1].name != "delta" {
		t.Fatalf("events until the first delta = %+v, want a delta", first)
	}
	if c, err := getChat(base, id, 0); err != nil || c.Status != "running" {
		t.Fatalf("chat after its first delta arrived = %+v, %v; want still running (the events came live)", c, err)
	}
	lastID := first[len(first)-1].id
	rest := readEvents(t, base, id, lastID)
	if n := len(rest); n == 0 || rest[n-1].name != "done" {
		t.Fatalf("events after Last-Event-ID %s = %+v, want deltas then done", lastID, rest)
	}
	all := append(first, rest...)
	prev := 0
	for _, e := range all {
		if e.name != "delta" {
			continue
		}
		n, err := strconv.Atoi(e.id)
		if err != nil || n != prev+1 {
			t.Fatalf("delta id %q after %d across the two connections, want %d: %+v", e.id, prev, prev+1, all)
		}
		prev = n
	}
	done, err := getChat(base, id, 30)
	if err != nil || done.Status != "completed" || replyOf(all) != done.Reply {
		t.Fatalf("chat = %+v, %v; want completed with the reply the deltas spell, %q", done, err, replyOf(all))
	}
}

// TestBackgroundChatLifecycle: 202 and Location, a kill -9 of the worker
// running the chat (found through pid) and the chat completing on its
// second attempt, its events replayed whole and resumed after an id, and a
// cancellation from another connection.
func TestBackgroundChatLifecycle(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=3s", "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")

	id := startBackground(t, base, "survive a kill")
	c := waitRunning(t, base, id, 0)
	// The first attempt writes a delta before it dies.
	readEventsUntil(t, base, id, "", func(e sseEvent) bool { return e.name == "delta" })
	killed := time.Now()
	if err := syscall.Kill(c.PID, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", c.PID, err)
	}
	again := waitRunning(t, base, id, c.PID)
	t.Logf("chat running again %v after its worker was killed", time.Since(killed).Round(time.Millisecond))
	done, err := getChat(base, id, 30)
	if err != nil || done.Status != "completed" || done.Attempts != 2 || !strings.Contains(done.Reply, "survive a kill") {
		t.Fatalf("GET ?wait=30 = %+v, %v, want completed after 2 attempts", done, err)
	}
	if again.Attempts != 2 {
		t.Fatalf("second run = %+v, want attempts 2", again)
	}
	feed, err := getFeed(fresh, s.url("/api/activities?type=chat.retried"))
	if err != nil || len(feed.Activities) != 1 || feed.Activities[0].ChatID != id {
		t.Fatalf("chat.retried activities = %+v, %v, want one for %s", feed.Activities, err, id)
	}

	// Events: the whole story, then only what follows an id.
	evs := readEvents(t, base, id, "")
	if n := len(evs); n < 3 || evs[n-1].name != "done" || replyOf(evs) != done.Reply {
		t.Fatalf("events = %+v, want deltas spelling %q and then done", evs, done.Reply)
	}
	var ids []int
	for _, e := range evs {
		if e.name == "delta" {
			n, err := strconv.Atoi(e.id)
			if err != nil || (len(ids) > 0 && n != ids[len(ids)-1]+1) {
				t.Fatalf("delta ids %v then %q, want consecutive numbers", ids, e.id)
			}
			ids = append(ids, n)
		}
	}
	// A client that had the first attempt's deltas resumes after the last
	// of them: it is told of the retry before the new attempt's text, so
	// what it holds spells the reply.
	for i, e := range evs {
		if e.name != "retry" {
			continue
		}
		j := i - 1
		for j >= 0 && evs[j].name != "delta" {
			j--
		}
		if j < 0 {
			t.Fatalf("events = %+v, want a delta of the first attempt before the retry", evs)
		}
		rest := readEvents(t, base, id, evs[j].id)
		held := append(slices.Clone(evs[:j+1]), rest...)
		if len(rest) == 0 || rest[0].name != "retry" || replyOf(held) != done.Reply {
			t.Fatalf("events after Last-Event-ID %s (the first attempt's last delta) = %+v, want retry first and a reply of %q", evs[j].id, rest, done.Reply)
		}
	}
	if !slices.ContainsFunc(evs, func(e sseEvent) bool { return e.name == "retry" }) {
		t.Fatalf("events = %+v, want a retry event between the two attempts", evs)
	}
	mid := ids[len(ids)/2]
	rest := readEvents(t, base, id, strconv.Itoa(mid))
	var got []int
	for _, e := range rest {
		if e.name == "delta" {
			n, _ := strconv.Atoi(e.id)
			got = append(got, n)
		}
	}
	if len(got) != len(ids)-len(ids)/2-1 || got[0] != mid+1 || rest[len(rest)-1].name != "done" {
		t.Fatalf("events after Last-Event-ID %d = ids %v, want %d..%d then done", mid, got, mid+1, ids[len(ids)-1])
	}

	// Cancel from another connection: the chat stops within a second. This
	// chat is queued by Prefer: respond-async rather than "background".
	code, h, b := postJSON(t, base+"/api/chat", `{"agent_id":"default","message":"cancel me"}`, "Prefer", "respond-async")
	var queued chatState
	json.Unmarshal(b, &queued)
	id2 := queued.ID
	if code != http.StatusAccepted || queued.Status != "queued" || id2 == "" || h.Get("Location") != "/api/chats/"+id2 {
		t.Fatalf("POST with Prefer: respond-async = %d %s (Location %q), want 202, status queued and Location", code, b, h.Get("Location"))
	}
	waitRunning(t, base, id2, 0)
	code, _, b = postJSON(t, base+"/api/chats/"+id2+"/cancel", "")
	if code != 200 || !strings.Contains(string(b), `"status":"cancelled"`) {
		t.Fatalf("POST cancel = %d %s, want 200 and status cancelled", code, b)
	}
	if code, _, b := postJSON(t, base+"/api/chats/"+id2+"/cancel", ""); code != 200 {
		t.Fatalf("second POST cancel = %d %s, want 200 (idempotent)", code, b)
	}
	if code, _, b := postJSON(t, base+"/api/chats/"+id+"/cancel", ""); code != http.StatusConflict {
		t.Fatalf("POST cancel of a completed chat = %d %s, want 409", code, b)
	}
	if evs := readEvents(t, base, id2, ""); len(evs) == 0 || evs[len(evs)-1].name != "error" || !strings.Contains(evs[len(evs)-1].data, "cancelled") {
		t.Fatalf("events of a cancelled chat = %+v, want an error event saying cancelled", evs)
	}
	// The worker saw the cancellation: its chat gauge falls back to zero
	// rather than running on to the end of the reply.
	waitFor(t, time.Second, func() error {
		if n := len(s.logs.find("chat cancelled on request", nil)); n != 1 {
			return fmt.Errorf("%d chat cancelled on request log lines, want 1", n)
		}
		return nil
	})
	if _, err := getChat(base, "nope", 0); err == nil || !strings.Contains(err.Error(), "404") {
		t.Fatalf("GET unknown chat = %v, want 404", err)
	}
}

// TestBackgroundIdempotencyAndRetries: an Idempotency-Key makes one chat
// and one upstream call of two requests, synchronous or background; the
// same key with another body is 422; an upstream that keeps cutting its
// stream is retried and the chat fails after --chat-max-attempts.
func TestBackgroundIdempotencyAndRetries(t *testing.T) {
	t.Parallel()
	llm := newFakeLLM(t)
	s := startServer(t, "WORKERS=2", "LLM_BASE_URL="+llm.baseURL(), "CHAT_MAX_ATTEMPTS=2", "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")

	body := `{"agent_id":"default","message":"ok sync"}`
	code1, _, b1 := postJSON(t, base+"/api/chat", body, "Idempotency-Key", "key-1")
	code2, h2, b2 := postJSON(t, base+"/api/chat", body, "Idempotency-Key", "key-1")
	var r1, r2 struct{ ID, Reply string }
	json.Unmarshal(b1, &r1)
	json.Unmarshal(b2, &r2)
	if code1 != 200 || code2 != 200 || r1.ID == "" || r1 != r2 || h2.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("same key twice = %d %s, then %d %s, want the same chat twice", code1, b1, code2, b2)
	}
	if n := llm.attemptsFor("ok sync"); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
	if code, _, b := postJSON(t, base+"/api/chat", `{"agent_id":"default","message":"ok other"}`, "Idempotency-Key", "key-1"); code != 422 || !strings.Contains(string(b), "idempotency_key_reused") {
		t.Fatalf("same key, other body = %d %s, want 422 idempotency_key_reused", code, b)
	}
	// The same key again while the first chat is still waiting on the LLM:
	// the second call waits for that chat and answers it.
	slow := `{"agent_id":"default","message":"slow-ok twice"}`
	type answer struct {
		code int
		body []byte
		err  error
	}
	firstDone := make(chan answer, 1)
	go func() { // not postJSON: no t.Fatal off the test's goroutine
		req, _ := http.NewRequest("POST", base+"/api/chat", strings.NewReader(slow))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", "key-3")
		resp, err := fresh.Do(req)
		if err != nil {
			firstDone <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		firstDone <- answer{resp.StatusCode, b, err}
	}()
	waitFor(t, 10*time.Second, func() error {
		if n := llm.attemptsFor("slow-ok twice"); n != 1 {
			return fmt.Errorf("upstream calls = %d, want the first chat's", n)
		}
		return nil
	})
	code2, _, b2 = postJSON(t, base+"/api/chat", slow, "Idempotency-Key", "key-3")
	a1 := <-firstDone
	if a1.err != nil {
		t.Fatalf("first call with key-3: %v", a1.err)
	}
	json.Unmarshal(a1.body, &r1)
	json.Unmarshal(b2, &r2)
	if a1.code != 200 || code2 != 200 || r1.ID == "" || r1 != r2 {
		t.Fatalf("same key while the first chat runs = %d %s and %d %s, want the same chat twice", a1.code, a1.body, code2, b2)
	}
	if n := llm.attemptsFor("slow-ok twice"); n != 1 {
		t.Fatalf("upstream calls for two concurrent calls with one key = %d, want 1", n)
	}

	bg := `{"agent_id":"default","message":"ok background","background":true}`
	_, _, b1 = postJSON(t, base+"/api/chat", bg, "Idempotency-Key", "key-2")
	code2, _, b2 = postJSON(t, base+"/api/chat", bg, "Idempotency-Key", "key-2")
	var c1, c2 chatState
	json.Unmarshal(b1, &c1)
	json.Unmarshal(b2, &c2)
	if code2 != 202 || c1.ID == "" || c1.ID != c2.ID {
		t.Fatalf("background with the same key twice = %s then %d %s, want one chat", b1, code2, b2)
	}
	if done, err := getChat(base, c1.ID, 30); err != nil || done.Status != "completed" {
		t.Fatalf("GET ?wait = %+v, %v, want completed", done, err)
	}
	if n := llm.attemptsFor("ok background"); n != 1 {
		t.Fatalf("upstream calls for the background chat = %d, want 1", n)
	}

	// A stream cut every time: retried once, then failed with its error.
	id := startBackground(t, base, "reset always")
	done, err := getChat(base, id, 30)
	if err != nil || done.Status != "failed" || done.Attempts != 2 || done.Error == nil || done.Error.Code != "upstream_error" {
		t.Fatalf("chat whose stream is always cut = %+v, %v, want failed upstream_error after 2 attempts", done, err)
	}
	// A 400 is not worth a retry.
	id = startBackground(t, base, "bad-request")
	if done, err := getChat(base, id, 30); err != nil || done.Status != "failed" || done.Attempts != 1 {
		t.Fatalf("chat upstream refuses = %+v, %v, want failed after 1 attempt", done, err)
	}
}

// TestBackgroundChatSurvivesRestart: SIGTERM with a graceful budget shorter
// than the chat leaves it queued; the next start on the same database runs
// it to the end.
func TestBackgroundChatSurvivesRestart(t *testing.T) {
	t.Parallel()
	db := "DATABASE_URL=sqlite:" + filepath.Join(t.TempDir(), "server.db")
	env := []string{db, "WORKERS=1", "SIMULATED_LATENCY=4s", "TIMEOUT_GRACEFUL_SHUTDOWN=1s", "LOG_LEVEL=info"}
	s := startServer(t, env...)
	base := strings.TrimSuffix(s.url(""), "/")
	id := startBackground(t, base, "outlive me")
	waitRunning(t, base, id, 0)
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.wait(15 * time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0", code)
	}
	if n := len(s.logs.find("background chat handed back: worker stopping", nil)); n != 1 {
		t.Fatalf("%d hand-back log lines, want 1; log:\n%s", n, s.logs)
	}
	s2 := startServer(t, env...)
	done, err := getChat(strings.TrimSuffix(s2.url(""), "/"), id, 30)
	if err != nil || done.Status != "completed" || done.Attempts != 1 {
		t.Fatalf("after restart = %+v, %v, want completed, attempts 1 (a shutdown does not count)", done, err)
	}
}

// TestBackgroundQueueLimitAndMetrics: past --chat-queue-max a background
// chat is refused with 503 and Retry-After; /metrics and the status show
// the queue (depth, running, age of the oldest); cancelling queued chats
// empties it.
func TestBackgroundQueueLimitAndMetrics(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "CHAT_CONCURRENCY=1", "CHAT_QUEUE_MAX=2", "SIMULATED_LATENCY=30s",
		"METRICS_ADDR=127.0.0.1:0", "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")
	running := startBackground(t, base, "occupy the worker")
	waitRunning(t, base, running, 0)
	queued := []string{startBackground(t, base, "wait 1"), startBackground(t, base, "wait 2")}
	code, h, b := postJSON(t, base+"/api/chat", `{"agent_id":"default","message":"one too many","background":true}`)
	if code != 503 || h.Get("Retry-After") == "" || !strings.Contains(string(b), "queue_full") {
		t.Fatalf("POST past --chat-queue-max = %d %s (Retry-After %q), want 503 queue_full with Retry-After", code, b, h.Get("Retry-After"))
	}

	murl := s.metricsURL(t)
	waitFor(t, 5*time.Second, func() error {
		_, text := get(t, murl+"/metrics", "")
		depth, _ := sample(text, "corral_chat_queue_depth")
		run, _ := sample(text, "corral_chat_queue_running")
		age, ok := sample(text, "corral_chat_queue_oldest_age_seconds")
		if depth != 2 || run != 1 || !ok || age <= 0 {
			return fmt.Errorf("queue metrics depth %v running %v oldest age %v, want 2, 1 and more than 0", depth, run, age)
		}
		return nil
	})
	_, status := get(t, murl+"/status.json", "")
	if !strings.Contains(status, `{"name":"chats queued","value":"2"}`) {
		t.Fatalf("/status.json = %s, want info chats queued 2", status)
	}

	for _, id := range append(queued, running) {
		if code, _, b := postJSON(t, base+"/api/chats/"+id+"/cancel", ""); code != 200 {
			t.Fatalf("POST cancel %s = %d %s", id, code, b)
		}
	}
	waitFor(t, 5*time.Second, func() error {
		_, text := get(t, murl+"/metrics", "")
		depth, _ := sample(text, "corral_chat_queue_depth")
		run, _ := sample(text, "corral_chat_queue_running")
		if depth != 0 || run != 0 {
			return fmt.Errorf("queue metrics depth %v running %v after cancelling all, want 0 and 0", depth, run)
		}
		return nil
	})
}

// TestMultihostBackgroundChat: two servers on one PostgreSQL database; a
// background chat posted to one runs on either; that server is killed
// whole (master and workers, SIGKILL), and the other one finishes the chat
// after seeing the lost instance claim.
func TestMultihostBackgroundChat(t *testing.T) {
	t.Parallel()
	dbURL := testPostgresDB(t)
	env := []string{"DATABASE_URL=" + dbURL, "WORKERS=1", "SIMULATED_LATENCY=4s", "LOG_LEVEL=info"}
	servers := map[string]*server{
		"host-a": startServer(t, append(env, "INSTANCE_ID=host-a")...),
		"host-b": startServer(t, append(env, "INSTANCE_ID=host-b")...),
	}
	baseA := strings.TrimSuffix(servers["host-a"].url(""), "/")
	baseB := strings.TrimSuffix(servers["host-b"].url(""), "/")

	// Cancelled through the other host than the one running it: the
	// running worker lets go within two seconds.
	cid := startBackground(t, baseA, "cancel me across hosts")
	cc := waitRunning(t, baseA, cid, 0)
	canceller := baseA
	if cc.Instance == "host-a" {
		canceller = baseB
	}
	cancelled := time.Now()
	if code, _, b := postJSON(t, canceller+"/api/chats/"+cid+"/cancel", ""); code != 200 {
		t.Fatalf("POST cancel on the other host = %d %s, want 200", code, b)
	}
	waitFor(t, 2*time.Second, func() error {
		if n := len(servers[cc.Instance].logs.find("chat cancelled on request", map[string]any{"chat_id": cid})); n != 1 {
			return fmt.Errorf("%d chat cancelled on request log lines on %s, want 1", n, cc.Instance)
		}
		return nil
	})
	t.Logf("cancel across hosts seen by the running worker within %v", time.Since(cancelled).Round(time.Millisecond))

	id := startBackground(t, baseA, "outlive my host")
	c := waitRunning(t, baseA, id, 0)
	victim := servers[c.Instance]
	if victim == nil {
		t.Fatalf("chat runs on instance %q, want host-a or host-b", c.Instance)
	}
	other := "host-a"
	if c.Instance == "host-a" {
		other = "host-b"
	}
	pids := victim.workerPIDs()
	killed := time.Now()
	victim.cmd.Process.Kill()
	for _, p := range pids {
		syscall.Kill(p, syscall.SIGKILL)
	}
	<-victim.done
	otherBase := strings.TrimSuffix(servers[other].url(""), "/")
	// The other master hands the chat back once the victim has been
	// without its claim for 10 s (a claim that flaps is not a death).
	var again chatState
	waitFor(t, 30*time.Second, func() error {
		var err error
		again, err = getChat(otherBase, id, 0)
		if err != nil || again.Instance != other && again.Status != "completed" {
			return fmt.Errorf("chat = %+v, %v, want it running on %s or completed", again, err, other)
		}
		return nil
	})
	t.Logf("chat running on %s %v after its host was killed", other, time.Since(killed).Round(time.Millisecond))
	done, err := getChat(otherBase, id, 30)
	if err != nil || done.Status != "completed" || done.Attempts != 2 {
		t.Fatalf("chat after its host died = %+v, %v, want completed after 2 attempts", done, err)
	}
	feed, err := getFeed(fresh, servers[other].url("/api/activities?type=chat.retried"))
	if err != nil || len(feed.Activities) != 1 {
		t.Fatalf("chat.retried activities = %+v, %v, want one", feed.Activities, err)
	}
}

// TestIdempotencyKeyScopeAndWindow: with API tokens on, the same
// Idempotency-Key under two tokens names two chats (two upstream calls);
// under one token it names one. Past --idempotency-window the key is free
// again: another body with it starts a new chat instead of a 422.
func TestIdempotencyKeyScopeAndWindow(t *testing.T) {
	t.Parallel()
	llm := newFakeLLM(t)
	const window = 3 * time.Second
	s := startServer(t, "WORKERS=2", "LLM_BASE_URL="+llm.baseURL(), "API_TOKEN=tok-a,tok-b",
		"IDEMPOTENCY_WINDOW="+window.String(), "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")
	chat := func(token, key, message string) (int, string, http.Header) {
		t.Helper()
		code, h, b := postJSON(t, base+"/api/chat", fmt.Sprintf(`{"agent_id":"default","message":%q}`, message),
			"Authorization", "Bearer "+token, "Idempotency-Key", key)
		var r struct{ ID string }
		json.Unmarshal(b, &r)
		if code == 200 && r.ID == "" {
			t.Fatalf("POST chat = %d %s, want a chat id", code, b)
		}
		return code, r.ID, h
	}

	first := time.Now()
	codeA, a1, _ := chat("tok-a", "shared-key", "ok scoped")
	codeB, b1, _ := chat("tok-b", "shared-key", "ok scoped")
	codeA2, a2, h := chat("tok-a", "shared-key", "ok scoped")
	if codeA != 200 || codeB != 200 || codeA2 != 200 || a1 == b1 || a2 != a1 || h.Get("Idempotent-Replayed") != "true" {
		t.Fatalf("same key: token a %d %s, token b %d %s, token a again %d %s (replayed %q); want two chats, a's replayed",
			codeA, a1, codeB, b1, codeA2, a2, h.Get("Idempotent-Replayed"))
	}
	if n := llm.attemptsFor("ok scoped"); n != 2 {
		t.Fatalf("upstream calls = %d, want 2 (one per token)", n)
	}

	// Within the window another body is refused; once it has passed, the
	// key starts a new chat.
	var renewed string
	waitFor(t, window+10*time.Second, func() error {
		code, id, _ := chat("tok-a", "shared-key", "ok after the window")
		switch {
		case code == 422:
			return fmt.Errorf("another body with the key %v after the first use = 422, want a new chat once %v passed", time.Since(first).Round(time.Millisecond), window)
		case code != 200 || id == a1:
			t.Fatalf("another body with the key = %d, chat %s, want 422 or a new chat", code, id)
		}
		renewed = id
		return nil
	})
	if d := time.Since(first); d < window {
		t.Fatalf("key free again %v after its first use, want no sooner than %v", d, window)
	}
	if n := llm.attemptsFor("ok after the window"); n != 1 || renewed == "" {
		t.Fatalf("upstream calls for the new body = %d, want 1", n)
	}
	// The key now names the new chat.
	if code, id, _ := chat("tok-a", "shared-key", "ok after the window"); code != 200 || id != renewed {
		t.Fatalf("the key again = %d %s, want the new chat %s", code, id, renewed)
	}
}

// TestSyncChatEvents: the events of a synchronous chat, read from another
// connection while it runs: it stores no deltas, so the stream waits for
// its end and sends the whole reply as one delta (id 1), then done; after
// Last-Event-ID 1, only done.
func TestSyncChatEvents(t *testing.T) {
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=2s", "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")
	req, _ := http.NewRequest("POST", base+"/api/chat", strings.NewReader(`{"agent_id":"default","message":"watch me","stream":true}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("POST streamed chat: %v", err)
	}
	defer resp.Body.Close()
	id := resp.Header.Get("X-Chat-Id")
	if c, err := getChat(base, id, 0); err != nil || c.Status != "running" {
		t.Fatalf("GET chat = %+v, %v, want running", c, err)
	}
	evs := readEvents(t, base, id, "")
	done, err := getChat(base, id, 0)
	if err != nil || done.Status != "completed" {
		t.Fatalf("GET chat after its events = %+v, %v, want completed", done, err)
	}
	if len(evs) != 2 || evs[0].name != "delta" || evs[0].id != "1" || replyOf(evs) != done.Reply || evs[1].name != "done" {
		t.Fatalf("events of a synchronous chat = %+v, want one delta (id 1) spelling %q, then done", evs, done.Reply)
	}
	if evs := readEvents(t, base, id, "1"); len(evs) != 1 || evs[0].name != "done" {
		t.Fatalf("events after Last-Event-ID 1 = %+v, want only done", evs)
	}
}

// TestMultihostBackgroundChatOnStop: two servers on one PostgreSQL
// database; the one running a background chat is stopped (SIGTERM, a 1 s
// graceful budget, shorter than the chat) and does not come back: the
// other one runs the chat to the end, the stop not counted as an attempt.
func TestMultihostBackgroundChatOnStop(t *testing.T) {
	dbURL := testPostgresDB(t)
	env := []string{"DATABASE_URL=" + dbURL, "WORKERS=1", "SIMULATED_LATENCY=4s", "TIMEOUT_GRACEFUL_SHUTDOWN=1s", "LOG_LEVEL=info"}
	servers := map[string]*server{
		"host-a": startServer(t, append(env, "INSTANCE_ID=host-a")...),
		"host-b": startServer(t, append(env, "INSTANCE_ID=host-b")...),
	}
	baseA := strings.TrimSuffix(servers["host-a"].url(""), "/")
	id := startBackground(t, baseA, "outlive my host's stop")
	c := waitRunning(t, baseA, id, 0)
	other := map[string]string{"host-a": "host-b", "host-b": "host-a"}[c.Instance]
	if other == "" {
		t.Fatalf("chat runs on instance %q, want host-a or host-b", c.Instance)
	}
	stopped := time.Now()
	servers[c.Instance].cmd.Process.Signal(syscall.SIGTERM)
	if code := servers[c.Instance].wait(15 * time.Second); code != 0 {
		t.Fatalf("%s exited %d after SIGTERM, want 0", c.Instance, code)
	}
	otherBase := strings.TrimSuffix(servers[other].url(""), "/")
	waitFor(t, 15*time.Second, func() error {
		again, err := getChat(otherBase, id, 0)
		if err != nil || again.Instance != other && again.Status != "completed" {
			return fmt.Errorf("chat = %+v, %v, want it running on %s or completed", again, err, other)
		}
		return nil
	})
	t.Logf("chat running on %s %v after %s was told to stop", other, time.Since(stopped).Round(time.Millisecond), c.Instance)
	done, err := getChat(otherBase, id, 30)
	if err != nil || done.Status != "completed" || done.Attempts != 1 {
		t.Fatalf("chat after its host stopped = %+v, %v, want completed, attempts 1 (a stop does not count)", done, err)
	}
}
