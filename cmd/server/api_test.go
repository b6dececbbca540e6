package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

type chatAnswer struct {
	ID      string `json:"id"`
	AgentID string `json:"agent_id"`
	Reply   string `json:"reply"`
	Worker  int    `json:"worker"`
}

type activity struct {
	ID      int64          `json:"id"`
	Type    string         `json:"type"`
	AgentID string         `json:"agent_id"`
	ChatID  string         `json:"chat_id"`
	Worker  int            `json:"worker"`
	PID     int            `json:"pid"`
	Data    map[string]any `json:"data"`
}

type activityPage struct {
	Activities []activity `json:"activities"`
	NextAfter  int64      `json:"next_after"`
}

// postJSON posts body to path on a new connection and decodes a 2xx answer
// into out.
func (s *server) postJSON(path string, body any, out any) (int, error) {
	return s.postJSONWith(fresh, path, body, out)
}

// postJSONWith is postJSON through client c.
func (s *server) postJSONWith(c *http.Client, path string, body any, out any) (int, error) {
	b, _ := json.Marshal(body)
	resp, err := c.Post(s.url(path), "application/json", bytes.NewReader(b))
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return resp.StatusCode, fmt.Errorf("POST %s = %d %s", path, resp.StatusCode, raw)
	}
	return resp.StatusCode, json.Unmarshal(raw, out)
}

func (s *server) activities(query string) (activityPage, error) {
	var p activityPage
	resp, err := fresh.Get(s.url("/api/activities?" + query))
	if err != nil {
		return p, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return p, fmt.Errorf("GET /api/activities?%s = %d", query, resp.StatusCode)
	}
	return p, json.NewDecoder(resp.Body).Decode(&p)
}

// allActivities pages through the whole feed.
func (s *server) allActivities(t *testing.T) []activity {
	t.Helper()
	var all []activity
	after := int64(0)
	for {
		p, err := s.activities(fmt.Sprintf("after=%d&limit=500", after))
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, p.Activities...)
		if len(p.Activities) < 500 {
			return all
		}
		after = p.NextAfter
	}
}

func TestConcurrentChatsOnFourWorkers(t *testing.T) {
	s := startServer(t, "WORKERS=4", "SIMULATED_LATENCY=0")
	const chats = 800
	// The burst is about correctness (every write kept, ids in order, every
	// worker used), not speed: under -race four workers take 5-10 s to
	// answer 800 chats at once, so the client waits longer than fresh's
	// 10 s. Chat throughput is measured by make bench.
	patient := &http.Client{Timeout: time.Minute, Transport: &http.Transport{DisableKeepAlives: true}}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failures []string
	workers := map[int]int{}
	start := make(chan struct{})
	for i := range chats {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			var a chatAnswer
			_, err := s.postJSONWith(patient, "/api/chat", map[string]any{"agent_id": "default", "message": fmt.Sprintf("chat %d", i)}, &a)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failures = append(failures, err.Error())
				return
			}
			workers[a.Worker]++
		}()
	}
	close(start)
	wg.Wait()
	if len(failures) > 0 {
		t.Fatalf("%d of %d chats failed; first: %s", len(failures), chats, failures[0])
	}
	if len(workers) != 4 {
		t.Errorf("chats answered by workers %v, want all 4", workers)
	}
	counts := map[string]int{}
	last := int64(0)
	for _, a := range s.allActivities(t) {
		if a.ID <= last {
			t.Fatalf("activity id %d after %d: ids must strictly increase", a.ID, last)
		}
		last = a.ID
		counts[a.Type]++
	}
	if counts["chat.started"] != chats || counts["chat.completed"] != chats {
		t.Errorf("activities %v, want %d chat.started and %d chat.completed", counts, chats, chats)
	}
}

func TestAgentIsSeenByEveryWorker(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=3", "SIMULATED_LATENCY=0")
	var agent struct{ ID string }
	if _, err := s.postJSON("/api/agents", map[string]any{"name": "shared", "system_prompt": "be brief"}, &agent); err != nil {
		t.Fatal(err)
	}
	seen := map[int]bool{}
	waitFor(t, 20*time.Second, func() error {
		var a chatAnswer
		if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": agent.ID, "message": "hi"}, &a); err != nil {
			t.Fatalf("a worker does not know agent %s: %v", agent.ID, err)
		}
		seen[a.Worker] = true
		if len(seen) < 3 {
			return fmt.Errorf("agent used on workers %v, want all 3", seen)
		}
		return nil
	})
}

func TestLongPollIsWokenByAnotherWorker(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=0", "ACCESS_LOG=true")
	for attempt := 1; ; attempt++ {
		all := s.allActivities(t)
		after := all[len(all)-1].ID
		type polled struct {
			page activityPage
			err  error
		}
		res := make(chan polled, 1)
		query := fmt.Sprintf("after=%d&wait=30&type=chat.completed", after)
		go func() {
			p, err := s.activities(query)
			res <- polled{p, err}
		}()
		// The poll is waiting once its connection is open.
		waitFor(t, 5*time.Second, func() error {
			if inFlight(t, s) == 0 {
				return fmt.Errorf("long-poll not connected yet")
			}
			return nil
		})
		var a chatAnswer
		wrote := time.Now()
		if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "wake up"}, &a); err != nil {
			t.Fatal(err)
		}
		var r polled
		select {
		case r = <-res:
		case <-time.After(10 * time.Second):
			t.Fatalf("long-poll not woken 10s after a chat completed")
		}
		if r.err != nil || len(r.page.Activities) == 0 || r.page.Activities[0].ChatID != a.ID {
			t.Fatalf("long-poll answered %+v, %v; want the completion of chat %s", r.page, r.err, a.ID)
		}
		t.Logf("woken %s after the chat was sent", time.Since(wrote))
		pollWorker := -1
		waitFor(t, 5*time.Second, func() error {
			for _, l := range s.logs.find("request", map[string]any{"path": "/api/activities"}) {
				if w, ok := l["worker"].(float64); ok {
					pollWorker = int(w)
				}
			}
			if pollWorker < 0 {
				return fmt.Errorf("no access log line for the long-poll")
			}
			return nil
		})
		if pollWorker != a.Worker {
			return // woken by a write made on the other worker
		}
		if attempt == 10 {
			t.Fatalf("in 10 attempts the long-poll and the chat always met on one worker")
		}
	}
}

func TestChatOfKilledWorkerIsRecordedFailed(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=60s")
	go s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "long"}, &chatAnswer{})
	var started activity
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.started")
		if err != nil || len(p.Activities) == 0 {
			return fmt.Errorf("no chat.started yet (%v)", err)
		}
		started = p.Activities[0]
		return nil
	})
	syscall.Kill(started.PID, syscall.SIGKILL)
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.failed")
		if err != nil {
			return err
		}
		for _, a := range p.Activities {
			if a.ChatID == started.ChatID && a.Data["reason"] == "worker_died" {
				return nil
			}
		}
		return fmt.Errorf("chat %s of killed worker %d not failed with worker_died: %+v", started.ChatID, started.PID, p.Activities)
	})
}

// TestChatCancelledWhenClientGoesAway: a client that closes its connection
// while its chat waits on the LLM cancels the chat, through every wrapper
// the worker puts around the socket.
func TestChatCancelledWhenClientGoesAway(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "SIMULATED_LATENCY=60s")
	conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.port))
	if err != nil {
		t.Fatal(err)
	}
	body := `{"agent_id":"default","message":"long"}`
	fmt.Fprintf(conn, "POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	var started activity
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.started")
		if err != nil || len(p.Activities) == 0 {
			return fmt.Errorf("no chat.started yet (%v)", err)
		}
		started = p.Activities[0]
		return nil
	})
	conn.Close()
	waitFor(t, 5*time.Second, func() error {
		p, err := s.activities("type=chat.cancelled")
		if err != nil {
			return err
		}
		for _, a := range p.Activities {
			if a.ChatID == started.ChatID && a.Data["reason"] == "client_disconnected" {
				return nil
			}
		}
		return fmt.Errorf("chat %s not cancelled with client_disconnected after its client closed: %+v", started.ChatID, p.Activities)
	})
}

func TestUnusableDatabaseExits3(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	notDir := filepath.Join(dir, "file")
	os.WriteFile(notDir, []byte("x"), 0o644)
	garbage := filepath.Join(dir, "garbage.db")
	os.WriteFile(garbage, bytes.Repeat([]byte("not a database "), 1000), 0o644)
	for _, path := range []string{filepath.Join(notDir, "server.db"), garbage} {
		s := launch(t, "DATABASE_URL=sqlite:"+path)
		if code, want := s.wait(20*time.Second), documentedExit(t, "the store cannot be opened"); code != want {
			t.Errorf("DATABASE_URL=sqlite:%s: exit %d, want %d", path, code, want)
		}
		if got := s.startFailure(t); !strings.Contains(got, path) {
			t.Errorf("DATABASE_URL=sqlite:%s: error %q does not name the file", path, got)
		}
	}
}

// TestInstanceIDInUse: a second server on the same database with the same
// instance id exits 3 naming the id, and a chat in flight on the first one
// completes: the second never reached FailAllStarted, which would have
// failed it. Another instance id is welcome.
func TestInstanceIDInUse(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "server.db")
	a := startServer(t, "WORKERS=1", "SIMULATED_LATENCY=3s", "DATABASE_URL=sqlite:"+db)
	reply := make(chan chatReply, 1)
	go func() { reply <- a.chat(&http.Client{Timeout: 30 * time.Second}, "in flight", false) }()
	waitFor(t, 10*time.Second, func() error {
		p, err := a.activities("type=chat.started")
		if err == nil && len(p.Activities) == 0 {
			err = errors.New("no chat started yet")
		}
		return err
	})

	b := launch(t, "WORKERS=1", "DATABASE_URL=sqlite:"+db, "CONTROL_SOCKET="+filepath.Join(t.TempDir(), "b.sock"))
	if code, want := b.wait(20*time.Second), documentedExit(t, "instance id is in use"); code != want {
		t.Errorf("second server with the same instance id: exit %d, want %d", code, want)
	}
	out := b.startFailure(t)
	for _, want := range []string{"claim instance id", db, "--instance-id"} {
		if !strings.Contains(out, want) {
			t.Errorf("second server's error %q lacks %q", out, want)
		}
	}
	if r := <-reply; r.status != 200 {
		t.Errorf("chat in flight on the first server = %d %s %v, want 200", r.status, r.body, r.err)
	}

	c := startServer(t, "WORKERS=1", "DATABASE_URL=sqlite:"+db, "INSTANCE_ID=second", "CONTROL_SOCKET="+filepath.Join(t.TempDir(), "c.sock"))
	if r := c.chat(fresh, "on the second instance", false); r.status != 200 {
		t.Errorf("chat on a server with its own instance id = %d %s %v", r.status, r.body, r.err)
	}
}

// TestAccessLogClientBehindProxy: the access log's remote is the client
// X-Forwarded-For names when the peer is a trusted proxy, and the peer
// otherwise.
func TestAccessLogClientBehindProxy(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{nil, "10.0.0.1"}, // default: trust 127.0.0.1 only
		{[]string{"FORWARDED_ALLOW_IPS=127.0.0.1,10.0.0.0/8"}, "203.0.113.7"},
		{[]string{"PROXY_HEADERS=false"}, "127.0.0.1"},
	} {
		s := startServer(t, append([]string{"WORKERS=1", "ACCESS_LOG=true"}, tc.env...)...)
		req, _ := http.NewRequest("GET", s.url("/health"), nil)
		req.Header.Set("X-Forwarded-For", "203.0.113.7, 10.0.0.1")
		resp, err := fresh.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		waitFor(t, 5*time.Second, func() error {
			lines := s.logs.find("request", map[string]any{"path": "/health"})
			if len(lines) == 0 {
				return errors.New("no access log line yet")
			}
			if got := lines[len(lines)-1]["remote"]; got != tc.want {
				return fmt.Errorf("%v: access log remote %v, want %s", tc.env, got, tc.want)
			}
			return nil
		})
		s.stop()
	}
}

func TestStreamsFlowWithAccessLog(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "ACCESS_LOG=true", "SIMULATED_LATENCY=30s")
	// A buffered stream would send nothing for 30 s; the client gives up
	// at 15.
	client := &http.Client{Timeout: 15 * time.Second}
	resp, err := client.Post(s.url("/api/chat"), "application/json",
		strings.NewReader(`{"agent_id":"default","message":"stream it","stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "event: delta\n" {
		t.Fatalf("first line of the stream = %q, %v; want event: delta before the reply is over", line, err)
	}
}

// TestStreamHeadersBeforeFirstToken: a streamed chat answers its status and
// headers at once, before the upstream sends anything, so a client (an
// EventSource's onopen, a proxy's header timeout) knows the chat is
// running; the keep-alive comment comes only 15 s later.
func TestStreamHeadersBeforeFirstToken(t *testing.T) {
	t.Parallel()
	fake := newFakeLLM(t)
	s := startServer(t, "WORKERS=1", "LLM_BASE_URL="+fake.baseURL(), "LLM_TIMEOUT=30s")
	client := &http.Client{Timeout: 5 * time.Second}
	start := time.Now()
	resp, err := client.Post(s.url("/api/chat"), "application/json",
		strings.NewReader(`{"agent_id":"default","message":"first-byte-never stream","stream":true}`))
	if err != nil {
		t.Fatalf("headers of a streamed chat whose upstream has not answered: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Errorf("got %d %q after %v, want 200 text/event-stream", resp.StatusCode, resp.Header.Get("Content-Type"), time.Since(start))
	}
}
