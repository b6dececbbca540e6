package main

import (
	"bufio"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// Background chats against a misbehaving upstream, through the binary and
// the fake LLM (a real HTTP server): which failures are retried and after
// how long, and that a cancellation closes the upstream request.

// TestBackgroundUpstreamRetries: a 429 with Retry-After is retried no
// sooner than the upstream asked; a 5xx, a timeout and a cut stream are
// retried with backoff until --chat-max-attempts, then fail with their
// error; a 4xx is not retried.
func TestBackgroundUpstreamRetries(t *testing.T) {
	t.Parallel()
	llm := newFakeLLM(t)
	s := startServer(t, "WORKERS=1", "LLM_BASE_URL="+llm.baseURL(), "LLM_TIMEOUT=1s", "CHAT_MAX_ATTEMPTS=2",
		"METRICS_ADDR=127.0.0.1:0", "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")

	cases := []struct {
		message  string
		status   string // final status
		attempts int
		code     string // error code when failed
		minGap   time.Duration
	}{
		// Retry-After: 2 on the first answer: the second request comes at
		// least 2 s after the first, where the backoff alone would wait
		// 0.5 to 1 s.
		{"slow-down retry-after", "completed", 2, "", 2 * time.Second},
		// No Retry-After: backoff of 1 s, jittered down to half.
		{"503 server error", "failed", 2, "upstream_error", 500 * time.Millisecond},
		{"first-byte-never timeout", "failed", 2, "upstream_timeout", 500 * time.Millisecond},
		{"reset cut stream", "failed", 2, "upstream_error", 500 * time.Millisecond},
		{"bad-request client error", "failed", 1, "upstream_error", 0},
	}
	ids := make([]string, len(cases))
	for i, c := range cases {
		ids[i] = startBackground(t, base, c.message)
	}
	for i, c := range cases {
		done, err := getChat(base, ids[i], 30)
		if err != nil || done.Status != c.status || done.Attempts != c.attempts ||
			(c.code != "" && (done.Error == nil || done.Error.Code != c.code)) {
			t.Errorf("chat %q = %+v (error %+v), %v, want %s after %d attempts (error %q)", c.message, done, done.Error, err, c.status, c.attempts, c.code)
			continue
		}
		at := llm.arrivals(c.message)
		if len(at) != c.attempts {
			t.Errorf("upstream requests for %q = %d, want %d", c.message, len(at), c.attempts)
			continue
		}
		if c.attempts == 2 {
			if gap := at[1].Sub(at[0]); gap < c.minGap {
				t.Errorf("chat %q: second upstream request %v after the first, want at least %v", c.message, gap.Round(time.Millisecond), c.minGap)
			} else {
				t.Logf("chat %q: second upstream request %v after the first", c.message, gap.Round(time.Millisecond))
			}
		}
	}
	// Each retry is in the feed, with the reason.
	feed, err := getFeed(fresh, s.url("/api/activities?type=chat.retried&limit=50"))
	if err != nil || len(feed.Activities) != 4 {
		t.Fatalf("chat.retried activities = %+v, %v, want 4 (one per retried chat)", feed.Activities, err)
	}
	// And in /metrics and the status, database-wide.
	murl := s.metricsURL(t)
	waitFor(t, 5*time.Second, func() error {
		_, text := get(t, murl+"/metrics", "")
		if n, _ := sample(text, "corral_chat_queue_retries_total"); n != 4 {
			return fmt.Errorf("corral_chat_queue_retries_total = %v, want 4", n)
		}
		if _, status := get(t, murl+"/status.json", ""); !strings.Contains(status, `{"name":"chats retried","value":"4"}`) {
			return fmt.Errorf("/status.json = %s, want chats retried 4", status)
		}
		return nil
	})
}

// TestCancelClosesUpstream: cancelling a chat, background or synchronous,
// closes its upstream request: the fake LLM, which holds the request open
// waiting to answer, sees its connection closed within a second.
func TestCancelClosesUpstream(t *testing.T) {
	t.Parallel()
	llm := newFakeLLM(t)
	s := startServer(t, "WORKERS=2", "LLM_BASE_URL="+llm.baseURL(), "LOG_LEVEL=info")
	base := strings.TrimSuffix(s.url(""), "/")

	hungUp := func(msg string, cancelled time.Time) {
		t.Helper()
		waitFor(t, 2*time.Second, func() error {
			if h := llm.hangupsFor(msg); len(h) != 1 {
				return fmt.Errorf("upstream hang-ups for %q = %d, want 1", msg, len(h))
			}
			return nil
		})
		if d := llm.hangupsFor(msg)[0].Sub(cancelled); d > time.Second {
			t.Fatalf("upstream request of %q closed %v after the cancel, want within 1s", msg, d.Round(time.Millisecond))
		} else {
			t.Logf("upstream request of %q closed %v after the cancel", msg, d.Round(time.Millisecond))
		}
	}
	upstreamWaiting := func(msg string) {
		t.Helper()
		waitFor(t, 10*time.Second, func() error {
			if n := len(llm.arrivals(msg)); n != 1 {
				return fmt.Errorf("upstream requests for %q = %d, want 1", msg, n)
			}
			return nil
		})
	}

	// Background: the chat runs in some worker, the cancel arrives on any.
	msg := "first-byte-never background"
	id := startBackground(t, base, msg)
	waitRunning(t, base, id, 0)
	upstreamWaiting(msg)
	cancelled := time.Now()
	if code, _, b := postJSON(t, base+"/api/chats/"+id+"/cancel", ""); code != 200 {
		t.Fatalf("POST cancel = %d %s, want 200", code, b)
	}
	hungUp(msg, cancelled)

	// Synchronous, streamed so that the chat id arrives before the reply.
	msg = "first-byte-never synchronous"
	req, _ := http.NewRequest("POST", base+"/api/chat", strings.NewReader(fmt.Sprintf(`{"agent_id":"default","message":%q,"stream":true}`, msg)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("POST streamed chat: %v", err)
	}
	defer resp.Body.Close()
	sid := resp.Header.Get("X-Chat-Id")
	if resp.StatusCode != 200 || sid == "" {
		t.Fatalf("POST streamed chat = %d, X-Chat-Id %q, want 200 and an id", resp.StatusCode, sid)
	}
	upstreamWaiting(msg)
	cancelled = time.Now()
	if code, _, b := postJSON(t, base+"/api/chats/"+sid+"/cancel", ""); code != 200 {
		t.Fatalf("POST cancel of the synchronous chat = %d %s, want 200", code, b)
	}
	hungUp(msg, cancelled)
	var last string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "event: ") {
			last = sc.Text()
		}
	}
	if last != "event: error" {
		t.Fatalf("last event of the cancelled stream = %q, want event: error", last)
	}
}
