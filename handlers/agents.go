package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/store"
)

// storeTimeout bounds one store call made for a request.
const storeTimeout = 15 * time.Second

// listAgents answers GET /api/agents: a page of agents, oldest first,
// from ?after= (a next_after this route gave), at most ?limit=.
func (h *Handler) listAgents(ctx *fasthttp.RequestCtx) {
	args := ctx.QueryArgs()
	limit, err := parseLimit(args, store.DefaultAgentLimit, store.MaxAgentLimit)
	if err != nil {
		fail(ctx, err)
		return
	}
	p := store.AgentPage{After: string(args.Peek("after")), Limit: limit}
	c, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	agents, next, err := h.cfg.Store.Agents(c, p)
	if errors.Is(err, store.ErrBadCursor) {
		fail(ctx, badRequest("parameter after: want the next_after of an earlier answer"))
		return
	}
	if err != nil {
		h.storeFailed(ctx, "list agents", err)
		return
	}
	if agents == nil {
		agents = []store.Agent{}
	}
	writeJSON(ctx, fasthttp.StatusOK, struct {
		Agents    []store.Agent `json:"agents"`
		NextAfter string        `json:"next_after,omitempty"`
	}{agents, next})
}

func (h *Handler) createAgent(ctx *fasthttp.RequestCtx) {
	if !requireJSON(ctx) {
		return
	}
	req, err := decodeAgent(ctx.PostBody())
	if err != nil {
		fail(ctx, err)
		return
	}
	if !h.modelAllowed(req.Model) {
		writeErrorObject(ctx, fasthttp.StatusUnprocessableEntity, h.modelRefused(fmt.Sprintf("model %q", req.Model)))
		return
	}
	c, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	a, err := h.cfg.Store.CreateAgent(c, store.Agent{Name: req.Name, SystemPrompt: req.SystemPrompt, Model: req.Model}, h.origin)
	if err != nil {
		h.storeFailed(ctx, "create agent", err)
		return
	}
	h.m.activity("agent.created")
	ctx.Response.Header.Set("Location", "/api/agents/"+a.ID)
	writeJSON(ctx, fasthttp.StatusCreated, a)
}

func (h *Handler) getAgent(ctx *fasthttp.RequestCtx, id string) {
	c, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	a, err := h.cfg.Store.Agent(c, id)
	if err != nil {
		h.storeFailed(ctx, "read agent", noAgent(id, err))
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, a)
}

func (h *Handler) deleteAgent(ctx *fasthttp.RequestCtx, id string) {
	c, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := h.cfg.Store.DeleteAgent(c, id, h.origin); err != nil {
		h.storeFailed(ctx, "delete agent", noAgent(id, err))
		return
	}
	h.m.activity("agent.deleted")
	ctx.SetStatusCode(fasthttp.StatusNoContent)
}

// storeFailed logs a store error that is not the client's doing and
// answers it.
func (h *Handler) storeFailed(ctx *fasthttp.RequestCtx, op string, err error) {
	if status, _ := statusOf(err); status >= 500 {
		h.m.storeError(op)
		h.log.Error().Err(err).Str("op", op).Msg("store call failed")
	}
	fail(ctx, err)
}

// writeJSON answers status with v as JSON.
func writeJSON(ctx *fasthttp.RequestCtx, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		fail(ctx, err)
		return
	}
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}
