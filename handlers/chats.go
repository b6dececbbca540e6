package handlers

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/store"
)

// GET /api/chats/{id}, GET /api/chats/{id}/events and
// POST /api/chats/{id}/cancel: a chat's state, its events, its
// cancellation. Any worker on any host answers them for any chat.

// chatEventsPage is how many stored delta batches one read fetches.
const chatEventsPage = 500

// chatEventsPoll is how often an event stream looks for new deltas of a
// running chat (the writer batches them every deltaFlushEvery); status
// changes wake it at once through the activity feed.
const chatEventsPoll = 100 * time.Millisecond

// chatPath splits "/api/chats/{id}[/sub]"; sub is "", "events" or "cancel".
func chatPath(path string) (id, sub string, ok bool) {
	rest, found := strings.CutPrefix(path, "/api/chats/")
	if !found {
		return "", "", false
	}
	id, sub, _ = strings.Cut(rest, "/")
	if id == "" || (sub != "" && sub != "events" && sub != "cancel") {
		return "", "", false
	}
	return id, sub, true
}

// chatView is a chat as GET /api/chats/{id} shows it.
type chatView struct {
	ID         string       `json:"id"`
	AgentID    string       `json:"agent_id"`
	Status     string       `json:"status"`
	Background bool         `json:"background"`
	Attempts   int          `json:"attempts"`
	Created    time.Time    `json:"created"`
	Started    *time.Time   `json:"started"`
	Finished   *time.Time   `json:"finished"`
	Reply      *string      `json:"reply,omitempty"`
	Usage      *chatUsage   `json:"usage,omitempty"`
	Provider   string       `json:"provider,omitempty"`
	Model      string       `json:"model,omitempty"`
	DurationMS *int64       `json:"duration_ms,omitempty"`
	Error      *errorObject `json:"error,omitempty"`
	// LastError is why the previous attempt of a queued chat failed.
	LastError *errorObject `json:"last_error,omitempty"`
	// Reason says why a chat was cancelled.
	Reason   string `json:"reason,omitempty"`
	PID      int    `json:"pid,omitempty"`
	Worker   int    `json:"worker,omitempty"`
	Instance string `json:"instance,omitempty"`
}

// chatDetail is the stored detail of a chat (the finishing activity's data).
type chatDetail struct {
	Reason     string     `json:"reason"`
	Message    string     `json:"message"`
	Provider   string     `json:"provider"`
	Model      string     `json:"model"`
	DurationMS *int64     `json:"duration_ms"`
	Usage      *chatUsage `json:"usage"`
}

// failureMessages explain the reasons the server itself gives.
var failureMessages = map[string]string{
	"worker_died":      "the worker running the chat died",
	"server_restarted": "the server stopped while the chat ran",
	"worker_stopping":  "the worker running the chat stopped",
	"instance_lost":    "the server running the chat vanished",
}

func viewChat(c store.ChatRow) chatView {
	v := chatView{ID: c.ID, AgentID: c.AgentID, Status: c.Status, Background: c.Background, Attempts: c.Attempts, Created: c.Created}
	if !c.Started.IsZero() {
		v.Started = &c.Started
	}
	if !c.Finished.IsZero() {
		v.Finished = &c.Finished
	}
	var d chatDetail
	if c.Detail != "" {
		json.Unmarshal([]byte(c.Detail), &d)
	}
	errObj := func() *errorObject {
		msg := d.Message
		if msg == "" {
			msg = failureMessages[d.Reason]
		}
		return &errorObject{Code: d.Reason, Message: msg}
	}
	switch c.Status {
	case store.ChatCompleted:
		v.Reply, v.Usage, v.Provider, v.Model, v.DurationMS = &c.Reply, d.Usage, d.Provider, d.Model, d.DurationMS
		if v.Usage == nil {
			v.Usage = &chatUsage{}
		}
	case store.ChatFailed:
		v.Error = errObj()
	case store.ChatCancelled:
		v.Reason = d.Reason
	case store.ChatQueued:
		if d.Reason != "" {
			v.LastError = errObj()
		}
	case store.ChatRunning:
		v.PID, v.Worker, v.Instance = c.PID, c.Worker, c.Host
	}
	return v
}

// chatRoute serves the /api/chats/{id} routes.
func (h *Handler) chatRoute(ctx *fasthttp.RequestCtx, id, sub string) {
	switch sub {
	case "":
		if allow(ctx, "GET", "HEAD") {
			h.getChat(ctx, id)
		}
	case "events":
		if allow(ctx, "GET") {
			h.chatEvents(ctx, id, 0)
		}
	case "cancel":
		if allow(ctx, "POST") {
			h.cancelChat(ctx, id)
		}
	}
}

// getChat answers GET /api/chats/{id}, waiting up to ?wait= seconds for
// the chat to reach a final status.
func (h *Handler) getChat(ctx *fasthttp.RequestCtx, id string) {
	var wait time.Duration
	if v := ctx.QueryArgs().Peek("wait"); len(v) > 0 {
		f, err := strconv.ParseFloat(string(v), 64)
		if err != nil || !(f >= 0 && f <= maxWait.Seconds()) {
			fail(ctx, badRequest(fmt.Sprintf("parameter wait=%q: want seconds from 0 to %d", v, int(maxWait.Seconds()))))
			return
		}
		wait = time.Duration(f * float64(time.Second))
	}
	c, err := h.waitChat(ctx, id, wait)
	if err != nil {
		h.chatFailed(ctx, id, "read chat", err)
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, viewChat(c))
}

// waitChat reads chat id, waiting up to wait for it to be final; the
// client going away or the server shutting down ends the wait early.
func (h *Handler) waitChat(ctx *fasthttp.RequestCtx, id string, wait time.Duration) (store.ChatRow, error) {
	wc, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	if wait > 0 {
		defer h.watcher.watch(ctx.Conn(), cancel)()
		defer onShutdown(ctx, cancel)()
	}
	var release func()
	for {
		// Every change of a chat's status writes an activity: read the
		// feed's position first, then the chat, then wait past it.
		sc, scancel := context.WithTimeout(context.Background(), storeTimeout)
		last, err := h.cfg.Store.LastActivityID(sc)
		var c store.ChatRow
		if err == nil {
			c, err = h.cfg.Store.ChatByID(sc, id)
		}
		scancel()
		if err != nil || store.Final(c.Status) || wc.Err() != nil {
			return c, err
		}
		if release == nil {
			// Only a poll that waits holds a connection open.
			if release, err = h.holds.acquire(ctx); err != nil {
				return c, err
			}
			defer release()
		}
		if err := h.cfg.Store.WaitActivity(wc, last); err != nil && wc.Err() == nil {
			return c, err
		}
	}
}

// cancelChat answers POST /api/chats/{id}/cancel: a queued or running chat
// becomes cancelled wherever it runs (its worker sees the activity and
// closes the LLM call). Cancelling a cancelled chat answers it again; a
// completed or failed one is 409.
func (h *Handler) cancelChat(ctx *fasthttp.RequestCtx, id string) {
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	act, err := h.cfg.Store.EndChat(sc, id, store.Outcome{Status: store.ChatCancelled, Data: map[string]any{"reason": "cancel_requested"}})
	if err == nil {
		h.m.activity(act.Type)
	} else if !errors.Is(err, store.ErrChatFinished) {
		h.chatFailed(ctx, id, "cancel chat", err)
		return
	}
	c, err := h.cfg.Store.ChatByID(sc, id)
	if err != nil {
		h.chatFailed(ctx, id, "read chat", err)
		return
	}
	if c.Status != store.ChatCancelled {
		fail(ctx, &requestError{fasthttp.StatusConflict, fmt.Sprintf("chat %s is already %s", id, c.Status)})
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, viewChat(c))
}

// chatFailed answers a store error about chat id: 404 for an unknown chat.
func (h *Handler) chatFailed(ctx *fasthttp.RequestCtx, id, op string, err error) {
	if errors.Is(err, store.ErrNotFound) {
		writeErrorObject(ctx, fasthttp.StatusNotFound, errorObject{Code: "not_found", Message: "no such chat: " + id})
		return
	}
	h.storeFailed(ctx, op, err)
}

// chatEvents answers GET /api/chats/{id}/events: the chat's stored deltas
// after Last-Event-ID (or after), each with its id, then new ones as the
// running chat writes them, then "done" or "error" once it is final. A
// later attempt of a retried chat starts with a "retry" event; its deltas
// replace the earlier attempt's text. A synchronous chat's stream waits for
// its end and sends its whole reply as one delta.
func (h *Handler) chatEvents(ctx *fasthttp.RequestCtx, id string, after int64) {
	if v := ctx.Request.Header.Peek("Last-Event-ID"); len(v) > 0 {
		n, err := strconv.ParseInt(string(v), 10, 64)
		if err != nil || n < 0 {
			fail(ctx, badRequest(fmt.Sprintf("header Last-Event-ID %q: want an event id", v)))
			return
		}
		after = n
	}
	sc, scancel := context.WithTimeout(context.Background(), storeTimeout)
	c, err := h.cfg.Store.ChatByID(sc, id)
	scancel()
	if err != nil {
		h.chatFailed(ctx, id, "read chat", err)
		return
	}
	release, err := h.holds.acquire(ctx)
	if err != nil {
		fail(ctx, err)
		return
	}
	rc, cancel := context.WithCancel(context.Background())
	conn := ctx.Conn()
	unwatch := h.watcher.watch(conn, cancel)
	stopOnShutdown := onShutdown(ctx, cancel)
	interval := h.cfg.KeepAliveInterval
	ctx.Response.Header.Set("X-Chat-Id", c.ID)
	startSSE(ctx)
	ctx.SetBodyStreamWriter(func(w *bufio.Writer) {
		defer release()
		defer cancel()
		defer unwatch()
		defer stopOnShutdown()
		sw := newSSEWriter(w, interval, conn)
		defer sw.close()
		if sw.retry(time.Second) != nil {
			return
		}
		readFailed := func(err error) {
			if rc.Err() == nil {
				h.log.Error().Err(err).Str("chat_id", id).Msg("chat event stream read failed")
			}
		}
		// The attempt of the client's last delta: a resumed stream whose
		// next delta is of a later attempt starts with "retry", as an
		// unbroken one did.
		attempt := 0
		if after > 0 {
			prev, err := h.cfg.Store.ChatEvents(rc, id, after-1, 1)
			if err != nil {
				readFailed(err)
				return
			}
			if len(prev) == 1 && prev[0].Seq == after {
				attempt = prev[0].Attempt
			}
		}
		for {
			last, err := h.cfg.Store.LastActivityID(rc)
			if err == nil {
				c, err = h.cfg.Store.ChatByID(rc, id)
			}
			var evs []store.ChatEvent
			if err == nil {
				evs, err = h.cfg.Store.ChatEvents(rc, id, after, chatEventsPage)
			}
			if err != nil {
				readFailed(err)
				return
			}
			for _, e := range evs {
				if attempt != 0 && e.Attempt != attempt {
					b, _ := json.Marshal(struct {
						Attempt int `json:"attempt"`
					}{e.Attempt})
					if sw.event(0, "retry", b) != nil {
						return
					}
				}
				attempt = e.Attempt
				b, _ := json.Marshal(struct {
					Text string `json:"text"`
				}{e.Text})
				if sw.event(e.Seq, "delta", b) != nil {
					return
				}
				after = e.Seq
			}
			if len(evs) == chatEventsPage {
				continue
			}
			if store.Final(c.Status) {
				// The status was read before the events: everything the
				// chat wrote is sent. A synchronous chat stores no deltas
				// (its tokens go to its own caller only): its reply is one
				// delta, id 1.
				if !c.Background && c.Status == store.ChatCompleted && after < 1 {
					b, _ := json.Marshal(struct {
						Text string `json:"text"`
					}{c.Reply})
					if sw.event(1, "delta", b) != nil {
						return
					}
				}
				writeFinal(sw, c)
				return
			}
			wc, wcancel := context.WithTimeout(rc, chatEventsPoll)
			err = h.cfg.Store.WaitActivity(wc, last)
			wcancel()
			if rc.Err() != nil || errors.Is(err, store.ErrClosed) {
				return
			}
		}
	})
}

// writeFinal writes the "done" or "error" event that ends a chat's events.
func writeFinal(sw *sseWriter, c store.ChatRow) {
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
		b, _ := json.Marshal(res)
		sw.event(0, "done", b)
	case store.ChatCancelled:
		b, _ := json.Marshal(struct {
			Error errorObject `json:"error"`
		}{errorObject{Code: "cancelled", Message: "the chat was cancelled"}})
		sw.event(0, "error", b)
	default:
		b, _ := json.Marshal(struct {
			Error errorObject `json:"error"`
		}{*v.Error})
		sw.event(0, "error", b)
	}
}
