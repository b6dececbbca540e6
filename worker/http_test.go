package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"
)

// serveHTTP serves h through HTTPHandler and guard on a loopback port, as
// a worker does, and returns the server, its URL and the log.
func serveHTTP(t *testing.T, h http.Handler) (*fasthttp.Server, string, *bytes.Buffer) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	w := &worker{log: zerolog.New(&logs), cfg: Config{Handler: HTTPHandler(h), Error: writeError}}
	srv := &fasthttp.Server{Handler: w.guard}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown() })
	return srv, "http://" + ln.Addr().String(), &logs
}

// TestHTTPHandlerContextOutlivesTheDrainStart: as with net/http's
// Shutdown, a request in flight keeps its context when the server starts
// to drain, and finishes.
func TestHTTPHandlerContextOutlivesTheDrainStart(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	srv, url, _ := serveHTTP(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(arrived)
		select {
		case <-r.Context().Done():
			http.Error(w, "context cancelled: "+context.Cause(r.Context()).Error(), http.StatusServiceUnavailable)
		case <-release:
			io.WriteString(w, "finished")
		}
	}))
	type answer struct {
		code int
		body string
		err  error
	}
	got := make(chan answer, 1)
	go func() {
		resp, err := http.Get(url)
		if err != nil {
			got <- answer{err: err}
			return
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		got <- answer{resp.StatusCode, string(b), err}
	}()
	<-arrived
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- srv.ShutdownWithContext(ctx) }()
	// The drain has begun once the listener refuses new connections.
	addr := strings.TrimPrefix(url, "http://")
	for deadline := time.Now().Add(5 * time.Second); ; {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the server still accepts 5 s after its shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}
	close(release)
	if a := <-got; a.err != nil || a.code != 200 || a.body != "finished" {
		t.Errorf("request in flight during the drain = %d %q, %v; want 200 finished", a.code, a.body, a.err)
	}
	if err := <-shut; err != nil {
		t.Errorf("shutdown = %v", err)
	}
}

// TestHTTPHandlerPanicIsLoggedWithItsValue: the log names the handler's
// panic value and its frame, not the adaptor's own re-panic.
func TestHTTPHandlerPanicIsLoggedWithItsValue(t *testing.T) {
	_, url, logs := serveHTTP(t, http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		panicInTheHandler()
	}))
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusInternalServerError {
		t.Errorf("panicking handler answered %d, want 500", resp.StatusCode)
	}
	var line struct{ Panic, Stack, Message string }
	if err := json.Unmarshal(logs.Bytes(), &line); err != nil {
		t.Fatalf("log %q: %v", logs, err)
	}
	if line.Message != "handler panicked" || line.Panic != "boom in the handler" || !strings.Contains(line.Stack, "panicInTheHandler") {
		t.Errorf("panic logged as %q, panic %q, stack:\n%s\nwant the handler's value and frame", line.Message, line.Panic, line.Stack)
	}
}

func panicInTheHandler() { panic("boom in the handler") }
