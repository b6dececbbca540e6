package handlers

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// chatResult is the answer to a chat, and the payload of the stream's
// final "done" event.
type chatResult struct {
	ID         string    `json:"id"`
	AgentID    string    `json:"agent_id"`
	Reply      string    `json:"reply"`
	Provider   string    `json:"provider"`
	Model      string    `json:"model"`
	Usage      chatUsage `json:"usage"`
	DurationMS int64     `json:"duration_ms"`
	Worker     int       `json:"worker"`
}

type chatUsage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
}

// maxIdemKeyLen bounds the Idempotency-Key header.
const maxIdemKeyLen = 255

// errChatCancelled answers a synchronous chat cancelled through
// POST /api/chats/{id}/cancel.
var errChatCancelled = &requestError{fasthttp.StatusConflict, "the chat was cancelled"}

// requestIDHeader carries the request id the worker gives every request.
const requestIDHeader = "X-Request-ID"

// chatCall is one chat between its start in the store and its finish.
type chatCall struct {
	h       *Handler
	id      string
	agent   store.Agent
	req     llm.Request
	started time.Time
	base    context.Context // cancelled with errCancelRequested by a cancel
}

// chat runs POST /api/chat: record the start, call the LLM (streaming the
// reply as server-sent events when asked), record exactly one finish. A
// background chat ("background": true or Prefer: respond-async) is queued
// instead and answered 202 at once.
//
// A synchronous chat waits on its LLM on the goroutine that serves the
// connection, for seconds or minutes, and thousands may wait at once. What
// comes before and after the wait (decoding, the store's calls, encoding)
// runs on short-lived goroutines of its own, so that the waiting
// goroutine's stack is never grown past what waiting needs
// (docs/benchmarks.md, "Memory per chat in flight").
func (h *Handler) chat(ctx *fasthttp.RequestCtx) {
	var w *chatWait
	onOwnStack(func() { w = h.startChat(ctx) })
	if w == nil {
		return // answered, or streaming
	}
	defer w.end()
	resp, err := h.cfg.LLM.Complete(w.ctx, w.call.req, nil)
	onOwnStack(func() { w.answer(ctx, resp, err) })
}

// chatWait is a synchronous chat started and waiting for its LLM.
type chatWait struct {
	call *chatCall
	ctx  context.Context // the LLM call's
	end  func()          // ends the chat's watch, deadline and cancellation
}

// answer records how the chat ended and answers it.
func (w *chatWait) answer(ctx *fasthttp.RequestCtx, resp llm.Response, err error) {
	res, err := w.call.finish(resp, err, w.ctx.Err() == context.Canceled)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			ctx.SetConnectionClose() // the client is gone; nothing to answer
			return
		}
		fail(ctx, err)
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, res)
}

// onOwnStack runs f on a goroutine of its own and waits for it. A panic in f
// is raised again here, with f's stack, for the worker's panic boundary.
func onOwnStack(f func()) {
	done := make(chan string, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				done <- fmt.Sprintf("%v\n\n%s", v, debug.Stack())
			}
			close(done)
		}()
		f()
	}()
	if p, ok := <-done; ok {
		panic(p)
	}
}

// startChat answers a chat that is refused, replayed, queued or streamed,
// and returns nil; it returns a synchronous chat started, for its caller
// to wait on.
func (h *Handler) startChat(ctx *fasthttp.RequestCtx) *chatWait {
	if !requireJSON(ctx) {
		return nil
	}
	req, err := decodeChat(ctx.PostBody())
	if err != nil {
		fail(ctx, err)
		return nil
	}
	// The body's own "background" wins over the header's preference.
	preferred := !req.Stream && !req.BackgroundSet && preferAsync(ctx)
	if preferred {
		req.Background = true
	}
	idemKey, err := h.idempotencyKey(ctx)
	if err != nil {
		fail(ctx, err)
		return nil
	}
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	agent, err := h.cfg.Store.Agent(sc, req.AgentID)
	if err != nil {
		h.storeFailed(ctx, "read agent", noAgent(req.AgentID, err))
		return nil
	}
	// An agent created before the allow-list changed.
	if !h.modelAllowed(agent.Model) {
		writeErrorObject(ctx, fasthttp.StatusUnprocessableEntity, h.modelRefused(fmt.Sprintf("agent %q names model %q, which", agent.ID, agent.Model)))
		return nil
	}
	// The worker gives every request one valid id; it follows the chat to
	// its activities and the upstream request.
	rid := string(ctx.Request.Header.Peek(requestIDHeader))
	sum := sha256.Sum256([]byte(req.AgentID + "\x00" + req.Message))
	chat := store.Chat{
		ID: newChatID(), AgentID: agent.ID, Message: req.Message, Origin: h.origin, RequestID: rid,
		Background: req.Background, QueueMax: h.cfg.ChatQueueMax,
		IdemKey: idemKey, IdemHash: hex.EncodeToString(sum[:]), IdemWindow: h.cfg.IdempotencyWindow,
	}
	base, cancelBase := context.WithCancelCause(context.Background())
	unregister := func() {}
	// release ends the chat's cancellation; the stream writer takes it
	// over when there is one.
	release := func() { unregister(); cancelBase(nil) }
	defer func() { release() }()
	if !req.Background {
		// Registered before the chat exists, so no cancellation is missed.
		if unregister, err = h.cancels.register(chat.ID, cancelBase); err != nil {
			unregister = func() {}
			h.storeFailed(ctx, "follow cancellations", err)
			return nil
		}
	}
	act, err := h.cfg.Store.StartChat(sc, chat)
	if dup, ok := errors.AsType[*store.DuplicateError](err); ok {
		h.replayChat(ctx, dup.ChatID, req)
		return nil
	}
	switch {
	case errors.Is(err, store.ErrKeyReused):
		writeErrorObject(ctx, fasthttp.StatusUnprocessableEntity, errorObject{Code: "idempotency_key_reused",
			Message: "this Idempotency-Key was used with another request in the last " + windowText(h.cfg.IdempotencyWindow)})
		return nil
	case errors.Is(err, store.ErrQueueFull):
		ctx.Response.Header.Set("Retry-After", "5")
		writeErrorObject(ctx, fasthttp.StatusServiceUnavailable, errorObject{Code: "queue_full",
			Message: fmt.Sprintf("%d background chats are queued, the most this server holds; retry later", h.cfg.ChatQueueMax)})
		return nil
	case err != nil:
		h.storeFailed(ctx, "start chat", err)
		return nil
	}
	h.m.activity(act.Type)
	ctx.Response.Header.Set("X-Chat-Id", chat.ID)
	if req.Background {
		ctx.Response.Header.Set("Location", "/api/chats/"+chat.ID)
		if preferred {
			ctx.Response.Header.Set("Preference-Applied", "respond-async") // RFC 7240
		}
		writeJSON(ctx, fasthttp.StatusAccepted, chatView{ID: chat.ID, AgentID: agent.ID, Status: store.ChatQueued,
			Background: true, Created: act.Time})
		return nil
	}
	h.m.chatStarted()
	call := &chatCall{
		h:     h,
		id:    chat.ID,
		agent: agent,
		req: llm.Request{Model: agent.Model, RequestID: rid, Messages: []llm.Message{
			{Role: "system", Content: agent.SystemPrompt},
			{Role: "user", Content: req.Message},
		}},
		started: time.Now(),
		base:    base,
	}
	// The call outlives nothing of ctx: its context is its own, cancelled
	// when the client goes away, the chat is cancelled or the deadline
	// passes.
	callCtx, stop := context.WithTimeout(base, h.cfg.LLMTimeout)
	conn := ctx.Conn()
	unwatch := h.watcher.watch(conn, stop)
	// The caller's wait, or the stream writer that runs after this handler
	// returns, owns the cancellation from here on.
	keep := release
	release = func() {}
	if !req.Stream {
		return &chatWait{call: call, ctx: callCtx, end: func() { unwatch(); stop(); keep() }}
	}
	startSSE(ctx)
	interval := h.cfg.KeepAliveInterval
	ctx.SetBodyStreamWriter(func(w *bufio.Writer) {
		defer keep()
		defer stop()
		defer unwatch()
		sw := newSSEWriter(w, interval, conn)
		defer sw.close()
		resp, err := h.cfg.LLM.Complete(callCtx, call.req, func(text string) error {
			b, _ := json.Marshal(struct {
				Text string `json:"text"`
			}{text})
			return sw.event(0, "delta", b)
		})
		res, err := call.finish(resp, err, sw.gone() || callCtx.Err() == context.Canceled)
		if err != nil {
			if !errors.Is(err, context.Canceled) {
				_, obj := statusOf(err)
				b, _ := json.Marshal(struct {
					Error errorObject `json:"error"`
				}{obj})
				sw.event(0, "error", b)
			}
			return
		}
		b, _ := json.Marshal(res)
		sw.event(0, "done", b)
	})
	return nil
}

// preferAsync reports whether the request carries Prefer: respond-async
// (RFC 7240).
func preferAsync(ctx *fasthttp.RequestCtx) bool {
	for _, v := range ctx.Request.Header.PeekAll("Prefer") {
		for _, p := range bytes.Split(v, []byte(",")) {
			name, _, _ := bytes.Cut(p, []byte(";"))
			if bytes.EqualFold(bytes.TrimSpace(name), []byte("respond-async")) {
				return true
			}
		}
	}
	return false
}

// idempotencyKey returns the stored form of the request's Idempotency-Key
// ("" without one): with API tokens on, it is scoped to the caller's token,
// so two clients never share a key.
func (h *Handler) idempotencyKey(ctx *fasthttp.RequestCtx) (string, error) {
	vs := ctx.Request.Header.PeekAll("Idempotency-Key")
	switch {
	case len(vs) == 0:
		return "", nil
	case len(vs) > 1:
		// Which one the client meant is a guess either way.
		return "", badRequest("more than one Idempotency-Key header")
	}
	v := vs[0]
	if len(v) == 0 || len(v) > maxIdemKeyLen || bytes.ContainsFunc(v, func(r rune) bool { return r < 0x21 || r > 0x7e }) {
		return "", badRequest(fmt.Sprintf("header Idempotency-Key: want 1 to %d visible ASCII characters", maxIdemKeyLen))
	}
	key := string(v)
	if len(h.tokens) > 0 {
		auth := ctx.Request.Header.Peek("Authorization")
		sum := sha256.Sum256(bytes.TrimSpace(auth[min(len(auth), 7):]))
		key = hex.EncodeToString(sum[:8]) + ":" + key
	}
	return key, nil
}

// windowText says d the way the 422 for a reused key does: "24 hours",
// "90 seconds", "1h30m0s".
func windowText(d time.Duration) string {
	switch {
	case d%time.Hour == 0:
		return plural(int(d/time.Hour), "hour")
	case d%time.Minute == 0:
		return plural(int(d/time.Minute), "minute")
	case d%time.Second == 0:
		return plural(int(d/time.Second), "second")
	}
	return d.String()
}

func plural(n int, unit string) string {
	if n == 1 {
		return "1 " + unit
	}
	return fmt.Sprintf("%d %ss", n, unit)
}

// restartedKey marks a request whose replay started the chat anew.
type restartedKey struct{}

// replayChat answers a request whose Idempotency-Key names chat id: a
// background request gets the chat as it is now, a synchronous one waits
// for it to end and gets its result (or, streaming, its events).
func (h *Handler) replayChat(ctx *fasthttp.RequestCtx, id string, req chatRequest) {
	ctx.Response.Header.Set("Idempotent-Replayed", "true")
	ctx.Response.Header.Set("X-Chat-Id", id)
	if req.Stream {
		h.chatEvents(ctx, id, 0)
		return
	}
	wait := time.Duration(0)
	if !req.Background {
		wait = h.cfg.LLMTimeout + storeTimeout
	}
	c, err := h.waitChat(ctx, id, wait)
	if err != nil {
		h.chatFailed(ctx, id, "read chat", err)
		return
	}
	if c.Unanswered() && ctx.UserValue(restartedKey{}) == nil {
		// The first request's client left (or its worker died) while this
		// retry waited: the key is free, and this request starts the chat
		// anew, once.
		ctx.SetUserValue(restartedKey{}, true)
		ctx.Response.Header.Del("Idempotent-Replayed")
		ctx.Response.Header.Del("X-Chat-Id")
		h.chat(ctx)
		return
	}
	if req.Background {
		ctx.Response.Header.Set("Location", "/api/chats/"+id)
		writeJSON(ctx, fasthttp.StatusAccepted, viewChat(c))
		return
	}
	v := viewChat(c)
	switch c.Status {
	case store.ChatCompleted:
		res := chatResult{ID: c.ID, AgentID: c.AgentID, Reply: c.Reply, Provider: v.Provider, Model: v.Model, Worker: c.Worker}
		if v.Usage != nil {
			res.Usage = *v.Usage
		}
		if v.DurationMS != nil {
			res.DurationMS = *v.DurationMS
		}
		writeJSON(ctx, fasthttp.StatusOK, res)
	case store.ChatFailed:
		fail(ctx, failedChat(c))
	case store.ChatCancelled:
		fail(ctx, errChatCancelled)
	default:
		// Still running after the wait: say where to look.
		ctx.Response.Header.Set("Location", "/api/chats/"+id)
		writeJSON(ctx, fasthttp.StatusAccepted, v)
	}
}

// failedChat is the answer to a chat the store holds as failed: the
// status recorded with the failure (502 when none was, as for a dead
// worker) and its error object.
func failedChat(c store.ChatRow) error {
	status := fasthttp.StatusBadGateway
	var d struct {
		Status int `json:"status"`
	}
	if json.Unmarshal([]byte(c.Detail), &d) == nil && d.Status >= 400 {
		status = d.Status
	}
	return &recordedError{status, *viewChat(c).Error}
}

// newChatID returns 16 random hex characters, as the store would.
func newChatID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// finish records how the call ended, exactly once, and returns the result
// to send or the error to answer. clientGone says the client went away,
// which makes the chat cancelled whatever the LLM returned.
func (c *chatCall) finish(resp llm.Response, callErr error, clientGone bool) (chatResult, error) {
	h := c.h
	d := time.Since(c.started)
	status, data := store.ChatCompleted, map[string]any{"duration_ms": d.Milliseconds()}
	cancelled := errors.Is(context.Cause(c.base), errCancelRequested)
	if c.req.RequestID != "" {
		data["request_id"] = c.req.RequestID
	}
	switch {
	case cancelled:
		status = store.ChatCancelled
	case clientGone:
		status, callErr = store.ChatCancelled, context.Canceled
		data["reason"] = "client_disconnected"
	case callErr != nil:
		code, obj := statusOf(callErr)
		status = store.ChatFailed
		data["reason"], data["status"], data["message"] = obj.Code, code, obj.Message
		h.log.Warn().Err(callErr).Str("chat_id", c.id).Str("request_id", c.req.RequestID).Int("status", code).Dur("duration_ms", d).Msg("chat failed")
	default:
		data["provider"], data["model"] = resp.Provider, resp.Model
		data["usage"] = map[string]int{"prompt_tokens": resp.Usage.PromptTokens, "completion_tokens": resp.Usage.CompletionTokens}
	}
	h.m.chatEnded()
	h.m.llmCall(cmp.Or(resp.Provider, "unknown"), status, d, resp.Usage.PromptTokens, resp.Usage.CompletionTokens)
	if cancelled {
		// The canceller recorded the end.
		return chatResult{}, errChatCancelled
	}
	// The request may be over; recording its end must not depend on it.
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if act, err := h.cfg.Store.EndChat(sc, c.id, store.Outcome{Status: status, Data: data, Reply: resp.Text}); err == nil {
		h.m.activity(act.Type)
	} else {
		if errors.Is(err, store.ErrChatFinished) {
			cur, rerr := h.cfg.Store.ChatByID(sc, c.id)
			switch {
			case rerr == nil && cur.Status == store.ChatCancelled:
				// Cancelled just as it ended.
				return chatResult{}, errChatCancelled
			case rerr == nil && cur.Status == store.ChatFailed && !clientGone:
				// Failed by another process first: a master that took this
				// worker for dead. The client gets what the store holds,
				// as GET /api/chats/{id} shows it.
				h.log.Warn().Str("chat_id", c.id).Str("chat_status", status).Str("recorded", cur.Status).Msg("chat ended after another process recorded its failure")
				return chatResult{}, failedChat(cur)
			}
		}
		h.m.storeError("finish chat")
		h.log.Error().Err(err).Str("chat_id", c.id).Str("chat_status", status).Msg("chat finish not recorded")
		if callErr == nil {
			// A reply whose completion is not recorded is not given: the
			// client's view and the activity feed must agree.
			callErr = err
		}
	}
	if callErr != nil {
		return chatResult{}, callErr
	}
	return chatResult{
		ID:         c.id,
		AgentID:    c.agent.ID,
		Reply:      resp.Text,
		Provider:   resp.Provider,
		Model:      resp.Model,
		Usage:      chatUsage{resp.Usage.PromptTokens, resp.Usage.CompletionTokens},
		DurationMS: d.Milliseconds(),
		Worker:     h.cfg.Worker.Slot,
	}, nil
}
