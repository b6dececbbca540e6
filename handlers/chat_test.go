package handlers

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// checkAnswer checks the fields every successful chat answer has.
func checkAnswer(t *testing.T, what string, got chatAnswer, provider string) {
	t.Helper()
	if got.ID == "" || got.AgentID != store.DefaultAgentID || got.Reply == "" || got.Provider != provider || got.Model == "" {
		t.Errorf("%s = %+v, want an id, agent %q, a reply, provider %q and a model", what, got, store.DefaultAgentID, provider)
	}
	if got.Usage == nil || got.Usage.PromptTokens == nil || got.Usage.CompletionTokens == nil {
		t.Errorf("%s usage = %+v, want prompt_tokens and completion_tokens", what, got.Usage)
	}
	if got.DurationMS == nil || *got.DurationMS < 0 {
		t.Errorf("%s duration_ms = %v, want a duration", what, got.DurationMS)
	}
	if got.Worker == nil || *got.Worker != testWorkerSlot {
		t.Errorf("%s worker = %v, want %d", what, got.Worker, testWorkerSlot)
	}
}

// readChatStream reads a chat event stream to its end and returns the
// deltas, the final event and the comments seen before the first event.
func readChatStream(t *testing.T, body io.Reader) (deltas []string, final sseEvent, early []string) {
	t.Helper()
	sr := newSSEReader(body)
	for {
		ev, err := sr.next()
		if err != nil {
			t.Fatalf("chat stream ended with %v after deltas %q, want a done or error event", err, deltas)
		}
		switch ev.event {
		case "":
			if ev.comment != "" && len(deltas) == 0 {
				early = append(early, ev.comment)
			}
		case "delta":
			var d struct {
				Text *string `json:"text"`
			}
			if err := json.Unmarshal([]byte(ev.data), &d); err != nil || d.Text == nil {
				t.Fatalf("delta data %q: want {\"text\": ...} (%v)", ev.data, err)
			}
			deltas = append(deltas, *d.Text)
		case "done", "error":
			if ev.id != "" {
				t.Errorf("chat %s event has id %q, want none", ev.event, ev.id)
			}
			if _, err := sr.next(); err != io.EOF {
				t.Errorf("after the %s event: %v, want the end of the stream", ev.event, err)
			}
			return deltas, ev, early
		default:
			t.Fatalf("unexpected chat stream event %+v", ev)
		}
	}
}

// streamChat posts a streamed chat and reads its whole answer.
func (a *testAPI) streamChat(body string) (deltas []string, final sseEvent, early []string) {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(a.t.Context(), 20*time.Second)
	defer cancel()
	res := a.openStream(ctx, http.MethodPost, "/api/chat", body)
	if cc := res.Header.Get("Cache-Control"); cc != "no-cache" {
		a.t.Errorf("chat stream Cache-Control = %q, want no-cache", cc)
	}
	return readChatStream(a.t, res.Body)
}

func TestChatSimulated(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)

	r := a.post("/api/chat", `{"agent_id": "default", "message": "Plan a trip to Lisbon"}`)
	wantStatus(t, "POST /api/chat", r, http.StatusOK)
	got := decodeBody[chatAnswer](t, "POST /api/chat", r)
	checkAnswer(t, "chat answer", got, llm.ProviderSimulated)
	if !strings.Contains(got.Reply, "Lisbon") {
		t.Errorf("simulated reply = %q, want it to quote the message", got.Reply)
	}

	done := waitChatFinished(t, a.st, cursor, "chat.completed")
	if done.ChatID != got.ID || done.AgentID != store.DefaultAgentID || done.Worker != testWorkerSlot {
		t.Errorf("chat.completed = %+v, want chat %s of the default agent by worker %d", done, got.ID, testWorkerSlot)
	}
	if done.Data["provider"] != llm.ProviderSimulated || done.Data["model"] != got.Model || done.Data["usage"] == nil {
		t.Errorf("chat.completed data = %v, want provider, model and usage", done.Data)
	}
}

func TestChatStreamSimulated(t *testing.T) {
	t.Parallel()
	// A little latency, so that deltas are written one by one.
	a := newAPI(t, Config{LLM: llm.NewSimulated(llm.SimulatedConfig{Latency: 100 * time.Millisecond})})
	cursor := lastActivity(t, a.st)

	deltas, final, _ := a.streamChat(`{"agent_id": "default", "message": "stream me a reply", "stream": true}`)
	if final.event != "done" {
		t.Fatalf("final event = %+v, want done", final)
	}
	var done chatAnswer
	if err := json.Unmarshal([]byte(final.data), &done); err != nil {
		t.Fatalf("done data %q: %v", final.data, err)
	}
	checkAnswer(t, "done event", done, llm.ProviderSimulated)
	if len(deltas) < 2 {
		t.Errorf("deltas = %q, want the reply in several pieces", deltas)
	}
	if joined := strings.Join(deltas, ""); joined != done.Reply {
		t.Errorf("deltas joined = %q, want the done reply %q", joined, done.Reply)
	}
	if fin := waitChatFinished(t, a.st, cursor, "chat.completed"); fin.ChatID != done.ID {
		t.Errorf("chat.completed is for chat %s, want %s", fin.ChatID, done.ID)
	}
}

func TestChatOpenAI(t *testing.T) {
	t.Parallel()
	deltas := []string{"Hello", ", ", "wörld", "!\n"}
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { reply(w, deltas...) })
	a := newAPI(t, Config{LLM: up.client(0)})

	t.Run("json", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		r := a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`)
		wantStatus(t, "POST /api/chat", r, http.StatusOK)
		got := decodeBody[chatAnswer](t, "POST /api/chat", r)
		checkAnswer(t, "chat answer", got, llm.ProviderOpenAI)
		if got.Reply != "Hello, wörld!\n" || got.Model != "fake-model-2024" || *got.Usage.PromptTokens != 17 || *got.Usage.CompletionTokens != 4 {
			t.Errorf("chat answer = reply %q model %q usage %d/%d, want %q, fake-model-2024, 17/4",
				got.Reply, got.Model, *got.Usage.PromptTokens, *got.Usage.CompletionTokens, "Hello, wörld!\n")
		}
		waitChatFinished(t, a.st, cursor, "chat.completed")
	})
	t.Run("stream", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		got, final, _ := a.streamChat(`{"agent_id": "default", "message": "hi", "stream": true}`)
		if final.event != "done" {
			t.Fatalf("final event = %+v, want done", final)
		}
		if strings.Join(got, "|") != strings.Join(deltas, "|") {
			t.Errorf("deltas = %q, want %q, one event per upstream chunk", got, deltas)
		}
		var done chatAnswer
		if err := json.Unmarshal([]byte(final.data), &done); err != nil {
			t.Fatalf("done data %q: %v", final.data, err)
		}
		checkAnswer(t, "done event", done, llm.ProviderOpenAI)
		if done.Reply != strings.Join(deltas, "") {
			t.Errorf("done reply = %q, want %q", done.Reply, strings.Join(deltas, ""))
		}
		waitChatFinished(t, a.st, cursor, "chat.completed")
	})
	if n := up.requests(); n != 2 {
		t.Errorf("upstream requests = %d, want 2", n)
	}
}

func TestChatUnknownAgent(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	for _, body := range []string{
		`{"agent_id": "nobody", "message": "hi"}`,
		`{"agent_id": "nobody", "message": "hi", "stream": true}`,
	} {
		wantError(t, "POST /api/chat "+body, a.post("/api/chat", body), http.StatusNotFound, "not_found", `no agent "nobody"; GET /api/agents lists them (the default one is "default")`)
	}
	if acts := activitiesAfter(t, a.st, cursor); len(acts) != 0 {
		t.Errorf("chats with an unknown agent wrote %+v, want nothing", acts)
	}
}

func TestChatValidation(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	for _, tc := range []struct {
		name, body string
		want       []string
	}{
		{"no agent_id", `{"message": "hi"}`, []string{`"agent_id"`, "required"}},
		{"agent_id a number", `{"agent_id": 1, "message": "hi"}`, []string{`"agent_id"`, "must be a string"}},
		{"agent_id too long", `{"agent_id": "` + strings.Repeat("a", 129) + `", "message": "hi"}`, []string{`"agent_id"`, "longer than 128 bytes"}},
		{"no message", `{"agent_id": "default"}`, []string{`"message"`, "required"}},
		{"blank message", `{"agent_id": "default", "message": "   "}`, []string{`"message"`, "must not be empty"}},
		{"message an array", `{"agent_id": "default", "message": ["hi"]}`, []string{`"message"`, "must be a string"}},
		{"NUL in message", `{"agent_id": "default", "message": "hi\u0000there"}`, []string{`"message"`, "control characters", "U+0000"}},
		{"escape in message", `{"agent_id": "default", "message": "hi\u001b[2J"}`, []string{`"message"`, "control characters", "U+001B"}},
		{"NUL in agent_id", `{"agent_id": "default\u0000", "message": "hi"}`, []string{`"agent_id"`, "control characters", "U+0000"}},
		{"stream a string", `{"agent_id": "default", "message": "hi", "stream": "yes"}`, []string{`"stream"`, "must be a boolean"}},
		{"stream a number", `{"agent_id": "default", "message": "hi", "stream": 1}`, []string{`"stream"`, "must be a boolean"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := a.on(t)
			wantError(t, "POST /api/chat "+tc.body, a.post("/api/chat", tc.body), http.StatusBadRequest, "bad_request", tc.want...)
		})
	}
	if acts := activitiesAfter(t, a.st, cursor); len(acts) != 0 {
		t.Errorf("invalid chats wrote %+v, want nothing", acts)
	}
}

// TestChatUpstreamFailures covers an upstream that answers with an error
// status, in both answer modes: our 502, with our words, never upstream's.
func TestChatUpstreamFailures(t *testing.T) {
	t.Parallel()
	for _, status := range []int{http.StatusInternalServerError, http.StatusBadRequest, http.StatusUnauthorized, http.StatusTooManyRequests} {
		for _, stream := range []bool{false, true} {
			t.Run(fmt.Sprintf("%d/stream=%v", status, stream), func(t *testing.T) {
				t.Parallel()
				up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
					w.Header().Set("Content-Type", "application/json")
					w.WriteHeader(status)
					fmt.Fprintf(w, `{"error":{"message":"upstream internal detail: key %s is over quota","type":"x"}}`, testAPIKey)
				})
				a := newAPI(t, Config{LLM: up.client(0)})
				cursor := lastActivity(t, a.st)
				body := fmt.Sprintf(`{"agent_id": "default", "message": "hi", "stream": %v}`, stream)
				var shown []byte
				if stream {
					deltas, final, _ := a.streamChat(body)
					if final.event != "error" || len(deltas) != 0 {
						t.Fatalf("stream = deltas %q then %+v, want only an error event", deltas, final)
					}
					shown = []byte(final.data)
					wantErrorBody(t, "error event", shown, "upstream_error", "LLM")
				} else {
					r := a.post("/api/chat", body)
					shown = r.body
					wantError(t, "POST /api/chat", r, http.StatusBadGateway, "upstream_error", "LLM")
				}
				if strings.Contains(string(shown), "quota") {
					t.Errorf("answer %s echoes the upstream body", shown)
				}
				fin := waitChatFinished(t, a.st, cursor, "chat.failed")
				if fin.Data["status"] != float64(502) || fin.Data["reason"] != "upstream_error" {
					t.Errorf("chat.failed data = %v, want status 502 and reason upstream_error", fin.Data)
				}
			})
		}
	}
}

// TestChatUpstreamRetried: a 5xx before the first token is retried by the
// provider, and the client sees only the success.
func TestChatUpstreamRetried(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if calls.Add(1) == 1 {
			w.Header().Set("Retry-After", "0")
			http.Error(w, "overloaded", http.StatusServiceUnavailable)
			return
		}
		reply(w, "second ", "time")
	})
	a := newAPI(t, Config{LLM: up.client(1)})
	r := a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`)
	wantStatus(t, "POST /api/chat", r, http.StatusOK)
	if got := decodeBody[chatAnswer](t, "POST /api/chat", r); got.Reply != "second time" {
		t.Errorf("reply = %q, want %q", got.Reply, "second time")
	}
	if n := up.requests(); n != 2 {
		t.Errorf("upstream requests = %d, want 2", n)
	}
}

func TestChatTimeout(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			t.Parallel()
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				sseStart(w)
				<-r.Context().Done() // silent until our deadline cancels the call
			})
			a := newAPI(t, Config{LLM: up.client(0), LLMTimeout: timeout})
			cursor := lastActivity(t, a.st)
			body := fmt.Sprintf(`{"agent_id": "default", "message": "hi", "stream": %v}`, stream)
			start := time.Now()
			if stream {
				_, final, _ := a.streamChat(body)
				if final.event != "error" {
					t.Fatalf("final event = %+v, want error", final)
				}
				wantErrorBody(t, "error event", []byte(final.data), "upstream_timeout", "in time")
			} else {
				wantError(t, "POST /api/chat", a.post("/api/chat", body), http.StatusGatewayTimeout, "upstream_timeout", "in time")
			}
			if d := time.Since(start); d < timeout || d > timeout+3*time.Second {
				t.Errorf("timed-out chat answered after %v, want about %v", d, timeout)
			}
			fin := waitChatFinished(t, a.st, cursor, "chat.failed")
			if fin.Data["status"] != float64(504) || fin.Data["reason"] != "upstream_timeout" {
				t.Errorf("chat.failed data = %v, want status 504 and reason upstream_timeout", fin.Data)
			}
		})
	}
}

func TestChatConnectionRefused(t *testing.T) {
	// Not parallel: the bound is on wall time.
	c, err := llm.NewOpenAI(llm.OpenAIConfig{BaseURL: refusedURL(t), APIKey: testAPIKey})
	if err != nil {
		t.Fatalf("NewOpenAI: %v", err)
	}
	a := newAPI(t, Config{LLM: c}) // default retries: refusals must still fail fast
	cursor := lastActivity(t, a.st)
	start := time.Now()
	r := a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`)
	d := time.Since(start)
	wantError(t, "POST /api/chat", r, http.StatusBadGateway, "upstream_error", "could not be reached")
	t.Logf("refused upstream answered in %v", d)
	if d > time.Second {
		t.Errorf("refused upstream answered after %v, want under 1s", d)
	}
	fin := waitChatFinished(t, a.st, cursor, "chat.failed")
	if fin.Data["status"] != float64(502) {
		t.Errorf("chat.failed data = %v, want status 502", fin.Data)
	}
}

func TestChatStreamCut(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		sseData(w, chunk("half ", ""))
		sseData(w, chunk("a reply", ""))
		cut(t, w)
	})
	a := newAPI(t, Config{LLM: up.client(0)})

	t.Run("stream", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		deltas, final, _ := a.streamChat(`{"agent_id": "default", "message": "hi", "stream": true}`)
		if strings.Join(deltas, "") != "half a reply" {
			t.Errorf("deltas = %q, want the two sent before the cut", deltas)
		}
		if final.event != "error" {
			t.Fatalf("final event = %+v, want error", final)
		}
		wantErrorBody(t, "error event", []byte(final.data), "upstream_error")
		waitChatFinished(t, a.st, cursor, "chat.failed")
	})
	t.Run("json", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		wantError(t, "POST /api/chat", a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`), http.StatusBadGateway, "upstream_error")
		waitChatFinished(t, a.st, cursor, "chat.failed")
	})
}

// TestChatReplyTooLarge: an upstream that streams more than
// llm.MaxReplySize of reply text in small events fails the chat with a
// 502 that says why, is not retried, and has its request cancelled rather
// than read to the end.
func TestChatReplyTooLarge(t *testing.T) {
	t.Parallel()
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			t.Parallel()
			piece := strings.Repeat("word ", 64<<10/5)
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				sseStart(w)
				for sent := 0; sent < 2*llm.MaxReplySize && r.Context().Err() == nil; sent += len(piece) {
					sseData(w, chunk(piece, ""))
				}
				// Then silent until the client goes away: a reply past the
				// limit must be abandoned, not waited out (the socket
				// buffers could otherwise hold the rest and let this
				// handler return before the cancel is seen).
				<-r.Context().Done()
			})
			// Without the limit the chat would end at this timeout, 504.
			a := newAPI(t, Config{LLM: up.client(2), LLMTimeout: 10 * time.Second})
			cursor := lastActivity(t, a.st)
			body := fmt.Sprintf(`{"agent_id": "default", "message": "hi", "stream": %v}`, stream)
			const want = "longer than 1048576 bytes"
			if stream {
				deltas, final, _ := a.streamChat(body)
				if n := len(strings.Join(deltas, "")); n > llm.MaxReplySize {
					t.Errorf("deltas hold %d bytes, want at most %d", n, llm.MaxReplySize)
				}
				if final.event != "error" {
					t.Fatalf("final event = %+v, want error", final)
				}
				wantErrorBody(t, "error event", []byte(final.data), "upstream_error", want)
			} else {
				wantError(t, "POST /api/chat", a.post("/api/chat", body), http.StatusBadGateway, "upstream_error", want)
			}
			fin := waitChatFinished(t, a.st, cursor, "chat.failed")
			if msg, _ := fin.Data["message"].(string); fin.Data["status"] != float64(502) || fin.Data["reason"] != "upstream_error" || !strings.Contains(msg, want) {
				t.Errorf("chat.failed data = %v, want status 502, reason upstream_error and a message saying %q", fin.Data, want)
			}
			waitFor(t, 5*time.Second, func() error {
				if up.cancelledAt().IsZero() {
					return fmt.Errorf("upstream request not cancelled, want it cancelled past the limit")
				}
				return nil
			})
			if n := up.requests(); n != 1 {
				t.Errorf("upstream requests = %d, want 1 (no retry)", n)
			}
		})
	}
}

func TestChatStreamKeepAlive(t *testing.T) {
	t.Parallel()
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		sseStart(w)
		time.Sleep(400 * time.Millisecond) // a model thinking before its first token
		replyRest(w, "finally")
	})
	a := newAPI(t, Config{LLM: up.client(0), KeepAliveInterval: 50 * time.Millisecond})
	deltas, final, early := a.streamChat(`{"agent_id": "default", "message": "hi", "stream": true}`)
	if final.event != "done" || strings.Join(deltas, "") != "finally" {
		t.Fatalf("stream = %q then %+v, want the reply and done", deltas, final)
	}
	if len(early) == 0 {
		t.Errorf("no comment line during a 400 ms silence, want keep-alives every 50 ms")
	}
	t.Logf("%d keep-alive comments before the first delta: %q", len(early), early)
}

// TestChatCancelledOnDisconnect closes the client's connection while the
// upstream call is in flight: the upstream must see its request cancelled
// (the watcher hears of the close from the kernel) and the chat must end as
// chat.cancelled.
func TestChatCancelledOnDisconnect(t *testing.T) {
	// Not parallel: the bounds are on wall time.
	for _, stream := range []bool{false, true} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				sseStart(w)
				sseData(w, chunk("thinking", ""))
				<-r.Context().Done()
			})
			a := newAPI(t, Config{LLM: up.client(0)})
			cursor := lastActivity(t, a.st)
			conn := a.rawRequest(http.MethodPost, "/api/chat", fmt.Sprintf(`{"agent_id": "default", "message": "a long one", "stream": %v}`, stream))
			waitFor(t, 5*time.Second, func() error {
				if up.requests() == 0 {
					return fmt.Errorf("upstream has no request, want the chat's")
				}
				return nil
			})
			if stream {
				// Closing after the first delta arrived: mid-reply.
				conn.SetReadDeadline(time.Now().Add(5 * time.Second))
				br := bufio.NewReader(conn)
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						t.Fatalf("reading the chat stream: %v, want a delta event", err)
					}
					if strings.HasPrefix(line, "event: delta") {
						break
					}
				}
			}
			conn.Close()
			closed := time.Now()
			waitFor(t, 1500*time.Millisecond, func() error {
				if up.cancelledAt().IsZero() {
					return fmt.Errorf("upstream request not cancelled, want it cancelled after the client left")
				}
				return nil
			})
			t.Logf("upstream saw the cancel %v after the client closed", up.cancelledAt().Sub(closed))
			fin := waitChatFinished(t, a.st, cursor, "chat.cancelled")
			if fin.Data["reason"] != "client_disconnected" {
				t.Errorf("chat.cancelled data = %v, want reason client_disconnected", fin.Data)
			}
		})
	}
}

// TestChatCancelledSimulated is the seed's case: a 30 s simulated reply
// whose client gives up.
func TestChatCancelledSimulated(t *testing.T) {
	// Not parallel: the bound is on wall time.
	a := newAPI(t, Config{LLM: llm.NewSimulated(llm.SimulatedConfig{Latency: 30 * time.Second})})
	cursor := lastActivity(t, a.st)
	conn := a.rawRequest(http.MethodPost, "/api/chat", `{"agent_id": "default", "message": "complex request"}`)
	waitFor(t, 5*time.Second, func() error {
		if _, types, _ := chatTrail(t, a.st, cursor); len(types) == 0 {
			return fmt.Errorf("no chat.started yet")
		}
		return nil
	})
	conn.Close()
	closed := time.Now()
	fin := waitChatFinished(t, a.st, cursor, "chat.cancelled")
	t.Logf("chat.cancelled recorded %v after the client closed", fin.Time.Sub(closed))
	if d := fin.Time.Sub(closed); d > 1500*time.Millisecond {
		t.Errorf("chat.cancelled %v after the client left, want within about 1 s", d)
	}
}

// TestLongCallsOutliveReadTimeout: the worker serves with a ReadTimeout
// (30 s by default), whose read deadline stays set on the connection while
// the handler runs. A chat, a long-poll or a feed lasting longer must not
// take the expired deadline for a client that went away.
func TestLongCallsOutliveReadTimeout(t *testing.T) {
	t.Parallel()
	const readTimeout = 200 * time.Millisecond
	a := newTunedAPI(t, Config{LLM: llm.NewSimulated(llm.SimulatedConfig{Latency: 4 * readTimeout})}, nil,
		func(s *fasthttp.Server) { s.ReadTimeout = readTimeout })

	t.Run("chat", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		r := a.post("/api/chat", `{"agent_id": "default", "message": "outlive the read deadline"}`)
		wantStatus(t, "POST /api/chat", r, http.StatusOK)
		checkAnswer(t, "chat answer", decodeBody[chatAnswer](t, "POST /api/chat", r), llm.ProviderSimulated)
		waitChatFinished(t, a.st, cursor, "chat.completed")
	})
	t.Run("stream", func(t *testing.T) {
		a := a.on(t)
		cursor := lastActivity(t, a.st)
		_, final, _ := a.streamChat(`{"agent_id": "default", "message": "outlive the read deadline", "stream": true}`)
		if final.event != "done" {
			t.Fatalf("final event = %+v, want done", final)
		}
		waitChatFinished(t, a.st, cursor, "chat.completed")
	})
	t.Run("long-poll", func(t *testing.T) {
		a := a.on(t)
		start := time.Now()
		p := a.activities(fmt.Sprintf("after=%d&wait=%g", lastActivity(t, a.st), (4 * readTimeout).Seconds()))
		if d := time.Since(start); d < 4*readTimeout || len(p.Activities) != 0 {
			t.Errorf("long-poll answered %d activities after %v, want none after the whole wait of %v", len(p.Activities), d, 4*readTimeout)
		}
	})
}

// TestPreferRespondAsync: the header queues a chat and says it was
// applied; a body that says "background": false keeps the chat
// synchronous, header or not.
func TestPreferRespondAsync(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	r := a.post("/api/chat", `{"agent_id":"default","message":"hi"}`, "Prefer", "respond-async, wait=5")
	if r.status != http.StatusAccepted || r.header.Get("Preference-Applied") != "respond-async" {
		t.Errorf("Prefer: respond-async = %d (Preference-Applied %q) %s, want 202 and the preference applied", r.status, r.header.Get("Preference-Applied"), r.body)
	}
	r = a.post("/api/chat", `{"agent_id":"default","message":"hi","background":false}`, "Prefer", "respond-async")
	if r.status != http.StatusOK || r.header.Get("Preference-Applied") != "" {
		t.Errorf(`"background": false with Prefer: respond-async = %d (Preference-Applied %q) %s, want 200, the body's choice`, r.status, r.header.Get("Preference-Applied"), r.body)
	}
}

// A panic in a chat's work on its own goroutine is raised again on the
// goroutine serving the request, where the worker's panic boundary turns
// it into a 500, and carries the stack where it happened.
func TestOnOwnStackPanic(t *testing.T) {
	defer func() {
		p, _ := recover().(string)
		if !strings.HasPrefix(p, "boom\n") || !strings.Contains(p, "handlers.explode") {
			t.Fatalf("panic = %q, want boom and the stack through explode", p)
		}
	}()
	onOwnStack(explode)
	t.Fatal("onOwnStack returned after a panic")
}

func explode() { panic("boom") }

// A synchronous chat whose failure another process recorded first (a new
// master that took its worker for dead) answers that failure, as a retry
// with its Idempotency-Key would, not a 500 for an end it could not record.
func TestChatFailedElsewhereAnswersTheFailure(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		<-release
		reply(w, "too", " late")
	})
	const pid = 4343
	a := newAPI(t, Config{LLM: up.client(0), Worker: Worker{Slot: testWorkerSlot, Generation: 1, PID: pid, Started: time.Now()}})
	answered := make(chan response, 1)
	go func() { answered <- a.post("/api/chat", `{"agent_id": "default", "message": "hello"}`) }()
	waitFor(t, 5*time.Second, func() error {
		if up.requests() == 0 {
			return fmt.Errorf("upstream has no request, want the chat's")
		}
		return nil
	})
	if n, err := a.st.FailOrphanedChats(t.Context(), pid, "worker_died"); err != nil || n != 1 {
		t.Fatalf("FailOrphanedChats = %d, %v, want the one chat", n, err)
	}
	close(release)
	wantError(t, "a chat failed elsewhere first", <-answered, http.StatusBadGateway, "worker_died", "the worker running the chat died")
}
