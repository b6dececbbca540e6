package main

import (
	"testing"
	"time"

	"github.com/VictoriaMetrics/metrics"
	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers"
)

// BenchmarkHealthHandler measures what the request metrics add to one GET
// /health in the handler alone, without the network: the worker builds its
// handler with a metrics.Set whether or not METRICS_ADDR is set, so the
// wrk runs of the metrics scenario cannot show this part. Run it with
//
//	go test -run '^$' -bench HealthHandler -benchmem -count 6 ./bench/procbench/
func BenchmarkHealthHandler(b *testing.B) {
	for _, c := range []struct {
		name string
		set  *metrics.Set
	}{{"metrics=nil", nil}, {"metrics=set", metrics.NewSet()}} {
		b.Run(c.name, func(b *testing.B) {
			h := handlers.New(handlers.Config{
				Worker:  handlers.Worker{Slot: 1, Generation: 1, PID: 4242, Started: time.Now()},
				Metrics: c.set,
			})
			defer h.Close()
			var ctx fasthttp.RequestCtx
			b.ReportAllocs()
			for b.Loop() {
				ctx.Request.Reset()
				ctx.Response.Reset()
				ctx.Request.Header.SetMethod("GET")
				ctx.Request.SetRequestURI("/health")
				h.Serve(&ctx)
				if ctx.Response.StatusCode() != fasthttp.StatusOK {
					b.Fatalf("GET /health = %d, want 200", ctx.Response.StatusCode())
				}
			}
		})
	}
}
