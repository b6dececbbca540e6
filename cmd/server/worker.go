package main

import (
	"context"
	"io"
	"os"
	"sync/atomic"
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
	models, _ := cfg.models()
	// The supervisor tells the worker how the last reload build went.
	var reload atomic.Pointer[handlers.ReloadStatus]
	var draining atomic.Bool
	var acceptFailing atomic.Bool
	// Requests are counted only when the master serves metrics.
	var set *metrics.Set
	if in.Metrics {
		set = metrics.NewSet()
	}
	h := handlers.New(handlers.Config{
		Metrics:  set,
		Internal: worker.IsProbe,
		Reload:   reload.Load,
		Draining: draining.Load,
		// A worker out of descriptors says so in /health, as in its
		// heartbeat.
		AcceptFailing: acceptFailing.Load,
		Worker:        handlers.Worker{Slot: in.Slot, Generation: in.Generation, PID: in.PID, Started: in.Started},
		Store:         st,
		LLM:           model,
		LLMTimeout:    cfg.LLMTimeout,
		Logger:        log,
		APITokens:     cfg.APITokens,
		HostAllowed:   cfg.HostCheck(len(cfg.APITokens) > 0),
		Models:        models,
		CORSOrigins:   cfg.CORSOrigins,
		Extra:         extraRoutes,

		ChatMaxAttempts: cfg.ChatMaxAttempts,
		ChatQueueMax:    cfg.ChatQueueMax,

		IdempotencyWindow: cfg.IdemWindow,

		StreamsPerClient: cfg.LimitStreams,
		// The client as the access log names it: behind a trusted proxy,
		// the address that proxy forwarded.
		Client: wc.Proxies.Client,
	})
	// The chat runner starts beside the server rather than before it: its
	// start (River's first queries) is no reason to delay readiness, and a
	// failure is logged and leaves this worker serving requests, the other
	// workers running the queue.
	runner := make(chan *store.ChatRunner, 1)
	go func() {
		r, err := st.RunChats(context.Background(), store.RunConfig{
			Run:         h.RunChat,
			Concurrency: cfg.ChatConcurrency,
			RescueAfter: rescueAfter(cfg),
			Logger:      log,
		})
		if err != nil {
			log.Error().Err(err).Msg("chat runner not started")
		}
		runner <- r
	}()
	stopRunner := stopRunnerOnSignal(wc, runner, runnerBudget(cfg.GracefulTimeout), log)
	wc.Handler = h.Serve
	wc.OnAcceptFailing = acceptFailing.Store
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
	// The handlers check the Host (sparing /health) and fail /health
	// while draining themselves, with the API's own bodies.
	wc.HostAllowed, wc.DrainHealth = nil, false
	wc.OnMessage = func(m protocol.Message) {
		switch m.Type {
		case protocol.TypeReload:
			reload.Store(&handlers.ReloadStatus{Build: m.Build, Error: m.Error})
		case protocol.TypeDrain:
			draining.Store(true)
		}
	}
	return func() {
		stopRunner()
		h.Close()
		st.Close()
	}, nil
}

// stopRunnerOnSignal stops the chat runner when the worker's drain starts
// (its first TERM or INT), within budget, so that the chats it cannot
// finish go back to the queue before the supervisor's SIGKILL; the worker
// drains its requests meanwhile. It takes wc's signals and forwards them.
// The returned function stops the runner now if no signal came (the
// supervisor went away) and waits until it has stopped.
func stopRunnerOnSignal(wc *worker.Config, started <-chan *store.ChatRunner, budget time.Duration, log zerolog.Logger) func() {
	var runner *store.ChatRunner
	got := make(chan struct{})
	go func() {
		runner = <-started
		close(got)
	}()
	stop := func(ctx context.Context) error {
		<-got // RunChats does not wait on anything slow: River's start is local
		if runner == nil {
			return nil
		}
		return runner.Stop(ctx)
	}
	in := wc.Signals
	out := make(chan os.Signal, 2)
	wc.Signals = out
	stopped := make(chan struct{})
	quit := make(chan struct{})
	go func() {
		defer close(stopped)
		select {
		case sig := <-in:
			out <- sig
		case <-quit:
			return
		}
		go func() {
			for {
				select {
				case sig := <-in:
					select {
					case out <- sig:
					default:
					}
				case <-quit:
					return
				}
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), budget)
		defer cancel()
		if err := stop(ctx); err != nil {
			log.Error().Err(err).Msg("chat runner stop failed")
		}
	}()
	return func() {
		close(quit)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		stop(ctx)
		<-stopped
	}
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
