package handlers

import (
	"strconv"
	"time"

	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"
)

// Worker identifies the process serving a request, as /health reports it.
type Worker struct {
	Slot, Generation, PID int
	Started               time.Time
}

// Config configures New.
type Config struct {
	// Worker is reported by /health and stamped on what this worker writes.
	Worker Worker
	// Logger receives handler events; the zero value discards them.
	Logger zerolog.Logger
	// Extra, if set, is consulted before the built-in routes and reports
	// whether it answered. It is a test seam (test-only routes), nil in
	// production.
	Extra func(ctx *fasthttp.RequestCtx) bool
}

// Handler is the API of one worker. Its Serve method may be called
// concurrently.
type Handler struct {
	cfg Config
}

// New returns the API handler.
func New(cfg Config) *Handler {
	return &Handler{cfg: cfg}
}

// Serve answers one request.
func (h *Handler) Serve(ctx *fasthttp.RequestCtx) {
	if h.cfg.Extra != nil && h.cfg.Extra(ctx) {
		return
	}
	switch string(ctx.Path()) {
	case "/health":
		h.health(ctx)
	default:
		WriteError(ctx, fasthttp.StatusNotFound, errNotFound)
	}
}

func (h *Handler) health(ctx *fasthttp.RequestCtx) {
	if !ctx.IsGet() && !ctx.IsHead() {
		ctx.Response.Header.Set("Allow", "GET, HEAD")
		WriteError(ctx, fasthttp.StatusMethodNotAllowed, errMethod)
		return
	}
	w := h.cfg.Worker
	b := make([]byte, 0, 128)
	b = append(b, `{"status":"ok","pid":`...)
	b = strconv.AppendInt(b, int64(w.PID), 10)
	b = append(b, `,"worker":`...)
	b = strconv.AppendInt(b, int64(w.Slot), 10)
	b = append(b, `,"generation":`...)
	b = strconv.AppendInt(b, int64(w.Generation), 10)
	b = append(b, `,"uptime_s":`...)
	b = strconv.AppendFloat(b, time.Since(w.Started).Seconds(), 'f', 3, 64)
	b = append(b, '}')
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}
