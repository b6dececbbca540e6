package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/handlers/store"
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
	osSigs := make(chan os.Signal, 2)
	signal.Notify(osSigs, syscall.SIGTERM, syscall.SIGINT)

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

		ChatMaxAttempts: cfg.ChatMaxAttempts,
		ChatQueueMax:    cfg.ChatQueueMax,
	})
	defer h.Close()
	runner, err := st.RunChats(context.Background(), store.RunConfig{
		Run:         h.RunChat,
		Concurrency: cfg.ChatConcurrency,
		RescueAfter: rescueAfter(cfg),
		Logger:      log,
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitBootError
	}
	// The first TERM or INT also stops the chat runner, within the graceful
	// budget so that the chats it cannot finish go back to the queue before
	// the supervisor's SIGKILL; the worker drains its requests meanwhile.
	sigs := make(chan os.Signal, 2)
	runnerStopped := make(chan struct{})
	quit := make(chan struct{})
	go func() {
		defer close(runnerStopped)
		select {
		case sig := <-osSigs:
			sigs <- sig
		case <-quit:
			return
		}
		go func() {
			for {
				select {
				case sig := <-osSigs:
					select {
					case sigs <- sig:
					default:
					}
				case <-quit:
					return
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), runnerBudget(graceful(cfg)))
		defer cancel()
		if err := runner.Stop(ctx); err != nil {
			log.Error().Err(err).Msg("chat runner stop failed")
		}
	}()
	defer func() {
		// Drained without a signal (the supervisor went away): stop now.
		close(quit)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		runner.Stop(ctx)
		<-runnerStopped
	}()
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

// runnerBudget is how long a stopping worker lets its background chats
// run on: most of the graceful budget, keeping time to hand back the rest
// before the supervisor's SIGKILL.
func runnerBudget(graceful time.Duration) time.Duration {
	return max(graceful-min(graceful/2, 2*time.Second), 0)
}

// rescueAfter is how long River waits before it takes back, by itself, a
// chat whose process vanished unreported: longer than any chat can run.
func rescueAfter(cfg config) time.Duration {
	return max(time.Hour, 2*cfg.LLMTimeout)
}

// proxies is the worker's view of --proxy-headers and --forwarded-allow-ips.
func proxies(cfg config) *worker.Proxies {
	if !cfg.ProxyHeaders {
		return nil
	}
	return &cfg.ForwardedAllowIPs
}
