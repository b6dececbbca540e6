package main

// Fault tests, the upstream LLM: every way an OpenAI-compatible endpoint
// can misbehave, against one real worker. The fault tests (faults_*_test.go)
// run the real server (the test binary, see TestMain) against real sockets
// and files; their figures are logged with t.Logf (go test -v shows them)
// and recorded in docs/reliability.md.

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestUpstreamFaults runs every upstream fault at once against one worker
// and checks each chat's status, its activities, and that the worker's
// goroutines and open fds come back to where they were.
func TestUpstreamFaults(t *testing.T) {
	t.Parallel()
	fake := newFakeLLM(t)
	db := filepath.Join(t.TempDir(), "server.db")
	s := startServer(t, "WORKERS=1", "METRICS_ADDR=127.0.0.1:0", "LLM_BASE_URL="+fake.baseURL(),
		"LLM_TIMEOUT=3s", "LLM_IDLE_TIMEOUT=1s", "DATABASE_URL=sqlite:"+db)
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

	// Warm up: one good call, so that lazily started goroutines exist.
	if r := s.chat(client, "ok warm-up", false); r.status != 200 {
		t.Fatalf("warm-up chat = %d %s %v", r.status, r.body, r.err)
	}
	pid := s.workerPIDs()[0]
	// Goroutines: the worker's own count less those no request owns
	// (fasthttp's idle pool workers, kept up to 10 s after a burst, and the
	// job queue's), from /test/goroutines;
	// go_goroutines in /metrics is the same count, logged for reference.
	// Sockets: the worker's socket fds from /proc (the workers' /metrics
	// carry no process_open_fds, see docs/reliability.md); SQLite files
	// are left out because the pool keeps the connections a burst opened.
	type gauge struct{ goroutines, idlePool, sockets int }
	read := func() (gauge, error) {
		resp, err := fresh.Get(s.url("/test/goroutines"))
		if err != nil {
			return gauge{}, err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var g gauge
		if _, err := fmt.Sscan(string(b), &g.goroutines, &g.idlePool); err != nil {
			return gauge{}, fmt.Errorf("/test/goroutines = %q: %v", b, err)
		}
		g.sockets = socketFDs(pid)
		return g, nil
	}
	var before gauge
	waitFor(t, 10*time.Second, func() error {
		a, err := read()
		if err != nil {
			return err
		}
		b, err := read()
		if err != nil || a.goroutines-a.idlePool != b.goroutines-b.idlePool || a.sockets != b.sockets {
			return fmt.Errorf("worker gauges still moving: %+v then %+v (%v)", a, b, err)
		}
		before = b
		return nil
	})
	var metricsBefore float64
	waitFor(t, 10*time.Second, func() error {
		var ok bool
		if metricsBefore, ok = sample(s.metricsText(t), `go_goroutines{worker="1"}`); !ok {
			return fmt.Errorf("no go_goroutines for worker 1 in /metrics")
		}
		return nil
	})

	cases := []struct {
		fault   string
		stream  bool
		status  int    // HTTP status
		event   string // last SSE event for streams
		outcome string // terminal activity type
		reason  string // data.reason of chat.failed
		tries   int    // attempts the fake must have seen (0: any)
		minTook time.Duration
	}{
		{"ok", false, 200, "", "chat.completed", "", 1, 0},
		{"ok", true, 200, "done", "chat.completed", "", 1, 0},
		{"first-byte-never", false, 504, "", "chat.failed", "upstream_timeout", 1, time.Second},
		{"keepalive-only", false, 504, "", "chat.failed", "upstream_timeout", 1, 3 * time.Second},
		{"reset", true, 200, "error", "chat.failed", "upstream_error", 1, 0},
		{"reset", false, 502, "", "chat.failed", "upstream_error", 3, 0},
		{"429", false, 200, "", "chat.completed", "", 2, time.Second},
		{"503", false, 502, "", "chat.failed", "upstream_error", 3, 0},
		{"garbage", false, 502, "", "chat.failed", "upstream_error", 1, 0},
		{"drip", true, 200, "error", "chat.failed", "upstream_timeout", 1, time.Second},
		{"drip", false, 504, "", "chat.failed", "upstream_timeout", 1, time.Second},
	}
	replies := make([]chatReply, len(cases))
	var wg sync.WaitGroup
	for i, tc := range cases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			replies[i] = s.chat(client, fmt.Sprintf("%s #%d", tc.fault, i), tc.stream)
		}()
	}
	wg.Wait()
	for i, tc := range cases {
		r := replies[i]
		name := fmt.Sprintf("%s (stream=%v)", tc.fault, tc.stream)
		t.Logf("%-28s -> %d %s in %s, %d attempts", name, r.status, r.event, r.took.Round(time.Millisecond), fake.attemptsFor(fmt.Sprintf("%s #%d", tc.fault, i)))
		if r.err != nil || r.status != tc.status || r.event != tc.event {
			t.Errorf("%s: got %d event %q (%v) %s, want %d event %q", name, r.status, r.event, r.err, r.body, tc.status, tc.event)
		}
		if tc.status != 200 || tc.event == "error" {
			var e struct {
				Error struct{ Code string } `json:"error"`
			}
			json.Unmarshal([]byte(r.body), &e)
			if e.Error.Code != tc.reason {
				t.Errorf("%s: error code %q, want %q (%s)", name, e.Error.Code, tc.reason, r.body)
			}
		}
		if got := fake.attemptsFor(fmt.Sprintf("%s #%d", tc.fault, i)); tc.tries > 0 && got != tc.tries {
			t.Errorf("%s: upstream saw %d attempts, want %d", name, got, tc.tries)
		}
		if r.took < tc.minTook {
			t.Errorf("%s: answered in %s, want at least %s", name, r.took, tc.minTook)
		}
	}
	if now := s.workerPIDs(); len(now) != 1 || now[0] != pid {
		t.Errorf("worker pids %v after the faults, want the same worker %d", now, pid)
	}
	// No leak: the worker's goroutines and sockets settle back.
	var after gauge
	waitFor(t, 15*time.Second, func() error {
		var err error
		if after, err = read(); err != nil {
			return err
		}
		if after.goroutines-after.idlePool > before.goroutines-before.idlePool || after.sockets > before.sockets {
			return fmt.Errorf("worker goroutines %d (%d idle pool or job queue), sockets %d; before the faults %d (%d), %d",
				after.goroutines, after.idlePool, after.sockets, before.goroutines, before.idlePool, before.sockets)
		}
		return nil
	})
	metricsAfter, _ := sample(s.metricsText(t), `go_goroutines{worker="1"}`)
	t.Logf("worker goroutines less idle pool %d -> %d (go_goroutines in /metrics %v -> %v), socket fds %d -> %d, all fds %d",
		before.goroutines-before.idlePool, after.goroutines-after.idlePool, metricsBefore, metricsAfter, before.sockets, after.sockets, procFDs(pid))

	s.stop()
	chats, _ := readChats(t, db)
	for i, tc := range cases {
		c := chats[fmt.Sprintf("%s #%d", tc.fault, i)]
		if c == nil {
			t.Errorf("%s #%d: no chat in the database", tc.fault, i)
			continue
		}
		last, n := c.terminal()
		if n != 1 || last.Type != tc.outcome || (tc.reason != "" && last.Data["reason"] != tc.reason) {
			t.Errorf("%s #%d: activities %v (last %+v), want chat.started then one %s reason %q", tc.fault, i, c.types(), last, tc.outcome, tc.reason)
		}
	}
}
