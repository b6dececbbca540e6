package handlers

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/store"
)

// Activity listing limits.
const (
	defaultActivityLimit = 50
	maxActivityLimit     = store.MaxLimit
	maxWait              = 60 * time.Second
)

// activityTypes are the types of activity the store writes (see
// handlers/store/doc.go), in the order of the table in docs/api.md, which
// TestActivityTypesDocumented checks. A type= outside it is refused rather
// than answered with nothing: a typo would otherwise look like a quiet
// feed, and with wait= hold the client for the whole wait.
var activityTypes = []string{
	"agent.created",
	"agent.deleted",
	"chat.queued",
	"chat.started",
	"chat.retried",
	"chat.completed",
	"chat.failed",
	"chat.cancelled",
}

// activityQuery is the parsed query of the activity routes.
type activityQuery struct {
	filter store.Filter
	wait   time.Duration
}

// parseActivityQuery reads after, limit, agent_id, type and wait, naming
// the parameter of a bad value.
func parseActivityQuery(args *fasthttp.Args) (activityQuery, error) {
	var q activityQuery
	if v := args.Peek("after"); len(v) > 0 {
		n, err := strconv.ParseInt(string(v), 10, 64)
		if err != nil || n < 0 {
			return q, badRequest(fmt.Sprintf("parameter after=%q: want an activity id (a whole number, 0 or more)", v))
		}
		q.filter.After = n
	}
	var err error
	if q.filter.Limit, err = parseLimit(args, defaultActivityLimit, maxActivityLimit); err != nil {
		return q, err
	}
	if v := args.Peek("wait"); len(v) > 0 {
		f, err := strconv.ParseFloat(string(v), 64)
		// Negated so that NaN, which compares false to everything, is refused.
		if err != nil || !(f >= 0 && f <= maxWait.Seconds()) {
			return q, badRequest(fmt.Sprintf("parameter wait=%q: want seconds from 0 to %d", v, int(maxWait.Seconds())))
		}
		q.wait = time.Duration(f * float64(time.Second))
	}
	if v := args.Peek("type"); len(v) > 0 {
		if !slices.Contains(activityTypes, string(v)) {
			return q, badRequest(fmt.Sprintf("parameter type=%q: want one of %s", v, strings.Join(activityTypes, ", ")))
		}
		q.filter.Type = string(v)
	}
	q.filter.AgentID = string(args.Peek("agent_id"))
	return q, nil
}

// repeatedParam refuses a query parameter given more than once: every
// parameter of the API takes one value, and which of two would count is
// not for the server to guess.
func repeatedParam(args *fasthttp.Args) error {
	if args.Len() < 2 {
		return nil
	}
	seen := make(map[string]int, args.Len())
	dup := ""
	for k := range args.All() {
		seen[string(k)]++
		if dup == "" && seen[string(k)] == 2 {
			dup = string(k)
		}
	}
	if dup == "" {
		return nil
	}
	return badRequest(fmt.Sprintf("parameter %q is given %d times: give it once", dup, seen[dup]))
}

// parseLimit reads ?limit=, a page size from 1 to max; def when absent.
func parseLimit(args *fasthttp.Args, def, max int) (int, error) {
	v := args.Peek("limit")
	if len(v) == 0 {
		return def, nil
	}
	n, err := strconv.Atoi(string(v))
	if err != nil || n < 1 || n > max {
		return 0, badRequest(fmt.Sprintf("parameter limit=%q: want a whole number from 1 to %d", v, max))
	}
	return n, nil
}

// activities answers GET /api/activities, long-polling up to wait seconds
// when nothing newer than after exists yet.
func (h *Handler) activities(ctx *fasthttp.RequestCtx) {
	q, err := parseActivityQuery(ctx.QueryArgs())
	if err != nil {
		fail(ctx, err)
		return
	}
	c, cancel := context.WithTimeout(context.Background(), storeTimeout+q.wait)
	defer cancel()
	acts, err := h.cfg.Store.Activities(c, q.filter)
	if err == nil && len(acts) == 0 && q.wait > 0 {
		release, herr := h.holds.acquire(ctx)
		if herr != nil {
			fail(ctx, herr)
			return
		}
		acts, err = h.waitActivities(ctx, q)
		release()
	}
	if err != nil {
		h.storeFailed(ctx, "list activities", err)
		return
	}
	next := q.filter.After
	if len(acts) > 0 {
		next = acts[len(acts)-1].ID
	}
	if acts == nil {
		acts = []store.Activity{}
	}
	writeJSON(ctx, fasthttp.StatusOK, struct {
		Activities []store.Activity `json:"activities"`
		NextAfter  int64            `json:"next_after"`
	}{acts, next})
}

// waitActivities waits until an activity matching q exists, q.wait passes,
// the client goes away or the server shuts down; the last three answer
// with an empty list, which tells the client to poll again.
func (h *Handler) waitActivities(ctx *fasthttp.RequestCtx, q activityQuery) ([]store.Activity, error) {
	wc, cancel := context.WithTimeout(context.Background(), q.wait)
	defer cancel()
	defer h.watcher.watch(ctx.Conn(), cancel)()
	// A draining worker ends its long-polls so the drain is not held by them.
	stopOnShutdown := onShutdown(ctx, cancel)
	defer stopOnShutdown()
	for {
		// The last id is read before the query, never after: an activity
		// committed between an empty query and a later read of the last id
		// would be counted as seen and the poll would sleep past it.
		last, err := h.cfg.Store.LastActivityID(wc)
		if err != nil {
			return nil, ignoreDone(wc, err)
		}
		acts, err := h.cfg.Store.Activities(wc, q.filter)
		if err != nil || len(acts) > 0 {
			return acts, ignoreDone(wc, err)
		}
		if err := h.cfg.Store.WaitActivity(wc, max(last, q.filter.After)); err != nil {
			return nil, ignoreDone(wc, err)
		}
	}
}

// ignoreDone drops err when it only says that c ended.
func ignoreDone(c context.Context, err error) error {
	if err != nil && c.Err() != nil {
		return nil
	}
	return err
}

// activityStream answers GET /api/activities/stream: every activity after
// Last-Event-ID (or ?after=) as a server-sent event, then new ones as they
// are written by any worker, until the client or the server goes away.
func (h *Handler) activityStream(ctx *fasthttp.RequestCtx) {
	q, err := parseActivityQuery(ctx.QueryArgs())
	if err != nil {
		fail(ctx, err)
		return
	}
	if v := ctx.Request.Header.Peek("Last-Event-ID"); len(v) > 0 {
		n, err := strconv.ParseInt(string(v), 10, 64)
		if err != nil || n < 0 {
			fail(ctx, badRequest(fmt.Sprintf("header Last-Event-ID %q: want an activity id", v)))
			return
		}
		q.filter.After = n
	}
	q.filter.Limit = maxActivityLimit
	release, err := h.holds.acquire(ctx)
	if err != nil {
		fail(ctx, err)
		return
	}
	sc, cancel := context.WithCancel(context.Background())
	conn := ctx.Conn()
	unwatch := h.watcher.watch(conn, cancel)
	stopOnShutdown := onShutdown(ctx, cancel)
	interval := h.cfg.KeepAliveInterval
	startSSE(ctx)
	ctx.SetBodyStreamWriter(func(w *bufio.Writer) {
		defer release()
		defer cancel()
		defer unwatch()
		defer stopOnShutdown()
		sw := newSSEWriter(w, interval, conn)
		defer sw.close()
		// Reconnect soon after a worker drains; the id resumes the feed.
		if sw.retry(time.Second) != nil {
			return
		}
		for {
			// The last id is read before the query, as in waitActivities,
			// so that nothing committed in between is waited past.
			last, err := h.cfg.Store.LastActivityID(sc)
			if err != nil {
				return
			}
			acts, err := h.cfg.Store.Activities(sc, q.filter)
			if err != nil {
				if sc.Err() == nil {
					h.log.Error().Err(err).Msg("activity stream read failed")
				}
				return
			}
			for _, a := range acts {
				b, _ := json.Marshal(a)
				if sw.event(a.ID, "activity", b) != nil {
					return
				}
				q.filter.After = a.ID
			}
			if len(acts) == q.filter.Limit {
				continue
			}
			if h.cfg.Store.WaitActivity(sc, max(last, q.filter.After)) != nil {
				return
			}
		}
	})
}
