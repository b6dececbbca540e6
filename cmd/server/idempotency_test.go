package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestIdempotencyKeyAfterUnansweredChat: a client whose synchronous chat
// was cut off retries with its Idempotency-Key and gets a new chat's
// answer, not a replay of the cancellation it never saw; so does a retry
// that was already waiting on the first chat when its client left.
func TestIdempotencyKeyAfterUnansweredChat(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "METRICS_ADDR=127.0.0.1:0", "SIMULATED_LATENCY=4s")
	metrics := s.metricsURL(t)
	type answer struct {
		code    int
		header  http.Header
		body    string
		elapsed time.Duration
		err     error
	}
	post := func(ctx context.Context, key string) answer {
		req, _ := http.NewRequestWithContext(ctx, "POST", s.url("/api/chat"),
			strings.NewReader(`{"agent_id":"default","message":"cut off"}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Idempotency-Key", key)
		start := time.Now()
		resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
		if err != nil {
			return answer{err: err}
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return answer{resp.StatusCode, resp.Header, string(b), time.Since(start), err}
	}
	started := func() map[string]bool {
		ids := map[string]bool{}
		p, err := s.activities("type=chat.started")
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range p.Activities {
			ids[a.ChatID] = true
		}
		return ids
	}
	// startCut starts a chat with key and returns its id and the function
	// that hangs its client up.
	startCut := func(key string) (string, func()) {
		before := started()
		ctx, hangUp := context.WithCancel(t.Context())
		go post(ctx, key)
		var id string
		waitFor(t, 10*time.Second, func() error {
			for c := range started() {
				if !before[c] {
					id = c
					return nil
				}
			}
			return fmt.Errorf("no new chat started")
		})
		return id, hangUp
	}
	waitCancelled := func(id string) {
		waitFor(t, 10*time.Second, func() error {
			if c, err := getChat(s.url(""), id, 0); err != nil || c.Status != "cancelled" {
				return fmt.Errorf("chat %s = %+v, %v; want cancelled", id, c, err)
			}
			return nil
		})
	}
	fresh := func(what, firstID string, a answer) {
		t.Helper()
		if a.err != nil || a.code != 200 || a.header.Get("Idempotent-Replayed") != "" ||
			a.header.Get("X-Chat-Id") == "" || a.header.Get("X-Chat-Id") == firstID {
			t.Fatalf("%s = %d %s (X-Chat-Id %q, Idempotent-Replayed %q), %v; want 200 from a new chat, not %s",
				what, a.code, a.body, a.header.Get("X-Chat-Id"), a.header.Get("Idempotent-Replayed"), a.err, firstID)
		}
	}

	// The client hangs up, the chat is cancelled, the client retries.
	first, hangUp := startCut("key-cut")
	hangUp()
	waitCancelled(first)
	fresh("retry after the first client hung up", first, post(t.Context(), "key-cut"))

	// The retry arrives first and waits on the chat; then the first client
	// hangs up.
	first, hangUp = startCut("key-joined")
	retried := make(chan answer, 1)
	go func() { retried <- post(t.Context(), "key-joined") }()
	waitFor(t, 10*time.Second, func() error { // the worker's heartbeat carries its gauges
		_, page := get(t, metrics+"/metrics", "")
		if n, _ := sample(page, `corral_http_requests_in_flight{worker="1",route="/api/chat"}`); n != 2 {
			return fmt.Errorf("/api/chat requests in flight = %v, want 2", n)
		}
		return nil
	})
	hangUp()
	waitCancelled(first)
	fresh("a retry waiting on the chat when its first client hung up", first, <-retried)
}
