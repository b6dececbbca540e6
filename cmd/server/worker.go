package main

import (
	"io"
	"sync/atomic"

	"github.com/VictoriaMetrics/metrics"
	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/supervisor/protocol"
	"github.com/corralhq/corral/worker"
)

// extraRoutes is a test seam: the test binary, standing in for the server,
// adds test-only routes (slow, panic) here. Nil in production.
var extraRoutes func(ctx *fasthttp.RequestCtx) bool

// prepareWorker is the server's part of a worker: it opens the store and
// the LLM client and sets the handlers of package handlers on wc. The
// returned function closes them after the drain.
func prepareWorker(cfg config, in worker.Info, log zerolog.Logger, wc *worker.Config) (func(), error) {
	st, err := openStore(cfg, log)
	if err != nil {
		return nil, err
	}
	model, err := newLLM(cfg)
	if err != nil {
		st.Close()
		return nil, err
	}
	// The supervisor tells the worker how the last reload build went.
	var reload atomic.Pointer[handlers.ReloadStatus]
	var draining atomic.Bool
	// Requests are counted only when the master serves metrics.
	var set *metrics.Set
	if in.Metrics {
		set = metrics.NewSet()
	}
	h := handlers.New(handlers.Config{
		Metrics:     set,
		Internal:    worker.IsProbe,
		Reload:      reload.Load,
		Draining:    draining.Load,
		Worker:      handlers.Worker{Slot: in.Slot, Generation: in.Generation, PID: in.PID, Started: in.Started},
		Store:       st,
		LLM:         model,
		LLMTimeout:  cfg.LLMTimeout,
		Logger:      log,
		APITokens:   cfg.APITokens,
		CORSOrigins: cfg.CORSOrigins,
		Extra:       extraRoutes,
	})
	wc.Handler = h.Serve
	wc.Error = handlers.WriteError
	// /health answers from memory: a busy worker is not an unhealthy one.
	wc.Unlimited = func(ctx *fasthttp.RequestCtx) bool { return string(ctx.Path()) == "/health" }
	wc.Metrics = func(w io.Writer) {
		if set == nil {
			return
		}
		handlers.WriteMetricsMeta(w)
		set.WritePrometheus(w)
		metrics.WriteProcessMetrics(w)
		metrics.WriteFDMetrics(w)
	}
	wc.OnMessage = func(m protocol.Message) {
		switch m.Type {
		case protocol.TypeReload:
			reload.Store(&handlers.ReloadStatus{Build: m.Build, Error: m.Error})
		case protocol.TypeDrain:
			draining.Store(true)
		}
	}
	return func() {
		h.Close()
		st.Close()
	}, nil
}
