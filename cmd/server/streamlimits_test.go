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

const feedRequest = "GET /api/activities/stream HTTP/1.1\r\nHost: localhost\r\n\r\n"

// streamedChat is a "stream": true chat whose upstream (the fake LLM's
// drip fault) sends one token at once and then one every 10 s, so that the
// chat's stream stays open until the client leaves.
func streamedChat() string {
	body := `{"agent_id":"default","message":"drip hold","stream":true}`
	return fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
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
	t.Parallel()
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
		"GET /api/agents HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
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

// TestAgentsPagedAndBounded creates agents from many clients at once
// through two workers with LIMIT_AGENTS=150: exactly the limit is created,
// the rest get 409 naming it. GET /api/agents answers 100 by default with
// a next_after that pages through every agent once, in creation order;
// limit and after are checked; deleting an agent makes room again.
func TestAgentsPagedAndBounded(t *testing.T) {
	t.Parallel()
	const limit = 150
	s := startServer(t, "WORKERS=2", "LIMIT_AGENTS="+strconv.Itoa(limit))
	client := &http.Client{Timeout: 20 * time.Second}
	post := func(i int) (int, string) {
		body := fmt.Sprintf(`{"name":"agent %d","system_prompt":"p"}`, i)
		resp, err := client.Post(s.url("/api/agents"), "application/json", strings.NewReader(body))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	// The default agent is one of the limit; 40 more are tried than fit.
	const tries = limit - 1 + 40
	statuses := make(chan [2]string, tries)
	sem := make(chan struct{}, 16)
	for i := range tries {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			st, body := post(i)
			statuses <- [2]string{strconv.Itoa(st), body}
		}()
	}
	created, refused := 0, 0
	for range tries {
		r := <-statuses
		switch {
		case r[0] == "201":
			created++
		case r[0] == "409" && isErrorJSON(r[1], "conflict") && strings.Contains(r[1], "150 agents"):
			refused++
		default:
			t.Errorf("POST /api/agents: %s %s, want 201 or 409 naming the limit", r[0], r[1])
		}
	}
	if created != limit-1 || refused != 40 {
		t.Fatalf("created %d, refused %d; want %d and 40", created, refused, limit-1)
	}

	type page struct {
		Agents []struct {
			ID string `json:"id"`
		} `json:"agents"`
		NextAfter *string `json:"next_after"`
	}
	get := func(query string) (int, page, string) {
		t.Helper()
		resp, err := client.Get(s.url("/api/agents" + query))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		var p page
		if resp.StatusCode == 200 {
			if err := json.Unmarshal(b, &p); err != nil {
				t.Fatalf("GET /api/agents%s: %v in %s", query, err, b)
			}
		}
		return resp.StatusCode, p, string(b)
	}
	_, all, _ := get("?limit=500")
	if len(all.Agents) != limit || all.NextAfter != nil || all.Agents[0].ID != "default" {
		t.Fatalf("?limit=500: %d agents, next_after %v; want %d starting with default and no next_after", len(all.Agents), all.NextAfter, limit)
	}
	var paged []string
	query, sizes := "", []int{}
	for range 5 {
		st, p, body := get(query)
		if st != 200 {
			t.Fatalf("GET /api/agents%s: %d %s", query, st, body)
		}
		sizes = append(sizes, len(p.Agents))
		for _, a := range p.Agents {
			paged = append(paged, a.ID)
		}
		if p.NextAfter == nil {
			break
		}
		query = "?after=" + *p.NextAfter
	}
	if fmt.Sprint(sizes) != "[100 50]" {
		t.Errorf("page sizes %v, want [100 50]", sizes)
	}
	for i, a := range all.Agents {
		if i >= len(paged) || paged[i] != a.ID {
			t.Fatalf("paged ids differ from the single page at %d: %v vs %v", i, paged, all.Agents)
		}
	}
	for _, q := range []string{"?limit=0", "?limit=501", "?limit=x", "?after=bogus", "?after=" + strings.Repeat("A", 40)} {
		if st, _, body := get(q); st != 400 || !isErrorJSON(body, "bad_request") || !strings.Contains(body, "parameter") {
			t.Errorf("GET /api/agents%s: %d %s, want 400 naming the parameter", q, st, body)
		}
	}

	// A cursor survives the deletion of its agent, and the deletion makes
	// room for one more.
	_, first, _ := get("?limit=2")
	req, _ := http.NewRequest("DELETE", s.url("/api/agents/"+first.Agents[1].ID), nil)
	resp, err := client.Do(req)
	if err != nil || resp.StatusCode != 204 {
		t.Fatalf("DELETE: %v %v", err, resp)
	}
	resp.Body.Close()
	if st, p, body := get("?limit=1&after=" + *first.NextAfter); st != 200 || len(p.Agents) != 1 || p.Agents[0].ID != all.Agents[2].ID {
		t.Errorf("page after a deleted agent's cursor: %d %s, want %s", st, body, all.Agents[2].ID)
	}
	if st, body := post(9999); st != 201 {
		t.Errorf("POST after a deletion: %d %s, want 201", st, body)
	}
	if st, body := post(10000); st != 409 {
		t.Errorf("POST past the limit again: %d %s, want 409", st, body)
	}
}

// TestStreamsPerClientLimit lets one client, named by X-Forwarded-For from
// the trusted local proxy, hold three event streams and long-polls with
// LIMIT_STREAMS_PER_CLIENT=3: the fourth of either kind is 429 with
// Retry-After, while another client and the first client's ordinary
// requests are served; a closed stream makes room again.
func TestStreamsPerClientLimit(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServer(t, "WORKERS=1", "LIMIT_STREAMS_PER_CLIENT=3", "CONTROL_SOCKET="+sock)
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	as := func(client, req string) string {
		return strings.Replace(req, "\r\n", "\r\nX-Forwarded-For: "+client+"\r\n", 1)
	}
	const a, b = "203.0.113.7", "203.0.113.8"
	const longPoll = "GET /api/activities?after=1000000&wait=30 HTTP/1.1\r\nHost: localhost\r\n\r\n"

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for range 2 {
		c, resp := openStream(t, addr, as(a, feedRequest))
		held = append(held, c)
		if resp.StatusCode != 200 {
			t.Fatalf("feed %d of client a: %d, want 200", len(held), resp.StatusCode)
		}
	}
	poll, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	held = append(held, poll)
	io.WriteString(poll, as(a, longPoll))
	waitFor(t, 10*time.Second, func() error {
		n, err := statusInFlight(t, sock)
		if err != nil {
			return err
		}
		if len(n) != 1 || n[0] != 3 {
			return fmt.Errorf("in_flight %v, want [3]: two feeds and a long-poll", n)
		}
		return nil
	})

	for _, req := range []string{feedRequest, longPoll} {
		c, resp := openStream(t, addr, as(a, req))
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "5" || !isErrorJSON(string(body), "too_many_requests") || !strings.Contains(string(body), "--limit-streams-per-client") {
			t.Errorf("%s, the fourth of client a: %d (Retry-After %q) %s; want 429 naming the limit, Retry-After 5",
				strings.SplitN(req, "\r\n", 2)[0], resp.StatusCode, resp.Header.Get("Retry-After"), body)
		}
	}
	// Client a's requests that hold nothing are served; client b is not
	// limited by a.
	c, resp := openStream(t, addr, as(a, "GET /api/activities?wait=30 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"))
	c.Close()
	if resp.StatusCode != 200 {
		t.Errorf("client a's long-poll that finds activities at once: %d, want 200", resp.StatusCode)
	}
	c, resp = openStream(t, addr, as(b, feedRequest))
	c.Close()
	if resp.StatusCode != 200 {
		t.Errorf("client b's feed: %d, want 200", resp.StatusCode)
	}

	// Client a closes a feed: its place is free again.
	held[0].Close()
	waitFor(t, 10*time.Second, func() error {
		c, resp := openStream(t, addr, as(a, feedRequest))
		c.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("client a's feed after closing one: %d, want 200", resp.StatusCode)
		}
		return nil
	})
}
