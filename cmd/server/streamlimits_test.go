package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/corralhq/corral/supervisor"
)

// openStream sends a request on a new raw connection and reads the
// response's status line and headers, leaving its body (a stream) unread.
// The caller closes the connection.
func openStream(t *testing.T, addr, req string) (net.Conn, *http.Response) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatalf("write: %v", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		t.Fatalf("read the answer to %q: %v", strings.SplitN(req, "\r\n", 2)[0], err)
	}
	return c, resp
}

const feedRequest = "GET /api/activities/stream HTTP/1.1\r\nHost: x\r\n\r\n"

// streamedChat is a "stream": true chat whose upstream (the fake LLM's
// drip fault) sends one token at once and then one every 10 s, so that the
// chat's stream stays open until the client leaves.
func streamedChat() string {
	body := `{"agent_id":"default","message":"drip hold","stream":true}`
	return fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
}

// statusInFlight reads the workers' in_flight counts from server status.
func statusInFlight(t *testing.T, sock string) ([]int64, error) {
	t.Helper()
	code, out, errOut := cli(t, "status", "--json", "--control-socket", sock)
	var st supervisor.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
		return nil, fmt.Errorf("server status --json: exit %d, %q %q", code, out, errOut)
	}
	var n []int64
	for _, w := range st.Workers {
		n = append(n, w.InFlight)
	}
	return n, nil
}

// TestConcurrencyLimitCountsStreams holds an SSE feed and a streamed chat
// on one worker with LIMIT_CONCURRENCY=2: both are written after their
// handler returned, and both count until their last byte. A third request
// (a plain one, a feed, a chat) is 503 with Retry-After, /health still
// answers, status shows in_flight 2, and once a client leaves its slot is
// free again.
func TestConcurrencyLimitCountsStreams(t *testing.T) {
	fake := newFakeLLM(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServer(t, "WORKERS=1", "LIMIT_CONCURRENCY=2", "CONTROL_SOCKET="+sock,
		"LLM_BASE_URL="+fake.baseURL(), "LLM_TIMEOUT=60s", "LLM_IDLE_TIMEOUT=60s")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)

	feed, resp := openStream(t, addr, feedRequest)
	defer feed.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("feed: %d, want 200", resp.StatusCode)
	}
	chat, resp := openStream(t, addr, streamedChat())
	defer chat.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("streamed chat: %d %s, want a 200 event stream", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	waitFor(t, 10*time.Second, func() error {
		n, err := statusInFlight(t, sock)
		if err != nil {
			return err
		}
		if len(n) != 1 || n[0] != 2 {
			return fmt.Errorf("status in_flight = %v, want [2] (a feed and a streamed chat)", n)
		}
		return nil
	})
	for _, req := range []string{
		"GET /api/agents HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
		feedRequest,
		streamedChat(),
	} {
		c, resp := openStream(t, addr, req)
		c.Close()
		if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
			t.Errorf("%s over the limit: %d (Retry-After %q), want 503 with Retry-After", strings.SplitN(req, "\r\n", 2)[0], resp.StatusCode, resp.Header.Get("Retry-After"))
		}
	}
	if _, err := s.health(fresh); err != nil {
		t.Errorf("/health with the limit reached: %v, want 200 (exempt)", err)
	}

	// The feed's client leaves: its stream ends and frees its place.
	feed.Close()
	waitFor(t, 10*time.Second, func() error {
		resp, err := fresh.Get(s.url("/api/agents"))
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("GET /api/agents after the feed closed: %d, want 200", resp.StatusCode)
		}
		return nil
	})
	chat.Close()
	waitFor(t, 10*time.Second, func() error {
		n, err := statusInFlight(t, sock)
		if err != nil {
			return err
		}
		if len(n) != 1 || n[0] != 0 {
			return fmt.Errorf("status in_flight = %v after both clients left, want [0]", n)
		}
		return nil
	})
}
