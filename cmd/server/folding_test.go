package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestFoldedHeadersRefused sends requests with obsolete line folding (a
// header line that starts with a space or a tab) over raw TCP, each
// followed on the same connection by a pipelined GET /health that a server
// obeying the folded framing would answer as a second request: every one
// is answered 400 with the API's error shape and the connection closes
// after it. The same requests unfolded are served.
func TestFoldedHeadersRefused(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	const next = "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
	const post = "POST /api/agents HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
	agent := `{"name":"f","system_prompt":"p"}`
	chunked := fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(agent), agent)
	n := strconv.Itoa(len(agent))
	for _, tc := range []struct{ name, folded, plain string }{
		{"folded Transfer-Encoding",
			post + "Transfer-Encoding:\r\n chunked\r\n\r\n" + chunked,
			post + "Transfer-Encoding: chunked\r\n\r\n" + chunked},
		{"folded Content-Length",
			post + "Content-Length:\r\n " + n + "\r\n\r\n" + agent,
			post + "Content-Length: " + n + "\r\n\r\n" + agent},
		{"folded Content-Length with a tab",
			post + "Content-Length: \r\n\t" + n + "\r\n\r\n" + agent,
			post + "Content-Length: " + n + "\r\n\r\n" + agent},
		{"folded other header",
			"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Note: one\r\n two\r\n\r\n",
			"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Note: one two\r\n\r\n"},
		{"folded last header",
			"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Note: one\r\n\tx\r\n\r\n",
			"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Note: one\r\n\r\n"},
		{"first header line folded",
			"GET /health HTTP/1.1\r\n Host: localhost\r\n\r\n",
			"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st, body, closed, more := rawPipelined(t, addr, tc.folded+next)
			if st != http.StatusBadRequest || !isErrorJSON(body, "bad_request") {
				t.Fatalf("folded: %d %s, want 400 bad_request", st, body)
			}
			if tc.name != "first header line folded" && !strings.Contains(body, "obsolete line folding") {
				t.Errorf("folded: body %s does not name obsolete line folding", body)
			}
			if !closed {
				t.Errorf("folded: no Connection: close")
			}
			if more != "" {
				t.Errorf("folded: the pipelined request was answered too: %s", more)
			}
			// The control: the same request unfolded is served, and so is
			// the pipelined one after it.
			st, body, _, more = rawPipelined(t, addr, tc.plain+next)
			if st >= 400 {
				t.Errorf("unfolded: %d %s, want success", st, body)
			}
			if !strings.HasPrefix(more, "HTTP/1.1 200") {
				t.Errorf("unfolded: pipelined GET /health answered %q, want 200", more)
			}
		})
	}
	// A tab or space inside a value is no fold.
	st, body, _, _ := rawPipelined(t, addr, "GET /health HTTP/1.1\r\nHost: localhost\r\nX-Note: one \t two\r\n\r\n")
	if st != http.StatusOK {
		t.Errorf("inner whitespace: %d %s, want 200", st, body)
	}
}

// rawPipelined writes req on a new connection and returns the first
// response's status and body, whether it said Connection: close, and the status line of a second
// response if one follows before the connection closes ("" if none).
func rawPipelined(t *testing.T, addr, req string) (int, string, bool, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatalf("write: %v", err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatalf("read the first answer: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	line, err := br.ReadString('\n')
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("neither a second answer nor a close within 10s")
	}
	return resp.StatusCode, string(b), resp.Close, strings.TrimSpace(line)
}
