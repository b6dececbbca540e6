package llm

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeUpstream is a real HTTP server speaking the OpenAI chat.completions
// streaming wire format. Each test scripts it with a handler that receives
// the 1-based hit number.
type fakeUpstream struct {
	t      *testing.T
	srv    *httptest.Server
	quit   chan struct{} // closed at cleanup: waiting handlers return
	hits   atomic.Int32
	conns  atomic.Int32 // TCP connections accepted
	script func(hit int, w http.ResponseWriter, r *http.Request)

	mu   sync.Mutex
	seen []seenRequest
}

type seenRequest struct {
	auth   string
	header http.Header
	query  string
	body   chatRequest
}

func newFake(t *testing.T, script func(hit int, w http.ResponseWriter, r *http.Request)) *fakeUpstream {
	t.Helper()
	f := &fakeUpstream{t: t, quit: make(chan struct{}), script: script}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			f.conns.Add(1)
		}
	}
	f.srv.Start()
	t.Cleanup(func() {
		close(f.quit)
		f.srv.Close()
	})
	return f
}

func (f *fakeUpstream) serve(w http.ResponseWriter, r *http.Request) {
	hit := int(f.hits.Add(1))
	if r.Method != http.MethodPost || r.URL.Path != "/v1/chat/completions" {
		f.t.Errorf("fake upstream got %s %s, want POST /v1/chat/completions", r.Method, r.URL.Path)
		http.NotFound(w, r)
		return
	}
	var body chatRequest
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		f.t.Errorf("fake upstream: decode request body: %v", err)
		http.Error(w, "bad json", http.StatusBadRequest)
		return
	}
	f.mu.Lock()
	f.seen = append(f.seen, seenRequest{auth: r.Header.Get("Authorization"), header: r.Header.Clone(), query: r.URL.RawQuery, body: body})
	f.mu.Unlock()
	f.script(hit, w, r.WithContext(context.WithValue(r.Context(), quitKey{}, f.quit)))
}

func (f *fakeUpstream) requests() []seenRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]seenRequest(nil), f.seen...)
}

// client returns an OpenAI client for the fake with cfg's other fields; its
// idle connections are closed at cleanup.
func (f *fakeUpstream) client(cfg OpenAIConfig) *OpenAI {
	f.t.Helper()
	cfg.BaseURL = f.srv.URL + "/v1" + cfg.BaseURL // a test may give a query
	c, err := NewOpenAI(cfg)
	if err != nil {
		f.t.Fatalf("NewOpenAI: %v", err)
	}
	f.t.Cleanup(c.http.CloseIdleConnections)
	return c
}

type quitKey struct{}

// waitGone blocks a fake's handler until the client goes away or the test ends.
func waitGone(r *http.Request) {
	quit, _ := r.Context().Value(quitKey{}).(chan struct{})
	select {
	case <-r.Context().Done():
	case <-quit:
	}
}

func startStream(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
}

func send(w http.ResponseWriter, raw string) {
	fmt.Fprint(w, raw)
	w.(http.Flusher).Flush()
}

func sendData(w http.ResponseWriter, payload string) { send(w, "data: "+payload+"\n\n") }

func contentChunk(content string) string {
	c, _ := json.Marshal(content)
	return `{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"fake-model-0613",` +
		`"choices":[{"index":0,"delta":{"content":` + string(c) + `},"finish_reason":null}],"usage":null}`
}

const finishChunk = `{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"fake-model-0613",` +
	`"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}`

func usageChunk(prompt, completion int) string {
	return fmt.Sprintf(`{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"fake-model-0613",`+
		`"choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`,
		prompt, completion, prompt+completion)
}

// streamReply sends a whole well-formed reply: one role chunk, one chunk per
// delta, the finish chunk, the usage chunk and [DONE].
func streamReply(w http.ResponseWriter, deltas ...string) {
	startStream(w)
	sendData(w, `{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"fake-model-0613",`+
		`"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}],"usage":null}`)
	for _, d := range deltas {
		sendData(w, contentChunk(d))
	}
	sendData(w, finishChunk)
	sendData(w, usageChunk(11, len(deltas)))
	sendData(w, "[DONE]")
}

// hijackClose cuts the connection under a response without ending it.
func hijackClose(t *testing.T, w http.ResponseWriter) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	conn.Close()
}

// collector records deltas.
type collector struct{ deltas []string }

func (c *collector) add(d string) error {
	c.deltas = append(c.deltas, d)
	return nil
}

// waitFor polls cond until it returns nil or d passes.
func waitFor(t *testing.T, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", d, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// checkGoroutines fails the test if, once every later cleanup has run, the
// number of goroutines does not settle back to what it is now. Call it first
// in a test so that its cleanup runs last. Tests that use it must not be
// parallel.
func checkGoroutines(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			now := runtime.NumGoroutine()
			if now <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutines = %d, want <= %d after cleanup; stacks:\n%s", now, before, buf)
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

func joinDeltas(d []string) string { return strings.Join(d, "") }
