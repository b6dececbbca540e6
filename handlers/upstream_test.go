package handlers

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/corralhq/corral/handlers/llm"
)

// testAPIKey is the key the handlers' LLM client sends upstream; no answer
// of ours may ever contain it.
const testAPIKey = "sk-test-0123456789abcdef"

// upstream is a fake OpenAI-compatible LLM server: a real HTTP server on a
// loopback port that answers POST /v1/chat/completions with whatever its
// script writes, in the chat.completions event-stream format. It records
// when each request arrived and when its context ended (the client went
// away).
type upstream struct {
	t      *testing.T
	srv    *httptest.Server
	script func(w http.ResponseWriter, r *http.Request)
	quit   chan struct{} // closed at cleanup, so blocked scripts return

	mu       sync.Mutex
	arrived  []time.Time
	canceled []time.Time
}

func newUpstream(t *testing.T, script func(w http.ResponseWriter, r *http.Request)) *upstream {
	t.Helper()
	u := &upstream{t: t, script: script, quit: make(chan struct{})}
	u.srv = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(func() {
		close(u.quit)
		u.srv.Close()
	})
	return u
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != "/v1/chat/completions" {
		u.t.Errorf("upstream got %s %s, want POST /v1/chat/completions", r.Method, r.URL.Path)
		http.NotFound(w, r)
		return
	}
	if got, want := r.Header.Get("Authorization"), "Bearer "+testAPIKey; got != want {
		u.t.Errorf("upstream Authorization = %q, want %q", got, want)
	}
	var body struct {
		Model    string        `json:"model"`
		Messages []llm.Message `json:"messages"`
		Stream   bool          `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		u.t.Errorf("upstream: decode request: %v", err)
	}
	if !body.Stream || len(body.Messages) != 2 || body.Messages[0].Role != "system" || body.Messages[1].Role != "user" {
		u.t.Errorf("upstream request = %+v, want a streamed system+user chat", body)
	}
	u.mu.Lock()
	u.arrived = append(u.arrived, time.Now())
	u.mu.Unlock()
	stop := context.AfterFunc(r.Context(), func() {
		u.mu.Lock()
		u.canceled = append(u.canceled, time.Now())
		u.mu.Unlock()
	})
	defer stop()
	// Scripts wait on r.Context(), which also ends at cleanup, so that a
	// client that never leaves cannot hold the server's Close.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	go func() {
		select {
		case <-u.quit:
			cancel()
		case <-ctx.Done():
		}
	}()
	u.script(w, r.WithContext(ctx))
}

// requests returns how many chat requests arrived.
func (u *upstream) requests() int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return len(u.arrived)
}

// cancelledAt returns when the first request's context ended while its
// script still ran, or the zero time.
func (u *upstream) cancelledAt() time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.canceled) == 0 {
		return time.Time{}
	}
	return u.canceled[0]
}

// client returns the OpenAI-compatible provider for this upstream. Retries
// are off unless retries > 0, so that failures are quick and counted.
func (u *upstream) client(retries int) *llm.OpenAI {
	u.t.Helper()
	if retries == 0 {
		retries = -1
	}
	c, err := llm.NewOpenAI(llm.OpenAIConfig{
		BaseURL:    u.srv.URL + "/v1",
		APIKey:     testAPIKey,
		Model:      "fake-model",
		MaxRetries: retries,
	})
	if err != nil {
		u.t.Fatalf("NewOpenAI: %v", err)
	}
	return c
}

// sseStart answers 200 with an event-stream content type.
func sseStart(w http.ResponseWriter) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	w.(http.Flusher).Flush()
}

// sseData writes one "data:" event and flushes it.
func sseData(w http.ResponseWriter, data string) {
	fmt.Fprintf(w, "data: %s\n\n", data)
	w.(http.Flusher).Flush()
}

// chunk is one chat.completion.chunk with a content delta and an
// optional finish reason.
func chunk(content, finish string) string {
	c := map[string]any{
		"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake-model-2024",
		"choices": []map[string]any{{
			"index": 0, "delta": map[string]any{"content": content}, "finish_reason": nil,
		}},
	}
	if finish != "" {
		c["choices"].([]map[string]any)[0]["finish_reason"] = finish
	}
	b, _ := json.Marshal(c)
	return string(b)
}

// usage is the final chunk that carries token counts.
func usage(prompt, completion int) string {
	return fmt.Sprintf(`{"id":"chatcmpl-test","object":"chat.completion.chunk","created":1700000000,"model":"fake-model-2024","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`,
		prompt, completion, prompt+completion)
}

// reply streams a complete answer made of deltas.
func reply(w http.ResponseWriter, deltas ...string) {
	sseStart(w)
	replyRest(w, deltas...)
}

// replyRest streams a complete answer on a started event stream.
func replyRest(w http.ResponseWriter, deltas ...string) {
	for _, d := range deltas {
		sseData(w, chunk(d, ""))
	}
	sseData(w, chunk("", "stop"))
	sseData(w, usage(17, len(deltas)))
	sseData(w, "[DONE]")
}

// cut drops the connection under a response in progress.
func cut(t *testing.T, w http.ResponseWriter) {
	c, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		t.Errorf("hijack: %v", err)
		return
	}
	c.Close()
}

// refusedURL returns a base URL where nothing listens: a port that was
// just free.
func refusedURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "http://" + addr + "/v1"
}
