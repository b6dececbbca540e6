package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// targetMetricsCost is the most throughput the metrics may cost.
const targetMetricsCost = 0.05

// metricsRow is one variant at one worker count.
type metricsRow struct {
	Workers int
	Variant string
	RPS     []float64 // one per round, in run order
	P99     []time.Duration
	Errors  int
	Load    []string
	Median  float64
	// Ratio is the median / the median without metrics; PairedRatio the
	// median of this run / the run without metrics of the same round.
	Ratio, PairedRatio float64
}

// metrics alternates wrk runs on /health over a server without
// METRICS_ADDR and one with METRICS_ADDR=127.0.0.1:0, both ACCESS_LOG=false,
// with 1 and 2 workers. The order flips every round (off, on; on, off; ...)
// so that a drift of the machine weighs on both alike.
func (b *bench) metrics() error {
	for _, n := range []int{1, 2} {
		off, err := b.startServer(fmt.Sprintf("metrics-%d-off", n), serverOpts{workers: n})
		if err != nil {
			return err
		}
		on, err := b.startServer(fmt.Sprintf("metrics-%d-on", n), serverOpts{workers: n, env: []string{"METRICS_ADDR=127.0.0.1:0"}})
		if err != nil {
			return err
		}
		rows := []*metricsRow{{Workers: n, Variant: "metrics off"}, {Workers: n, Variant: "METRICS_ADDR=127.0.0.1:0"}}
		ts := []*target{off, on}
		for _, t := range ts {
			if _, err := runWrk(2, 100, time.Second, "http://"+t.addr+"/health", "", &b.res.WrkRetries); err != nil {
				return err
			}
		}
		for round := 1; round <= b.metricsRounds; round++ {
			order := []int{0, 1}
			if round%2 == 0 {
				order = []int{1, 0}
			}
			for _, i := range order {
				row, t := rows[i], ts[i]
				raw := filepath.Join(b.out, fmt.Sprintf("wrk-metrics-%d-%s-%d.txt", n, slug(row.Variant), round))
				w, err := runWrk(2, 100, b.wrkDur, "http://"+t.addr+"/health", raw, &b.res.WrkRetries)
				if err != nil || w.Errors() > 0 {
					b.res.Anomalies = append(b.res.Anomalies, fmt.Sprintf("metrics %d workers %s round %d: %d wrk errors, err %v; listeners on the port: %s",
						n, row.Variant, round, w.Errors(), err, listenersOn(t.addr)))
				}
				if err != nil {
					row.RPS = append(row.RPS, 0) // keeps the rounds paired; ignored below
					continue
				}
				row.RPS = append(row.RPS, w.RPS)
				row.P99 = append(row.P99, w.P99)
				row.Errors += w.Errors()
				row.Load = append(row.Load, loadAvg1())
				fmt.Fprintf(os.Stderr, "  %d workers %-26s round %d: %8.0f req/s  p99 %v\n", n, row.Variant, round, w.RPS, w.P99)
			}
		}
		for _, t := range ts {
			t.stop()
			delete(b.live, t)
		}
		base := rows[0]
		for _, row := range rows {
			row.Median = median(nonZero(row.RPS))
			row.Ratio = row.Median / base.Median
			var pr []float64
			for i := range min(len(row.RPS), len(base.RPS)) {
				if base.RPS[i] > 0 && row.RPS[i] > 0 {
					pr = append(pr, row.RPS[i]/base.RPS[i])
				}
			}
			row.PairedRatio = median(pr)
			b.res.Metrics = append(b.res.Metrics, *row)
		}
	}
	return nil
}

func nonZero(v []float64) []float64 {
	var out []float64
	for _, x := range v {
		if x > 0 {
			out = append(out, x)
		}
	}
	return out
}

// metricsMarkdown writes the scenario's table.
func metricsMarkdown(rows []metricsRow, p func(string, ...any)) {
	p("## j. Metrics cost: GET /health, wrk -t2 -c100 -d10s, ACCESS_LOG=false, with and without METRICS_ADDR\n\n")
	p("Rounds alternate the two servers, the order flipping every round (off, on; on, off; ...).\n\n")
	p("| workers | variant | req/s per round | median req/s | vs off (medians) | vs off (median of paired runs) | p99 per run | wrk errors | load avg after each run | target cost <= %.0f %% |\n", targetMetricsCost*100)
	p("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, r := range rows {
		runs := make([]string, len(r.RPS))
		for i, v := range r.RPS {
			runs[i] = fmt.Sprintf("%.0f", v)
		}
		p99 := make([]string, len(r.P99))
		for i, v := range r.P99 {
			p99[i] = fmt.Sprintf("%.2f", ms(v))
		}
		target := ""
		if r.Variant != "metrics off" {
			target = passFail(r.Ratio >= 1-targetMetricsCost && r.PairedRatio >= 1-targetMetricsCost)
		}
		p("| %d | %s | %s | %.0f | %.3fx | %.3fx | %s ms | %d | %s | %s |\n", r.Workers, r.Variant, strings.Join(runs, ", "), r.Median, r.Ratio, r.PairedRatio,
			strings.Join(p99, ", "), r.Errors, strings.Join(r.Load, ", "), target)
	}
	p("\n")
}
