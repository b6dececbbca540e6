package handlers

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"github.com/VictoriaMetrics/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// Store is what the API needs of the shared state; *store.Store provides it.
type Store interface {
	CreateAgent(ctx context.Context, a store.Agent, by store.Origin) (store.Agent, error)
	Agent(ctx context.Context, id string) (store.Agent, error)
	Agents(ctx context.Context, p store.AgentPage) ([]store.Agent, string, error)
	DeleteAgent(ctx context.Context, id string, by store.Origin) error
	StartChat(ctx context.Context, c store.Chat) (store.Activity, error)
	EndChat(ctx context.Context, chatID string, o store.Outcome) (store.Activity, error)
	ChatByID(ctx context.Context, id string) (store.ChatRow, error)
	BeginAttempt(ctx context.Context, chatID string, by store.Origin) (store.ChatRow, error)
	RequeueChat(ctx context.Context, chatID string, attempt int, r store.Requeue) (bool, error)
	AppendChatEvents(ctx context.Context, deltas []store.ChatDelta) error
	ChatEvents(ctx context.Context, chatID string, after int64, limit int) ([]store.ChatEvent, error)
	Activities(ctx context.Context, f store.Filter) ([]store.Activity, error)
	LastActivityID(ctx context.Context) (int64, error)
	WaitActivity(ctx context.Context, after int64) error
	Ping(ctx context.Context) error
}

// LLM runs chat completions; *llm.Simulated and *llm.OpenAI provide it.
type LLM interface {
	Complete(ctx context.Context, req llm.Request, onDelta func(string) error) (llm.Response, error)
}

// Worker identifies the process serving a request, as /health reports it.
type Worker struct {
	Slot, Generation, PID int
	Started               time.Time
}

// ReloadStatus is the last reload build's outcome, as /health shows it.
type ReloadStatus struct {
	Build string `json:"build"`           // "ok" or "failed"
	Error string `json:"error,omitempty"` // first line of the compiler output
}

// KeepAliveInterval is how often an idle event stream gets a comment line,
// so that proxies and load balancers do not close it.
const KeepAliveInterval = 15 * time.Second

// DefaultLLMTimeout bounds a chat's LLM call when Config.LLMTimeout is 0.
const DefaultLLMTimeout = llm.DefaultTimeout

// Config configures New.
type Config struct {
	// Worker is reported by /health and stamped on what this worker writes.
	Worker Worker
	// Store holds agents, chats and activities. Required for /api routes.
	Store Store
	// LLM answers chats. Required for /api/chat.
	LLM LLM
	// LLMTimeout bounds one chat's LLM call (504 past it). Default
	// DefaultLLMTimeout.
	LLMTimeout time.Duration
	// Logger receives handler events; the zero value discards them.
	Logger zerolog.Logger
	// APITokens, if any, are the bearer tokens /api/ requires.
	APITokens []string
	// HostAllowed, if set, reports whether /api/ answers a request whose
	// Host header is host (with or without a port); others get 421, so
	// that a page on a DNS rebinding domain cannot use the API. Nil
	// answers every host. /health answers every host.
	HostAllowed func(host string) bool
	// Models are the models an agent may name; an agent naming another is
	// refused (422) and a chat of such an agent is never sent upstream.
	// An agent without a model gets the provider's default, which the
	// caller keeps on the list. Nil allows any model.
	Models []string
	// CORSOrigins are the origins allowed to call the API from a browser;
	// "*" allows any. None by default.
	CORSOrigins []string
	// KeepAliveInterval overrides KeepAliveInterval (tests).
	KeepAliveInterval time.Duration
	// Draining, if set, reports whether the server is about to stop; /health
	// then answers 503 {"status":"draining"} so load balancers move away.
	Draining func() bool
	// AcceptFailing, if set, reports whether the worker's accept is
	// failing for want of descriptors; /health then says
	// "accept":"failing".
	AcceptFailing func() bool
	// Reload, if set, reports the state of the last reload build, which
	// /health then includes; nil outside reload mode.
	Reload func() *ReloadStatus
	// Metrics, if set, receives the API's metrics (requests by route and
	// status, durations, in flight, LLM calls and tokens, activities
	// written, store errors).
	Metrics *metrics.Set
	// Internal, if set, reports requests to leave out of the metrics (the
	// worker's own health probes).
	Internal func(ctx *fasthttp.RequestCtx) bool
	// ChatMaxAttempts is how many attempts a background chat gets before
	// it fails with its last error. Default DefaultChatMaxAttempts.
	ChatMaxAttempts int
	// ChatQueueMax, if positive, bounds the queued background chats: past
	// it POST /api/chat answers 503 with Retry-After.
	ChatQueueMax int
	// IdempotencyWindow is how long an Idempotency-Key names its chat.
	// Default store.DefaultIdempotencyWindow.
	IdempotencyWindow time.Duration
	// StreamsPerClient, if positive, bounds the event streams and
	// long-polls one client holds at once on this worker; past it the
	// client gets 429 with Retry-After. 0 means no limit.
	StreamsPerClient int
	// Client, if set, names a request's client for StreamsPerClient (the
	// address behind trusted proxies); nil takes the peer's address.
	Client func(ctx *fasthttp.RequestCtx) string
	// Extra, if set, is consulted before the built-in routes and reports
	// whether it answered. It is a test seam (test-only routes), nil in
	// production.
	Extra func(ctx *fasthttp.RequestCtx) bool
}

// Handler is the API of one worker. Its Serve method may be called
// concurrently.
type Handler struct {
	cfg     Config
	log     zerolog.Logger
	origin  store.Origin
	watcher *watcher
	m       *meters
	store   storeHealth
	tokens  [][]byte // SHA-256 of each API token
	cancels *cancels
	deltas  *deltaBatcher
	holds   *holds
}

// New returns the API handler. Close releases its background goroutine.
func New(cfg Config) *Handler {
	if cfg.LLMTimeout <= 0 {
		cfg.LLMTimeout = DefaultLLMTimeout
	}
	if cfg.KeepAliveInterval <= 0 {
		cfg.KeepAliveInterval = KeepAliveInterval
	}
	if cfg.ChatMaxAttempts <= 0 {
		cfg.ChatMaxAttempts = DefaultChatMaxAttempts
	}
	if cfg.IdempotencyWindow <= 0 {
		cfg.IdempotencyWindow = store.DefaultIdempotencyWindow
	}
	h := &Handler{
		cfg:     cfg,
		log:     cfg.Logger,
		origin:  store.Origin{Worker: cfg.Worker.Slot, PID: cfg.Worker.PID},
		watcher: newWatcher(),
		m:       newMeters(cfg.Metrics),
		holds:   newHolds(cfg.StreamsPerClient, cfg.Client),
	}
	h.cancels = &cancels{h: h, running: map[string]context.CancelCauseFunc{}}
	h.deltas = newDeltaBatcher(cfg.Store, func(err error) {
		h.m.storeError("append chat events")
		h.log.Error().Err(err).Msg("chat deltas not stored")
	})
	for _, t := range cfg.APITokens {
		sum := sha256.Sum256([]byte(t))
		h.tokens = append(h.tokens, sum[:])
	}
	return h
}

// Close stops the handler's background goroutines: the disconnect watcher
// (requests still running see no more disconnects), the cancellation
// follower and the delta writer, after it wrote what it holds. Stop the
// chat runner first.
func (h *Handler) Close() {
	h.watcher.close()
	h.cancels.close()
	h.deltas.close()
}

// Serve answers one request.
func (h *Handler) Serve(ctx *fasthttp.RequestCtx) {
	if h.m == nil || h.cfg.Internal != nil && h.cfg.Internal(ctx) {
		h.serve(ctx)
		return
	}
	route := routeOf(string(ctx.Path()))
	start := h.m.begin(route)
	h.serve(ctx)
	h.m.end(route, ctx.Response.StatusCode(), start)
}

func (h *Handler) serve(ctx *fasthttp.RequestCtx) {
	if h.cfg.Extra != nil && h.cfg.Extra(ctx) {
		return
	}
	path := string(ctx.Path())
	if path == "/health" {
		if allow(ctx, "GET", "HEAD") {
			h.health(ctx)
		}
		return
	}
	if !strings.HasPrefix(path, "/api/") {
		fail(ctx, errNoRoute)
		return
	}
	if !h.hostAllowed(ctx) {
		return
	}
	if h.cors(ctx) {
		return
	}
	if !h.authorized(ctx) {
		return
	}
	if err := repeatedParam(ctx.QueryArgs()); err != nil {
		fail(ctx, err)
		return
	}
	switch {
	case path == "/api/chat":
		if allow(ctx, "POST") {
			h.chat(ctx)
		}
	case strings.HasPrefix(path, "/api/chats/"):
		id, sub, ok := chatPath(path)
		if !ok {
			fail(ctx, errNoRoute)
			return
		}
		h.chatRoute(ctx, id, sub)
	case path == "/api/activities":
		if allow(ctx, "GET", "HEAD") {
			h.activities(ctx)
		}
	case path == "/api/activities/stream":
		if allow(ctx, "GET") {
			h.activityStream(ctx)
		}
	case path == "/api/agents":
		switch {
		case ctx.IsGet() || ctx.IsHead():
			h.listAgents(ctx)
		case ctx.IsPost():
			h.createAgent(ctx)
		default:
			allow(ctx, "GET", "HEAD", "POST")
		}
	case strings.HasPrefix(path, "/api/agents/") && !strings.Contains(path[len("/api/agents/"):], "/"):
		id := path[len("/api/agents/"):]
		switch {
		case ctx.IsGet() || ctx.IsHead():
			h.getAgent(ctx, id)
		case ctx.IsDelete():
			h.deleteAgent(ctx, id)
		default:
			allow(ctx, "GET", "HEAD", "DELETE")
		}
	default:
		fail(ctx, errNoRoute)
	}
}

// storeHealth is the store's state as /health reports it: "ok" or "down",
// from a ping made in the background at most once per storePingEvery, so
// that /health itself never waits on the database.
type storeHealth struct {
	down     atomic.Bool
	pingedAt atomic.Int64 // unix nanoseconds of the last ping started
}

const storePingEvery = time.Second

func (sh *storeHealth) state(st Store) string {
	now := time.Now().UnixNano()
	last := sh.pingedAt.Load()
	if now-last >= int64(storePingEvery) && sh.pingedAt.CompareAndSwap(last, now) {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), storePingEvery)
			defer cancel()
			sh.down.Store(st.Ping(ctx) != nil)
		}()
	}
	if sh.down.Load() {
		return "down"
	}
	return "ok"
}

// allow reports whether the request's method is one of methods, and
// answers 405 with Allow when it is not.
func allow(ctx *fasthttp.RequestCtx, methods ...string) bool {
	m := string(ctx.Method())
	for _, a := range methods {
		if m == a {
			return true
		}
	}
	ctx.Response.Header.Set("Allow", strings.Join(methods, ", "))
	fail(ctx, errMethod)
	return false
}

func (h *Handler) health(ctx *fasthttp.RequestCtx) {
	w := h.cfg.Worker
	b := make([]byte, 0, 128)
	if h.cfg.Draining != nil && h.cfg.Draining() {
		ctx.SetStatusCode(fasthttp.StatusServiceUnavailable)
		b = append(b, `{"status":"draining","pid":`...)
	} else {
		b = append(b, `{"status":"ok","pid":`...)
	}
	b = strconv.AppendInt(b, int64(w.PID), 10)
	b = append(b, `,"worker":`...)
	b = strconv.AppendInt(b, int64(w.Slot), 10)
	b = append(b, `,"generation":`...)
	b = strconv.AppendInt(b, int64(w.Generation), 10)
	b = append(b, `,"uptime_s":`...)
	b = strconv.AppendFloat(b, time.Since(w.Started).Seconds(), 'f', 3, 64)
	if h.cfg.Store != nil {
		b = append(b, `,"store":"`...)
		b = append(b, h.store.state(h.cfg.Store)...)
		b = append(b, '"')
	}
	if h.cfg.AcceptFailing != nil && h.cfg.AcceptFailing() {
		// Still 200: the worker serves the connections it has; new ones
		// wait in the backlog (a neighbour takes them) until it accepts.
		b = append(b, `,"accept":"failing"`...)
	}
	if h.cfg.Reload != nil {
		if st := h.cfg.Reload(); st != nil {
			rb, _ := json.Marshal(st)
			b = append(b, `,"reload":`...)
			b = append(b, rb...)
		}
	}
	b = append(b, '}')
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}
