package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"

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

func runWorker(cfg config, log zerolog.Logger) int {
	in, err := worker.Self()
	if err != nil {
		if errors.Is(err, worker.ErrNotWorker) {
			err = fmt.Errorf("%w (unset the CORRAL_* variables)", err)
		}
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitUsage
	}
	log = log.With().Int("worker", in.Slot).Int("pid", in.PID).Logger()
	// A worker drains on TERM and INT; HUP, TTIN and TTOU are the
	// supervisor's to act on, so a "pkill -HUP server" must not kill workers.
	signal.Ignore(syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	st, err := openStore(cfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitBootError
	}
	defer st.Close()
	model, err := newLLM(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitBootError
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
	defer h.Close()
	err = worker.Run(in, worker.Config{
		Handler:          h.Serve,
		Error:            handlers.WriteError,
		Logger:           log,
		AccessLog:        cfg.AccessLog,
		Proxies:          proxies(cfg),
		GracefulTimeout:  graceful(cfg),
		KeepAliveTimeout: cfg.KeepAliveTimeout,
		ReadTimeout:      cfg.ReadTimeout,
		DisableKeepAlive: cfg.KeepAliveTimeout == 0,
		MaxBodySize:      cfg.LimitRequestBody,
		MaxHeaderSize:    cfg.LimitRequestHead,
		MaxConcurrency:   cfg.LimitConcurrency,
		// /health answers from memory: a busy worker is not an unhealthy one.
		Unlimited: func(ctx *fasthttp.RequestCtx) bool { return string(ctx.Path()) == "/health" },
		Signals:   sigs,
		Metrics: func(w io.Writer) {
			if set == nil {
				return
			}
			set.WritePrometheus(w)
			metrics.WriteProcessMetrics(w)
			metrics.WriteFDMetrics(w)
		},
		OnMessage: func(m protocol.Message) {
			switch m.Type {
			case protocol.TypeReload:
				reload.Store(&handlers.ReloadStatus{Build: m.Build, Error: m.Error})
			case protocol.TypeDrain:
				draining.Store(true)
			}
		},
	})
	if err != nil {
		log.Error().Err(err).Msg("worker failed")
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitBootError
	}
	return exitOK
}

// proxies is the worker's view of --proxy-headers and --forwarded-allow-ips.
func proxies(cfg config) *worker.Proxies {
	if !cfg.ProxyHeaders {
		return nil
	}
	return &cfg.ForwardedAllowIPs
}
