package llm

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

var testReq = Request{Messages: []Message{
	{Role: "system", Content: "You are a test agent."},
	{Role: "user", Content: "Say hello."},
}}

func TestOpenAIStreamsReply(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		streamReply(w, "Hel", "lo, ", "wor", "ld!")
	})
	c := f.client(OpenAIConfig{APIKey: "sk-test-123", Model: "configured-model"})
	var got collector
	resp, err := c.Complete(context.Background(), testReq, got.add)
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	want := Response{Text: "Hello, world!", Provider: "openai", Model: "fake-model-0613",
		Usage: Usage{PromptTokens: 11, CompletionTokens: 4}}
	if resp != want {
		t.Errorf("Complete = %+v, want %+v", resp, want)
	}
	if d := strings.Join(got.deltas, "|"); d != "Hel|lo, |wor|ld!" {
		t.Errorf("deltas = %q, want in order Hel|lo, |wor|ld!", d)
	}
	reqs := f.requests()
	if len(reqs) != 1 {
		t.Fatalf("upstream hits = %d, want 1", len(reqs))
	}
	r := reqs[0]
	if r.auth != "Bearer sk-test-123" {
		t.Errorf("Authorization = %q, want %q", r.auth, "Bearer sk-test-123")
	}
	if r.body.Model != "configured-model" || !r.body.Stream || !r.body.StreamOptions.IncludeUsage {
		t.Errorf("request body = %+v, want model configured-model, stream, include_usage", r.body)
	}
	if len(r.body.Messages) != 2 || r.body.Messages[0] != testReq.Messages[0] || r.body.Messages[1] != testReq.Messages[1] {
		t.Errorf("messages sent = %+v, want %+v", r.body.Messages, testReq.Messages)
	}
}

// TestOpenAIHeadersQueryAndRequestID checks what Azure OpenAI needs (a
// query in the base URL, an api-key header) and the request id sent
// upstream; the client's own headers win over the extra ones.
func TestOpenAIHeadersQueryAndRequestID(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		streamReply(w, "ok")
	})
	c := f.client(OpenAIConfig{
		BaseURL: "?api-version=2024-10-21",
		APIKey:  "sk-test",
		Headers: http.Header{"Api-Key": {"azure-key"}, "Authorization": {"Bearer other"}, "X-Team": {"a", "b"}},
	})
	req := testReq
	req.RequestID = "rid-123"
	if _, err := c.Complete(context.Background(), req, nil); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	r := f.requests()[0]
	if r.query != "api-version=2024-10-21" {
		t.Errorf("upstream query = %q, want api-version=2024-10-21", r.query)
	}
	for k, want := range map[string]string{"Api-Key": "azure-key", "Authorization": "Bearer sk-test", "X-Request-Id": "rid-123", "X-Team": "a,b"} {
		if got := strings.Join(r.header.Values(k), ","); got != want {
			t.Errorf("upstream %s = %q, want %q", k, got, want)
		}
	}
}

func TestOpenAIModelAndKeyDefaults(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		startStream(w)
		sendData(w, `{"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":"stop"}]}`)
		sendData(w, "[DONE]")
	})
	c := f.client(OpenAIConfig{})
	resp, err := c.Complete(context.Background(), Request{Model: "asked-model", Messages: testReq.Messages}, nil)
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if resp.Model != "asked-model" || resp.Text != "ok" {
		t.Errorf("Complete = %+v, want model asked-model (upstream reported none), text ok", resp)
	}
	if _, err := c.Complete(context.Background(), testReq, nil); err != nil {
		t.Fatalf("Complete: %v", err)
	}
	reqs := f.requests()
	if reqs[0].body.Model != "asked-model" || reqs[1].body.Model != DefaultOpenAIModel {
		t.Errorf("models sent = %q, %q, want asked-model, %s", reqs[0].body.Model, reqs[1].body.Model, DefaultOpenAIModel)
	}
	if reqs[0].auth != "" {
		t.Errorf("Authorization = %q with no APIKey, want none", reqs[0].auth)
	}
}

func TestOpenAIRetriesTooManyRequests(t *testing.T) {
	for _, tc := range []struct {
		retryAfter string
		minElapsed time.Duration
	}{{"0", 0}, {"1", 900 * time.Millisecond}} {
		t.Run("Retry-After "+tc.retryAfter, func(t *testing.T) {
			checkGoroutines(t)
			f := newFake(t, func(hit int, w http.ResponseWriter, _ *http.Request) {
				if hit == 1 {
					w.Header().Set("Retry-After", tc.retryAfter)
					http.Error(w, `{"error":{"message":"slow down"}}`, http.StatusTooManyRequests)
					return
				}
				streamReply(w, "fine")
			})
			start := time.Now()
			resp, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
			if err != nil {
				t.Fatalf("Complete: %v", err)
			}
			if resp.Text != "fine" || f.hits.Load() != 2 {
				t.Errorf("Complete = %q after %d hits, want fine after 2", resp.Text, f.hits.Load())
			}
			if el := time.Since(start); el < tc.minElapsed {
				t.Errorf("Complete took %s, want >= %s (Retry-After %s)", el, tc.minElapsed, tc.retryAfter)
			}
		})
	}
}

func TestOpenAIRetryAfterBeyondTimeoutGivesUp(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusTooManyRequests)
	})
	_, err := f.client(OpenAIConfig{Timeout: 2 * time.Second}).Complete(context.Background(), testReq, nil)
	se, ok := errors.AsType[*StatusError](err)
	if !ok || se.Status != http.StatusTooManyRequests {
		t.Fatalf("Complete error = %v, want *StatusError 429", err)
	}
	if n := f.hits.Load(); n != 1 {
		t.Errorf("upstream hits = %d, want 1 (Retry-After exceeds Timeout)", n)
	}
}

func TestOpenAIServerErrorsExhaustRetries(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "boom", http.StatusInternalServerError)
	})
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
	if !errors.Is(err, ErrUpstream) {
		t.Fatalf("Complete error = %v, want ErrUpstream", err)
	}
	if se, ok := errors.AsType[*StatusError](err); !ok || se.Status != 500 || se.Body != "boom" {
		t.Errorf("Complete error = %#v, want *StatusError{500, boom}", err)
	}
	if n := f.hits.Load(); n != 3 {
		t.Errorf("upstream hits = %d, want 3 (1 + DefaultMaxRetries)", n)
	}
}

func TestOpenAIMaxRetriesNegativeDisablesRetries(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusBadGateway)
	})
	_, err := f.client(OpenAIConfig{MaxRetries: -1}).Complete(context.Background(), testReq, nil)
	if !errors.Is(err, ErrUpstream) || f.hits.Load() != 1 {
		t.Errorf("Complete error = %v after %d hits, want ErrUpstream after 1", err, f.hits.Load())
	}
}

func TestOpenAINoRetryRequestTriesOnce(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	req := testReq
	req.NoRetry = true
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), req, nil)
	if se, ok := errors.AsType[*StatusError](err); !ok || se.Status != 503 || f.hits.Load() != 1 {
		t.Errorf("Complete(NoRetry) error = %v after %d hits, want a 503 StatusError after 1", err, f.hits.Load())
	}
}

func TestOpenAIClientErrorNotRetried(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		http.Error(w, `{"error":{"message":"bad model"}}`, http.StatusBadRequest)
	})
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
	se, ok := errors.AsType[*StatusError](err)
	if !ok || se.Status != http.StatusBadRequest || !errors.Is(err, ErrUpstream) {
		t.Fatalf("Complete error = %v, want *StatusError 400 that is ErrUpstream", err)
	}
	if !strings.Contains(se.Body, "bad model") {
		t.Errorf("StatusError.Body = %q, want the upstream body", se.Body)
	}
	if n := f.hits.Load(); n != 1 {
		t.Errorf("upstream hits = %d, want 1 (4xx is not retried)", n)
	}
}

func TestOpenAIAPIKeyNeverInErrors(t *testing.T) {
	const key = "sk-secret-abcdef0123456789"
	f := newFake(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		http.Error(w, "invalid key "+strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "), http.StatusUnauthorized)
	})
	_, err := f.client(OpenAIConfig{APIKey: key}).Complete(context.Background(), testReq, nil)
	if err == nil || strings.Contains(err.Error(), key) {
		t.Fatalf("Complete error = %v, want an error without the API key", err)
	}
	if !strings.Contains(err.Error(), "[redacted]") {
		t.Errorf("Complete error = %v, want the echoed key redacted", err)
	}
}

func TestOpenAITimeoutBeforeFirstByte(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(_ int, _ http.ResponseWriter, r *http.Request) {
		waitGone(r)
	})
	_, err := f.client(OpenAIConfig{Timeout: 300 * time.Millisecond}).Complete(context.Background(), testReq, nil)
	if !errors.Is(err, ErrTimeout) || errors.Is(err, ErrIdle) {
		t.Fatalf("Complete error = %v, want ErrTimeout and not ErrIdle", err)
	}
	if n := f.hits.Load(); n != 1 {
		t.Errorf("upstream hits = %d, want 1 (timeouts are not retried)", n)
	}
}

func TestOpenAIIdleTimeout(t *testing.T) {
	checkGoroutines(t)
	const idle = 200 * time.Millisecond
	f := newFake(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		startStream(w)
		sendData(w, contentChunk("first"))
		waitGone(r)
	})
	var got collector
	start := time.Now()
	_, err := f.client(OpenAIConfig{IdleTimeout: idle}).Complete(context.Background(), testReq, got.add)
	el := time.Since(start)
	if !errors.Is(err, ErrIdle) || !errors.Is(err, ErrTimeout) {
		t.Fatalf("Complete error = %v, want ErrIdle (which is also ErrTimeout)", err)
	}
	if el < idle || el > 5*time.Second {
		t.Errorf("Complete took %s, want about IdleTimeout %s", el, idle)
	}
	if joinDeltas(got.deltas) != "first" || f.hits.Load() != 1 {
		t.Errorf("deltas %q after %d hits, want first after 1", got.deltas, f.hits.Load())
	}
}

func TestOpenAIStreamCutAfterDelta(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		startStream(w)
		sendData(w, contentChunk("partial"))
		hijackClose(t, w)
	})
	var got collector
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, got.add)
	if !errors.Is(err, ErrStreamCut) {
		t.Fatalf("Complete error = %v, want ErrStreamCut", err)
	}
	if joinDeltas(got.deltas) != "partial" || f.hits.Load() != 1 {
		t.Errorf("deltas %q after %d hits, want partial after 1 (no retry once a delta was delivered)", got.deltas, f.hits.Load())
	}
}

func TestOpenAIStreamCutBeforeDeltaRetried(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(hit int, w http.ResponseWriter, _ *http.Request) {
		if hit == 1 {
			startStream(w)
			send(w, ": keep-alive\n\n")
			hijackClose(t, w)
			return
		}
		streamReply(w, "second ", "try")
	})
	var got collector
	resp, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, got.add)
	if err != nil {
		t.Fatalf("Complete: %v", err)
	}
	if resp.Text != "second try" || joinDeltas(got.deltas) != "second try" || f.hits.Load() != 2 {
		t.Errorf("Complete = %q, deltas %q after %d hits, want second try after 2", resp.Text, got.deltas, f.hits.Load())
	}
}

func TestOpenAIEOFAfterFinishIsComplete(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		startStream(w)
		sendData(w, contentChunk("done"))
		sendData(w, finishChunk)
	})
	resp, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
	if err != nil || resp.Text != "done" {
		t.Fatalf("Complete = %q, %v, want done (finish_reason without [DONE] ends a stream)", resp.Text, err)
	}
}

func TestOpenAIErrorObjectMidStream(t *testing.T) {
	checkGoroutines(t)
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		startStream(w)
		sendData(w, contentChunk("so far"))
		sendData(w, `{"error":{"message":"model overloaded","type":"server_error","code":null}}`)
	})
	var got collector
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, got.add)
	if !errors.Is(err, ErrUpstream) || !strings.Contains(err.Error(), "model overloaded") {
		t.Fatalf("Complete error = %v, want ErrUpstream naming the upstream message", err)
	}
	if n := f.hits.Load(); n != 1 {
		t.Errorf("upstream hits = %d, want 1", n)
	}
}

func TestOpenAIKeepAliveCommentsIgnored(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
		startStream(w)
		send(w, ": keep-alive\n\n")
		send(w, "\n\n\r\n")
		send(w, ":\n: OPENROUTER PROCESSING\n\n")
		sendData(w, contentChunk("after "))
		send(w, ": keep-alive\r\n\r\n")
		sendData(w, contentChunk("comments"))
		sendData(w, finishChunk)
		sendData(w, "[DONE]")
	})
	var got collector
	resp, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, got.add)
	if err != nil || resp.Text != "after comments" || len(got.deltas) != 2 {
		t.Fatalf("Complete = %q, %v, deltas %q; want after comments in 2 deltas", resp.Text, err, got.deltas)
	}
}

func TestOpenAIBadResponses(t *testing.T) {
	for name, script := range map[string]func(w http.ResponseWriter){
		"invalid JSON": func(w http.ResponseWriter) {
			startStream(w)
			sendData(w, `{"choices":[{"delta":{"content":"x"`)
			sendData(w, "[DONE]")
		},
		"not an object": func(w http.ResponseWriter) {
			startStream(w)
			sendData(w, `42`)
		},
		"JSON body": func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write([]byte(`{"choices":[{"message":{"content":"hi"}}]}`))
		},
	} {
		t.Run(name, func(t *testing.T) {
			checkGoroutines(t)
			f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) { script(w) })
			_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
			if !errors.Is(err, ErrBadResponse) || f.hits.Load() != 1 {
				t.Errorf("Complete error = %v after %d hits, want ErrBadResponse after 1", err, f.hits.Load())
			}
		})
	}
}

// TestOpenAIReplyTooLarge: a reply of exactly MaxReplySize is whole; one
// byte more fails the call with ErrReplyTooLarge, a kind of ErrBadResponse,
// without a retry.
func TestOpenAIReplyTooLarge(t *testing.T) {
	piece := strings.Repeat("x", 64<<10)
	for _, extra := range []string{"", "y"} {
		t.Run(fmt.Sprintf("%d bytes", MaxReplySize+len(extra)), func(t *testing.T) {
			checkGoroutines(t)
			f := newFake(t, func(_ int, w http.ResponseWriter, _ *http.Request) {
				deltas := make([]string, 0, MaxReplySize/len(piece)+1)
				for range MaxReplySize / len(piece) {
					deltas = append(deltas, piece)
				}
				streamReply(w, append(deltas, extra)...)
			})
			resp, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, nil)
			switch {
			case extra == "" && (err != nil || len(resp.Text) != MaxReplySize):
				t.Errorf("Complete = %d bytes, %v; want the whole %d-byte reply", len(resp.Text), err, MaxReplySize)
			case extra != "" && (!errors.Is(err, ErrReplyTooLarge) || !errors.Is(err, ErrBadResponse)):
				t.Errorf("Complete error = %v, want ErrReplyTooLarge and ErrBadResponse", err)
			}
			if n := f.hits.Load(); n != 1 {
				t.Errorf("upstream hits = %d, want 1", n)
			}
		})
	}
}

func TestOpenAIConnectionRefused(t *testing.T) {
	checkGoroutines(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c, err := NewOpenAI(OpenAIConfig{BaseURL: "http://" + addr + "/v1"})
	if err != nil {
		t.Fatalf("NewOpenAI: %v", err)
	}
	start := time.Now()
	_, err = c.Complete(context.Background(), testReq, nil)
	el := time.Since(start)
	if !errors.Is(err, ErrUnavailable) || !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("Complete error = %v, want ErrUnavailable wrapping ECONNREFUSED", err)
	}
	if !strings.Contains(err.Error(), "attempt 3") {
		t.Errorf("Complete error = %v, want it to report attempt 3 (refusals are retried)", err)
	}
	if el >= time.Second {
		t.Errorf("Complete took %s against a closed port, want under 1s", el)
	}
}

func TestOpenAICancelClosesUpstream(t *testing.T) {
	checkGoroutines(t)
	gone := make(chan struct{})
	f := newFake(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		startStream(w)
		sendData(w, contentChunk("one "))
		waitGone(r)
		close(gone)
	})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := f.client(OpenAIConfig{}).Complete(ctx, testReq, func(string) error {
		cancel()
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Complete error = %v, want context.Canceled", err)
	}
	select {
	case <-gone:
	case <-time.After(time.Second):
		t.Fatal("fake upstream still sees its request alive 1s after the caller cancelled")
	}
}

func TestOpenAIOnDeltaErrorAbandons(t *testing.T) {
	checkGoroutines(t)
	gone := make(chan struct{})
	f := newFake(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		startStream(w)
		sendData(w, contentChunk("one "))
		sendData(w, contentChunk("two "))
		waitGone(r)
		close(gone)
	})
	errClientGone := errors.New("client gone")
	var n int
	_, err := f.client(OpenAIConfig{}).Complete(context.Background(), testReq, func(string) error {
		n++
		return errClientGone
	})
	if !errors.Is(err, errClientGone) || n != 1 || f.hits.Load() != 1 {
		t.Fatalf("Complete error = %v after %d deltas, %d hits; want errClientGone after 1, 1", err, n, f.hits.Load())
	}
	select {
	case <-gone:
	case <-time.After(time.Second):
		t.Fatal("fake upstream still sees its request alive 1s after onDelta failed")
	}
}

func TestOpenAIReusesConnections(t *testing.T) {
	f := newFake(t, func(_ int, w http.ResponseWriter, r *http.Request) {
		streamReply(w, "a", "b")
		// Upstreams often end the response a moment after [DONE]; the client
		// must read that end for the connection to be reused.
		select {
		case <-time.After(20 * time.Millisecond):
		case <-r.Context().Done():
		}
	})
	c := f.client(OpenAIConfig{})
	for i := range 3 {
		if _, err := c.Complete(context.Background(), testReq, nil); err != nil {
			t.Fatalf("Complete %d: %v", i, err)
		}
	}
	if n := f.conns.Load(); n != 1 {
		t.Errorf("connections = %d for 3 sequential calls, want 1 (drained streams are reused)", n)
	}
}

func TestNewOpenAIBaseURL(t *testing.T) {
	for _, tc := range []struct{ base, want string }{
		{"http://127.0.0.1:11434/v1", "http://127.0.0.1:11434/v1/chat/completions"},
		{"http://127.0.0.1:11434/v1/", "http://127.0.0.1:11434/v1/chat/completions"},
		{"http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"},
		{"http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"},
		{"https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"},
		{"https://openrouter.ai/api/v1", "https://openrouter.ai/api/v1/chat/completions"},
		{"https://r.openai.azure.com/openai/deployments/d?api-version=2024-10-21", "https://r.openai.azure.com/openai/deployments/d/chat/completions?api-version=2024-10-21"},
	} {
		c, err := NewOpenAI(OpenAIConfig{BaseURL: tc.base})
		if err != nil {
			t.Errorf("NewOpenAI(%q): %v", tc.base, err)
			continue
		}
		if c.endpoint != tc.want {
			t.Errorf("NewOpenAI(%q) endpoint = %q, want %q", tc.base, c.endpoint, tc.want)
		}
	}
	for _, base := range []string{"", "127.0.0.1:11434", "localhost/v1", "ftp://h/v1", "http://", "http://h/v1#f", "http://user:hunter2@h/v1"} {
		_, err := NewOpenAI(OpenAIConfig{BaseURL: base})
		if err == nil || !strings.Contains(err.Error(), "BaseURL") {
			t.Errorf("NewOpenAI(%q) error = %v, want an error naming BaseURL", base, err)
		} else if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("NewOpenAI(%q) error = %v, want the password left out", base, err)
		}
	}
}

func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"0", 0, true}, {"1", time.Second, true}, {" 7 ", 7 * time.Second, true},
		{"Wed, 01 Jan 2025 00:00:03 GMT", 3 * time.Second, true},
		{"Tue, 31 Dec 2024 23:59:00 GMT", 0, true},
		{"", 0, false}, {"-1", 0, false}, {"soon", 0, false}, {"1.5", 0, false},
	} {
		got, ok := parseRetryAfter(tc.in, now)
		if got != tc.want || ok != tc.ok {
			t.Errorf("parseRetryAfter(%q) = %s, %t, want %s, %t", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}
