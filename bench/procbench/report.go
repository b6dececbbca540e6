package main

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// Targets of the process-model issue.
const (
	targetRatio   = 0.9
	targetCrash   = 100 * time.Millisecond
	targetHangP99 = 100 * time.Millisecond
	targetStartup = 150 * time.Millisecond
)

func passFail(ok bool) string {
	if ok {
		return "pass"
	}
	return "**FAIL**"
}

// fms formats a duration in milliseconds, one decimal.
func fms(d time.Duration) string {
	if d < 0 {
		return "n/a"
	}
	return fmt.Sprintf("%.1f ms", ms(d))
}

func mib(kib int) string { return fmt.Sprintf("%.1f MiB", float64(kib)/1024) }

// markdown renders the results as the tables of docs/benchmarks.md.
func (r results) markdown() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	m := r.Machine
	p("## Machine\n\n")
	p("- CPUs: %d (%s)\n- Memory: %s\n- Kernel: %s\n- Go: %s\n- wrk: %s\n- Server: %s\n", m.CPUs, m.CPUModel, m.MemTotal, m.Kernel, m.Go, m.Wrk, m.Server)
	p("- net.ipv4.tcp_migrate_req: %s\n- Load average before the run: %s\n- Run: %s to %s\n\n", m.MigrateReq, m.LoadAvgBefore, r.Started, r.Finished)

	if len(r.Throughput) > 0 {
		p("## a. Throughput: GET /health, wrk -t2 -c100 -d10s\n\n")
		p("| procs | variant | req/s per run (run order) | median req/s | vs baseline (medians) | vs baseline (median of paired runs) | p99 per run | wrk errors | load avg after each run | target >= %.1fx |\n", targetRatio)
		p("|---|---|---|---|---|---|---|---|---|---|\n")
		for _, t := range r.Throughput {
			runs := make([]string, len(t.RPS))
			for i, v := range t.RPS {
				runs[i] = fmt.Sprintf("%.0f", v)
			}
			p99 := make([]string, len(t.P99))
			for i, v := range t.P99 {
				p99[i] = fmt.Sprintf("%.2f", ms(v))
			}
			target := ""
			if t.Variant == "server, access log off" {
				target = passFail(t.Ratio >= targetRatio && t.PairedRatio >= targetRatio)
			}
			p("| %d | %s | %s | %.0f | %.2fx | %.2fx | %s ms | %d | %s | %s |\n", t.Procs, t.Variant, strings.Join(runs, ", "), t.Median, t.Ratio, t.PairedRatio, strings.Join(p99, ", "), t.Errors, strings.Join(t.Load, ", "), target)
		}
		p("\n")
		for _, t := range r.Throughput {
			if t.LogB > 0 && t.LogReqs > 0 {
				p("- %d proc, access log on: %.0f bytes of log per request, %.0f MB written during the measured runs.\n",
					t.Procs, float64(t.LogB)/float64(t.LogReqs), float64(t.LogB)/1e6)
			}
		}
		p("\n")
	}

	if c := r.Crash; c != nil {
		p("## b. Crash: SIGKILL of one worker, %d workers, open-loop %d req/s, new connection per request\n\n", c.Workers, c.Rate)
		p("| kill | slot | kill -> exit seen | kill -> replacement ready (log) | kill -> first 200 from new pid | in flight at kill (all / to the victim) | failed near kill | failed / requests (trial) |\n")
		p("|---|---|---|---|---|---|---|---|\n")
		for i, t := range c.Trials {
			p("| %d | %d | %s | %s | %s | %d / %d | %d | %d / %d |\n", i+1, t.Slot, fms(t.ExitSeen), fms(t.Ready), fms(t.FirstOK), t.InFlight, t.InFlightVictim, t.FailedNearKill, t.Failed, t.Requests)
		}
		p("| **median** | | | **%s** | **%s** | %d / %d (sum) | | %d / %d (sum) |\n\n", fms(c.MedianReady), fms(c.MedianFirstOK), c.InFlight, c.InFlightVictim, c.Failed, c.Requests)
		p("Target: replacement serving in under %s: %s (median kill -> ready %s, kill -> first 200 %s).\n\n",
			fms(targetCrash), passFail(c.MedianReady < targetCrash && c.MedianFirstOK < targetCrash), fms(c.MedianReady), fms(c.MedianFirstOK))
		if len(c.Repeat) > 0 {
			p("Same slot killed %d times in a row (one server; the crash backoff applies from the second crash):\n\n", len(c.Repeat))
			p("| kill | kill -> replacement ready | kill -> first 200 from new pid | in flight to the victim | failed near kill |\n|---|---|---|---|---|\n")
			for i, t := range c.Repeat {
				p("| %d | %s | %s | %d | %d |\n", i+1, fms(t.Ready), fms(t.FirstOK), t.InFlightVictim, t.FailedNearKill)
			}
			p("\n")
		}
	}

	if len(r.Hang) > 0 {
		p("## c. Hang: SIGSTOP of process 1, open-loop %d req/s, new connection per request\n\n", r.Rate)
		p("| target | stopped for | hang detected after | requests while stopped | p50 | p99 | max | over 100 ms | over 1 s or timed out | stranded (answered by the stopped pid after SIGCONT) | failed | p99 in the next second | target p99 < %s |\n", fms(targetHangP99))
		p("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, h := range r.Hang {
			det := "n/a (no supervisor)"
			if h.HungSeen > 0 {
				det = fms(h.HungSeen)
			}
			target := ""
			if strings.HasPrefix(h.Target, "server") {
				target = passFail(h.During.P99 < targetHangP99 && h.During.Failed == 0)
			}
			p("| %s | %s | %s | %d | %s | %s | %s | %d | %d | %d | %d%s | %s | %s |\n", h.Target, fms(h.Stopped), det, h.During.Count,
				fms(h.During.P50), fms(h.During.P99), fms(h.During.Max), h.During.Over100ms, h.During.Slow, h.VictimLater, h.During.Failed, errText(h.During.Errors),
				fms(h.After.P99), target)
		}
		p("\nWhole runs (1 s before the stop to 1 s after the window): ")
		for i, h := range r.Hang {
			if i > 0 {
				p("; ")
			}
			p("%s %d requests, %d failed%s", h.Target, h.Whole.Count, h.Whole.Failed, errText(h.Whole.Errors))
		}
		p(".\n\n")
	}

	if len(r.HUP) > 0 {
		p("## d. SIGHUP rolling restart under wrk -t2 -c50 -d10s, 2 workers, HUP at 3 s and 6.5 s\n\n")
		p("| socket mode | req/s | connect | read | write | timeout | non-2xx | HUPs | workers replaced | HUP -> roll done | open-loop new conns: failed / sent | target: 0 errors |\n")
		p("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		for _, h := range r.HUP {
			rolls := make([]string, len(h.RollTime))
			for i, d := range h.RollTime {
				rolls[i] = fms(d)
			}
			p("| %s | %.0f | %d | %d | %d | %d | %d | %d | %d | %s | %d / %d%s | %s |\n", h.Mode, h.Wrk.RPS, h.Wrk.Connect, h.Wrk.Read, h.Wrk.Write,
				h.Wrk.Timeout, h.Wrk.Non2, h.HUPs, h.Replaced, strings.Join(rolls, ", "), h.OpenLoop.Failed, h.OpenLoop.Count, errText(h.OpenLoop.Errors),
				passFail(h.Wrk.Errors() == 0 && h.OpenLoop.Failed == 0))
		}
		p("\nRequests served by each worker (slot/generation: requests, from its \"drain finished\" line; generation 1 before the first HUP, 2 between, 3 after):\n\n")
		for _, h := range r.HUP {
			p("- %s: %s\n", h.Mode, strings.Join(h.Served, "; "))
		}
		p("\n")
	}

	if s := r.Startup; s != nil {
		p("## e. Startup, %d workers, median of %d\n\n", s.Workers, len(s.Complete))
		p("| measure | median | min | max | target < %s |\n|---|---|---|---|---|\n", fms(targetStartup))
		row := func(name string, v []time.Duration, med time.Duration, target bool) {
			t := ""
			if target {
				t = passFail(med < targetStartup)
			}
			if len(v) == 0 {
				return
			}
			p("| %s | %s | %s | %s | %s |\n", name, fms(med), fms(slices.Min(v)), fms(slices.Max(v)), t)
		}
		row("exec -> \"Corral running\" line", s.Running, s.MedianRunning, false)
		row("exec -> first 200 from GET /health", s.FirstOK, s.MedianFirstOK, true)
		row("exec -> \"Application startup complete\"", s.Complete, s.MedianComplete, true)
		row("worker spawn -> ready (\"startup_ms\" field, every worker)", s.WorkerStartup, s.MedianWorkerSpawnToReady, false)
		row("baseline, 4 procs: exec -> first 200", s.BaselineOK, s.MedianBaselineOK, false)
		p("\n")
	}

	if s := r.RSS; s != nil {
		p("## f. Idle RSS (VmRSS), 4 workers, 1 s after startup\n\n")
		p("| process | RSS |\n|---|---|\n")
		p("| server master | %s |\n", mib(s.MasterKiB))
		total := s.MasterKiB
		for _, k := range s.WorkerKiB {
			total += k
		}
		p("| server workers (each, sorted) | %s |\n", joinMiB(s.WorkerKiB))
		p("| server total (master + %d workers) | %s |\n", len(s.WorkerKiB), mib(total))
		btotal := s.BaselineParent
		for _, k := range s.BaselineChildKiB {
			btotal += k
		}
		p("| baseline parent | %s |\n", mib(s.BaselineParent))
		p("| baseline children (each, sorted) | %s |\n", joinMiB(s.BaselineChildKiB))
		p("| baseline total (parent + %d children) | %s |\n\n", len(s.BaselineChildKiB), mib(btotal))
	}

	if len(r.Spread) > 0 {
		p("## g. Spread: 2000 concurrent keep-alive connections over 4 processes\n\n")
		p("| target | connections per process (sorted) | min | max | failed |\n|---|---|---|---|---|\n")
		for _, s := range r.Spread {
			per := make([]string, len(s.PerPID))
			for i, v := range s.PerPID {
				per[i] = fmt.Sprint(v)
			}
			p("| %s | %s | %d | %d | %d |\n", s.Target, strings.Join(per, ", "), s.Min, s.Max, s.Failed)
		}
		p("\n")
	}

	if r.API != nil {
		r.API.markdown(p)
	}
	if r.Reload != nil {
		r.Reload.markdown(p)
	}
	if len(r.Metrics) > 0 {
		metricsMarkdown(r.Metrics, p)
	}

	if r.MixedLogLines > 0 {
		p("- %d server log line(s) arrived glued to goroutine-dump text on the shared stderr (see the hang scenario).\n", r.MixedLogLines)
	}
	for _, a := range r.Anomalies {
		p("- anomaly: %s\n", a)
	}
	for _, w := range r.WrkRetries {
		p("- wrk could not connect and was run again: %s\n", w)
	}
	for _, e := range r.Errors {
		p("- scenario error: %s\n", e)
	}
	return b.String()
}

func joinMiB(v []int) string {
	s := make([]string, len(v))
	for i, k := range v {
		s[i] = mib(k)
	}
	return strings.Join(s, ", ")
}

// errText lists error kinds and counts after a space, e.g. " (read 2,
// timeout 1)", or returns "" when there are none.
func errText(m map[string]int) string {
	if len(m) == 0 {
		return ""
	}
	return " " + errList(m)
}

// errList formats a non-empty map as "(kind n, kind n)", kinds sorted.
func errList(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return "(" + strings.Join(parts, ", ") + ")"
}
