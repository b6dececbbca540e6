package handlers

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
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

// requestIDHeader carries the request id the worker gives every request.
const requestIDHeader = "X-Request-ID"

// chatCall is one chat between its start in the store and its finish.
type chatCall struct {
	h       *Handler
	id      string
	agent   store.Agent
	req     llm.Request
	started time.Time
}

// chat runs POST /api/chat: record the start, call the LLM (streaming the
// reply as server-sent events when asked), record exactly one finish.
func (h *Handler) chat(ctx *fasthttp.RequestCtx) {
	if !requireJSON(ctx) {
		return
	}
	req, err := decodeChat(ctx.PostBody())
	if err != nil {
		fail(ctx, err)
		return
	}
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	agent, err := h.cfg.Store.Agent(sc, req.AgentID)
	if err != nil {
		h.storeFailed(ctx, "read agent", noAgent(req.AgentID, err))
		return
	}
	// The worker gives every request one valid id; it follows the chat to
	// its activities and the upstream request.
	rid := string(ctx.Request.Header.Peek(requestIDHeader))
	act, err := h.cfg.Store.StartChat(sc, store.Chat{AgentID: agent.ID, Message: req.Message, Origin: h.origin, RequestID: rid})
	if err != nil {
		h.storeFailed(ctx, "start chat", err)
		return
	}
	h.m.activity(act.Type)
	h.m.chatStarted()
	call := &chatCall{
		h:     h,
		id:    act.ChatID,
		agent: agent,
		req: llm.Request{Model: agent.Model, RequestID: rid, Messages: []llm.Message{
			{Role: "system", Content: agent.SystemPrompt},
			{Role: "user", Content: req.Message},
		}},
		started: time.Now(),
	}
	// The call outlives nothing of ctx: its context is its own, cancelled
	// when the client goes away or the deadline passes.
	callCtx, stop := context.WithTimeout(context.Background(), h.cfg.LLMTimeout)
	conn := ctx.Conn()
	unwatch := h.watcher.watch(conn, stop)
	ctx.Response.Header.Set("X-Chat-Id", call.id)
	if !req.Stream {
		defer stop()
		defer unwatch()
		resp, err := h.cfg.LLM.Complete(callCtx, call.req, nil)
		res, err := call.finish(resp, err, callCtx.Err() == context.Canceled)
		if err != nil {
			if errors.Is(err, context.Canceled) {
				ctx.SetConnectionClose() // the client is gone; nothing to answer
				return
			}
			fail(ctx, err)
			return
		}
		writeJSON(ctx, fasthttp.StatusOK, res)
		return
	}
	startSSE(ctx)
	interval := h.cfg.KeepAliveInterval
	ctx.SetBodyStreamWriter(func(w *bufio.Writer) {
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
}

// finish records how the call ended, exactly once, and returns the result
// to send or the error to answer. clientGone says the client went away,
// which makes the chat cancelled whatever the LLM returned.
func (c *chatCall) finish(resp llm.Response, callErr error, clientGone bool) (chatResult, error) {
	h := c.h
	d := time.Since(c.started)
	status, data := store.ChatCompleted, map[string]any{"duration_ms": d.Milliseconds()}
	if c.req.RequestID != "" {
		data["request_id"] = c.req.RequestID
	}
	switch {
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
	// The request may be over; recording its end must not depend on it.
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if act, err := h.cfg.Store.FinishChat(sc, c.id, status, data); err == nil {
		h.m.activity(act.Type)
	} else {
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
