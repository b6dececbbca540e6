package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// results is everything one run measured; results.json holds it.
type results struct {
	Machine    machine
	Started    string
	Finished   string
	Rate       int             // requests per second of the open-loop client
	Throughput []throughputRow `json:",omitempty"`
	Crash      *crashResult    `json:",omitempty"`
	Hang       []hangResult    `json:",omitempty"`
	HUP        []hupResult     `json:",omitempty"`
	Startup    *startupResult  `json:",omitempty"`
	RSS        *rssResult      `json:",omitempty"`
	Spread     []spreadResult  `json:",omitempty"`
	API        *apiResult      `json:",omitempty"`
	Reload     *reloadResult   `json:",omitempty"`
	Metrics    []metricsRow    `json:",omitempty"`
	Errors     []string        `json:",omitempty"`
	// MixedLogLines counts server log lines that arrived glued to the text
	// of a goroutine dump (a worker killed with SIGQUIT) on shared stderr.
	MixedLogLines int64
	// WrkRetries lists wrk runs that could not connect at all and were run
	// again.
	WrkRetries []string `json:",omitempty"`
	// Anomalies are wrk runs with errors where none were expected.
	Anomalies []string `json:",omitempty"`
}

// throughputRow is one variant at one process count.
type throughputRow struct {
	Procs   int
	Variant string
	RPS     []float64 // one per round, in run order
	Median  float64
	Ratio   float64 // median / baseline median at the same process count
	// PairedRatio is the median over rounds of this run / the baseline's
	// run of the same round.
	PairedRatio float64
	P99         []time.Duration
	Errors      int      // wrk errors over every round
	LogB        int64    // bytes of log written during the measured rounds
	LogReqs     int      // requests served during them
	Load        []string // 1-minute load average after each run: the machine is shared
}

// throughput alternates wrk runs over the baseline, the server without
// access log and the server with access log (stderr to a file), for 1 and 2
// processes, and reports medians and ratios.
func (b *bench) throughput() error {
	for _, n := range []int{1, 2} {
		type variant struct {
			row *throughputRow
			t   *target
		}
		base, err := b.startBaseline(fmt.Sprintf("tput-baseline-%d", n), n)
		if err != nil {
			return err
		}
		off, err := b.startServer(fmt.Sprintf("tput-server-%d-nolog", n), serverOpts{workers: n})
		if err != nil {
			return err
		}
		on, err := b.startServer(fmt.Sprintf("tput-server-%d-accesslog", n), serverOpts{workers: n, accessLog: true, stderrToFile: true})
		if err != nil {
			return err
		}
		vs := []variant{
			{&throughputRow{Procs: n, Variant: "baseline"}, base},
			{&throughputRow{Procs: n, Variant: "server, access log off"}, off},
			{&throughputRow{Procs: n, Variant: "server, access log on (file)"}, on},
		}
		for _, v := range vs { // warm-up: page in, grow the pools
			if _, err := runWrk(2, 100, time.Second, "http://"+v.t.addr+"/health", "", &b.res.WrkRetries); err != nil {
				return err
			}
		}
		for round := 1; round <= b.rounds; round++ {
			for _, v := range vs {
				before := fileSize(v.t.logPath)
				raw := filepath.Join(b.out, fmt.Sprintf("wrk-tput-%d-%s-%d.txt", n, slug(v.row.Variant), round))
				w, err := runWrk(2, 100, b.wrkDur, "http://"+v.t.addr+"/health", raw, &b.res.WrkRetries)
				if err != nil || w.Errors() > 0 {
					// The machine is shared: show who listens on the port.
					note := fmt.Sprintf("%d proc %s round %d: %d wrk errors, err %v; listeners on the port: %s",
						n, v.row.Variant, round, w.Errors(), err, listenersOn(v.t.addr))
					b.res.Anomalies = append(b.res.Anomalies, note)
				}
				if err != nil {
					continue // no sample for this round
				}
				v.row.RPS = append(v.row.RPS, w.RPS)
				v.row.P99 = append(v.row.P99, w.P99)
				v.row.Errors += w.Errors()
				v.row.LogB += fileSize(v.t.logPath) - before
				v.row.LogReqs += w.Requests
				v.row.Load = append(v.row.Load, loadAvg1())
				fmt.Fprintf(os.Stderr, "  %d proc %-30s round %d: %8.0f req/s  p99 %v  errors %d\n", n, v.row.Variant, round, w.RPS, w.P99, w.Errors())
			}
		}
		for _, v := range vs {
			v.t.stop()
			delete(b.live, v.t)
			v.row.Median = median(v.row.RPS)
		}
		// The access log file is hundreds of MB: keep its head only.
		os.Truncate(on.logPath, min(fileSize(on.logPath), 1<<20))
		for _, v := range vs {
			v.row.Ratio = v.row.Median / vs[0].row.Median
			// Paired: each run against the baseline run just before it,
			// which cancels the machine's slower drifts.
			var pr []float64
			for i := range min(len(v.row.RPS), len(vs[0].row.RPS)) {
				if vs[0].row.RPS[i] > 0 {
					pr = append(pr, v.row.RPS[i]/vs[0].row.RPS[i])
				}
			}
			v.row.PairedRatio = median(pr)
			b.res.Throughput = append(b.res.Throughput, *v.row)
		}
	}
	return nil
}

// crashTrial is one SIGKILL of a worker under the open-loop client.
type crashTrial struct {
	Slot, Victim, Replacement int
	ExitSeen                  time.Duration // kill -> "worker exited" line
	Ready                     time.Duration // kill -> "worker ready" line of the replacement
	FirstOK                   time.Duration // kill -> first 200 from the replacement's pid
	InFlight                  int           // requests started before the kill, not finished at it
	InFlightVictim            int           // of those, the ones no other worker answered: outstanding to the victim
	Failed                    int           // failed requests over the whole trial
	FailedNearKill            int           // failed requests in flight at the kill or started within 1 s after
	Requests                  int
}

type crashResult struct {
	Workers, Rate       int
	Trials              []crashTrial
	MedianReady         time.Duration
	MedianFirstOK       time.Duration
	Failed, InFlight    int
	InFlightVictim      int
	Requests            int
	Repeat              []crashTrial // one slot killed again and again: the backoff
	RepeatWorkersServed int
}

// crash kills a worker of a fresh 2-worker server under a steady client,
// b.kills times, and once kills the same slot three times in a row.
func (b *bench) crash() error {
	res := &crashResult{Workers: 2, Rate: b.rate}
	b.res.Crash = res
	for i := range b.kills {
		t, err := b.startServer(fmt.Sprintf("crash-%d", i+1), serverOpts{workers: 2, healthcheck: 2 * time.Second})
		if err != nil {
			return err
		}
		trials, err := b.killTrials(t, fmt.Sprintf("crash-%d", i+1), 1+i%2, 1)
		t.stop()
		delete(b.live, t)
		if err != nil {
			return err
		}
		res.Trials = append(res.Trials, trials...)
	}
	var ready, first []time.Duration
	for _, tr := range res.Trials {
		ready = append(ready, tr.Ready)
		first = append(first, tr.FirstOK)
		res.Failed += tr.Failed
		res.InFlight += tr.InFlight
		res.InFlightVictim += tr.InFlightVictim
		res.Requests += tr.Requests
	}
	res.MedianReady, res.MedianFirstOK = median(ready), median(first)

	t, err := b.startServer("crash-repeat", serverOpts{workers: 2, healthcheck: 2 * time.Second})
	if err != nil {
		return err
	}
	defer func() { t.stop(); delete(b.live, t) }()
	res.Repeat, err = b.killTrials(t, "crash-repeat", 1, 3)
	return err
}

// killTrials SIGKILLs the worker of slot times times under the open-loop
// client, waiting each time for the replacement to serve.
func (b *bench) killTrials(t *target, label string, slot, times int) ([]crashTrial, error) {
	load := startLoad(t.addr, b.rate, 2*time.Second, time.Duration(times)*3*time.Second+5*time.Second)
	time.Sleep(time.Second)
	type kill struct {
		at time.Time
		tr crashTrial
	}
	var kills []kill
	var firstErr error
	for range times {
		victim := workerPIDs(t.log)[slot]
		if victim == 0 {
			firstErr = fmt.Errorf("%s: no pid for worker %d", label, slot)
			break
		}
		pos := t.log.len()
		at := time.Now()
		syscall.Kill(victim, syscall.SIGKILL)
		k := kill{at: at, tr: crashTrial{Slot: slot, Victim: victim}}
		ev, _, err := t.log.wait(pos, 5*time.Second, "worker exited", func(ev logEvent) bool {
			return ev.Message == "worker exited" && ev.PID == victim
		})
		if err != nil {
			firstErr = err
			break
		}
		k.tr.ExitSeen = ev.At.Sub(at)
		ev, _, err = t.log.wait(pos, 15*time.Second, "replacement ready", func(ev logEvent) bool {
			return ev.Message == "worker ready" && ev.Worker == slot && ev.PID != victim
		})
		if err != nil {
			firstErr = err
			break
		}
		k.tr.Ready = ev.At.Sub(at)
		k.tr.Replacement = ev.PID
		kills = append(kills, k)
		time.Sleep(time.Second)
	}
	reqs := load.halt()
	writeRequests(filepath.Join(b.out, label+"-requests.csv"), reqs)
	var out []crashTrial
	for _, k := range kills {
		tr := k.tr
		tr.FirstOK = -1
		for _, r := range reqs {
			if r.ok() && r.PID == tr.Replacement && (tr.FirstOK < 0 || r.End().Sub(k.at) < tr.FirstOK) {
				tr.FirstOK = r.End().Sub(k.at)
			}
			if !r.Start.After(k.at) && r.End().After(k.at) {
				tr.InFlight++
				if !r.ok() || r.PID == tr.Victim {
					tr.InFlightVictim++
				}
			}
			if !r.ok() && (r.Start.Before(k.at.Add(time.Second)) && r.End().After(k.at)) {
				tr.FailedNearKill++
			}
		}
		if len(out) == 0 {
			all := statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
			tr.Failed, tr.Requests = all.Failed, all.Count
		}
		out = append(out, tr)
	}
	return out, firstErr
}

// hangResult is one SIGSTOP of a worker (or baseline process).
type hangResult struct {
	Target      string
	Stopped     time.Duration // SIGSTOP -> end of the window (replacement ready, or SIGCONT)
	HungSeen    time.Duration // SIGSTOP -> "worker hung" line; 0 for the baseline
	During      latencyStats  // requests started while the process was stopped
	After       latencyStats  // requests started after the window, for 1 s
	Whole       latencyStats  // the whole run
	VictimLater int           // requests sent while stopped, answered by the stopped pid after SIGCONT
}

// hang SIGSTOPs process 1 of 2 (and of 4) under the open-loop client:
// Corral in reuseport mode (replaced after TIMEOUT_WORKER_HEALTHCHECK=2s),
// the baseline (continued after 3 s) and Corral in shared-socket mode. With
// 2 workers the neighbour scheme has every worker serve both sockets; with
// 4, the stopped worker's socket has one other server, its neighbour.
func (b *bench) hang() error {
	hc := 2 * time.Second
	cases := []struct {
		label string
		start func() (*target, error)
	}{
		{"server reuseport, 2 workers", func() (*target, error) {
			return b.startServer("hang-reuseport-2", serverOpts{workers: 2, healthcheck: hc})
		}},
		{"baseline, 2 procs", func() (*target, error) { return b.startBaseline("hang-baseline-2", 2) }},
		{"server shared, 2 workers", func() (*target, error) {
			return b.startServer("hang-shared-2", serverOpts{workers: 2, healthcheck: hc, socketMode: "shared"})
		}},
		{"server reuseport, 4 workers", func() (*target, error) {
			return b.startServer("hang-reuseport-4", serverOpts{workers: 4, healthcheck: hc})
		}},
		{"baseline, 4 procs", func() (*target, error) { return b.startBaseline("hang-baseline-4", 4) }},
	}
	for _, c := range cases {
		t, err := c.start()
		if err != nil {
			return err
		}
		r, err := b.hangOnce(t, c.label)
		t.stop()
		delete(b.live, t)
		if err != nil {
			return err
		}
		b.res.Hang = append(b.res.Hang, r)
	}
	return nil
}

func (b *bench) hangOnce(t *target, label string) (hangResult, error) {
	r := hangResult{Target: label}
	load := startLoad(t.addr, b.rate, 5*time.Second, 15*time.Second)
	time.Sleep(time.Second)
	victim := workerPIDs(t.log)[1]
	if victim == 0 {
		load.halt()
		return r, fmt.Errorf("%s: no pid for process 1", label)
	}
	pos := t.log.len()
	at := time.Now()
	syscall.Kill(victim, syscall.SIGSTOP)
	var end time.Time
	if t.baseline {
		time.Sleep(3 * time.Second)
		end = time.Now()
		syscall.Kill(victim, syscall.SIGCONT)
	} else {
		ev, _, err := t.log.wait(pos, 8*time.Second, "worker hung", func(ev logEvent) bool {
			return ev.Message == "worker hung, sending SIGQUIT" && ev.PID == victim
		})
		if err != nil {
			syscall.Kill(victim, syscall.SIGCONT)
			load.halt()
			return r, fmt.Errorf("%s: %w", label, err)
		}
		r.HungSeen = ev.At.Sub(at)
		ev, _, err = t.log.wait(pos, 8*time.Second, "replacement ready", func(ev logEvent) bool {
			return ev.Message == "worker ready" && ev.Worker == 1 && ev.PID != victim
		})
		if err != nil {
			load.halt()
			return r, fmt.Errorf("%s: %w", label, err)
		}
		end = ev.At
	}
	r.Stopped = end.Sub(at)
	time.Sleep(time.Second)
	reqs := load.halt()
	writeRequests(filepath.Join(b.out, "hang-"+slug(label)+"-requests.csv"), reqs)
	r.During = statsBetween(reqs, at, end)
	r.After = statsBetween(reqs, end, end.Add(time.Second))
	r.Whole = statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
	for _, q := range reqs {
		if q.ok() && q.PID == victim && !q.Start.Before(at) && q.Start.Before(end) && q.End().After(end) {
			r.VictimLater++
		}
	}
	return r, nil
}

// hupResult is one wrk run with rolling restarts in the middle.
type hupResult struct {
	Mode        string
	Wrk         wrkResult
	HUPs        int
	Replaced    int             // "worker ready" lines with reason hup
	RollTime    []time.Duration // SIGHUP -> last replacement of that roll ready
	OpenLoop    latencyStats    // the new-connection client alongside wrk
	DrainLogged []string        // the drain lines of the old workers
	// Served is "slot/generation: requests" for every worker, from its
	// "drain finished" line: how the keep-alive connections spread after
	// each roll.
	Served []string
}

// hup runs wrk -t2 -c50 -d10s against 2 workers and sends SIGHUP at 3 s
// and 6.5 s, with the open-loop new-connection client alongside, in
// reuseport and in shared mode.
func (b *bench) hup() error {
	for _, mode := range []string{"reuseport", "shared"} {
		t, err := b.startServer("hup-"+mode, serverOpts{workers: 2, socketMode: mode})
		if err != nil {
			return err
		}
		r, err := b.hupOnce(t, mode)
		t.stop()
		delete(b.live, t)
		if err != nil {
			return err
		}
		b.res.HUP = append(b.res.HUP, r)
	}
	return nil
}

func (b *bench) hupOnce(t *target, mode string) (hupResult, error) {
	r := hupResult{Mode: mode}
	type wrkDone struct {
		w   wrkResult
		err error
	}
	done := make(chan wrkDone, 1)
	start := time.Now()
	go func() {
		w, err := runWrk(2, 50, 10*time.Second, "http://"+t.addr+"/health", filepath.Join(b.out, "wrk-hup-"+mode+".txt"), &b.res.WrkRetries)
		done <- wrkDone{w, err}
	}()
	load := startLoad(t.addr, b.rate, 2*time.Second, 11*time.Second)
	for _, after := range []time.Duration{3 * time.Second, 6500 * time.Millisecond} {
		time.Sleep(time.Until(start.Add(after)))
		pos := t.log.len()
		at := time.Now()
		t.cmd.Process.Signal(syscall.SIGHUP)
		r.HUPs++
		// The roll is done when every slot has a ready worker of reason hup.
		seen := map[int]bool{}
		for len(seen) < t.procs {
			ev, next, err := t.log.wait(pos, 5*time.Second, "hup replacement ready", func(ev logEvent) bool {
				return ev.Message == "worker ready" && ev.Reason == "hup"
			})
			if err != nil {
				break
			}
			seen[ev.Worker], pos = true, next
			if len(seen) == t.procs {
				r.RollTime = append(r.RollTime, ev.At.Sub(at))
			}
		}
	}
	d := <-done
	reqs := load.halt()
	writeRequests(filepath.Join(b.out, "hup-"+mode+"-requests.csv"), reqs)
	r.OpenLoop = statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
	if d.err != nil {
		return r, d.err
	}
	r.Wrk = d.w
	if d.w.Errors() > 0 {
		b.res.Anomalies = append(b.res.Anomalies, fmt.Sprintf("hup %s: %d wrk errors; listeners on the port: %s", mode, d.w.Errors(), listenersOn(t.addr)))
	}
	r.Wrk.Raw = ""
	gen := map[int]int{}
	for _, ev := range t.log.all() {
		switch ev.Message {
		case "worker ready":
			gen[ev.PID] = ev.Generation
			if ev.Reason == "hup" {
				r.Replaced++
			}
		case "drain started", "drain finished", "drain budget expired", "worker killed":
			r.DrainLogged = append(r.DrainLogged, ev.Raw)
		}
	}
	// The workers still serving at the end drain when the server stops.
	t.stop()
	for _, ev := range t.log.all() {
		if ev.Message == "drain finished" {
			r.Served = append(r.Served, fmt.Sprintf("%d/%d: %d", ev.Worker, gen[ev.PID], ev.Requests))
		}
	}
	slices.SortFunc(r.Served, func(a, b string) int {
		ga, _ := strconv.Atoi(a[strings.IndexByte(a, '/')+1 : strings.IndexByte(a, ':')])
		gb, _ := strconv.Atoi(b[strings.IndexByte(b, '/')+1 : strings.IndexByte(b, ':')])
		if ga != gb {
			return ga - gb
		}
		return strings.Compare(a, b)
	})
	return r, nil
}

type startupResult struct {
	Workers                       int
	Complete, FirstOK, BaselineOK []time.Duration
	MedianComplete, MedianFirstOK time.Duration
	MedianBaselineOK              time.Duration
	WorkerStartup                 []time.Duration // "startup" of each worker ready line
	MedianWorkerSpawnToReady      time.Duration
	Running                       []time.Duration // exec -> "Corral running" line
	MedianRunning                 time.Duration
}

// startup execs ./server with 4 workers b.starts times and times the
// "Application startup complete" line and the first 200 from GET /health;
// and the first 200 of a 4-process baseline, for reference.
func (b *bench) startup() error {
	res := &startupResult{Workers: 4}
	b.res.Startup = res
	for i := range b.starts {
		// One database for every start: the first start creates it, the
		// others open it, as a restarted server does.
		t, err := b.launchServer(fmt.Sprintf("startup-%d", i+1), serverOpts{workers: 4, db: "startup"})
		if err != nil {
			return err
		}
		first, err := firstOK(t, 10*time.Second)
		if err != nil {
			t.stop()
			return err
		}
		ev, _, err := t.log.wait(0, 10*time.Second, "Application startup complete", msgIs("Application startup complete"))
		if err != nil {
			t.stop()
			return err
		}
		res.Complete = append(res.Complete, ev.At.Sub(t.started))
		res.FirstOK = append(res.FirstOK, first)
		for _, e := range t.log.all() {
			if e.Message == "Corral running, press CTRL+C to quit" {
				res.Running = append(res.Running, e.At.Sub(t.started))
			}
			if e.Message == "worker ready" {
				if d, ok := startupField(e.Raw); ok {
					res.WorkerStartup = append(res.WorkerStartup, d)
				}
			}
		}
		t.stop()
		delete(b.live, t)
	}
	for i := range b.starts {
		t, err := b.launchBaseline(fmt.Sprintf("startup-baseline-%d", i+1), 4)
		if err != nil {
			return err
		}
		first, err := firstOK(t, 10*time.Second)
		t.stop()
		delete(b.live, t)
		if err != nil {
			return err
		}
		res.BaselineOK = append(res.BaselineOK, first)
	}
	res.MedianComplete = median(res.Complete)
	res.MedianFirstOK = median(res.FirstOK)
	res.MedianBaselineOK = median(res.BaselineOK)
	res.MedianWorkerSpawnToReady = median(res.WorkerStartup)
	res.MedianRunning = median(res.Running)
	return nil
}

// firstOK polls GET /health every millisecond until a 200 and returns the
// time from exec to it.
func firstOK(t *target, timeout time.Duration) (time.Duration, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		r := get(t.addr, 500*time.Millisecond)
		if r.ok() {
			return r.End().Sub(t.started), nil
		}
		select {
		case <-t.exited:
			return 0, errors.New(t.name + ": exited before serving")
		case <-time.After(time.Millisecond):
		}
	}
	return 0, fmt.Errorf("%s: no 200 within %s", t.name, timeout)
}

type rssResult struct {
	MasterKiB        int
	WorkerKiB        []int
	BaselineParent   int
	BaselineChildKiB []int
}

// rss reads VmRSS of an idle 4-worker server and a 4-process baseline.
func (b *bench) rss() error {
	res := &rssResult{}
	b.res.RSS = res
	t, err := b.startServer("rss-server", serverOpts{workers: 4})
	if err != nil {
		return err
	}
	base, err := b.startBaseline("rss-baseline", 4)
	if err != nil {
		return err
	}
	time.Sleep(time.Second)
	res.MasterKiB, _ = rssKiB(t.pid())
	for _, pid := range children(t.pid()) {
		if k, err := rssKiB(pid); err == nil {
			res.WorkerKiB = append(res.WorkerKiB, k)
		}
	}
	res.BaselineParent, _ = rssKiB(base.pid())
	for _, pid := range children(base.pid()) {
		if k, err := rssKiB(pid); err == nil {
			res.BaselineChildKiB = append(res.BaselineChildKiB, k)
		}
	}
	slices.Sort(res.WorkerKiB)
	slices.Sort(res.BaselineChildKiB)
	return nil
}

// writeRequests saves one CSV line per request, times relative to the first.
func writeRequests(path string, reqs []request) {
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	fmt.Fprintln(f, "start_ms,latency_ms,status,pid,error")
	if len(reqs) == 0 {
		return
	}
	t0 := reqs[0].Start
	for _, r := range reqs {
		fmt.Fprintf(f, "%.3f,%.3f,%d,%d,%s\n", ms(r.Start.Sub(t0)), ms(r.Latency), r.Status, r.PID, r.Err)
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func fileSize(path string) int64 {
	st, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return st.Size()
}

func median[T int | int64 | float64 | time.Duration](v []T) T {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// slug makes a label usable in a file name.
func slug(s string) string {
	out := make([]byte, 0, len(s))
	for _, c := range []byte(s) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			out = append(out, c)
		case len(out) > 0 && out[len(out)-1] != '-':
			out = append(out, '-')
		}
	}
	for len(out) > 0 && out[len(out)-1] == '-' {
		out = out[:len(out)-1]
	}
	return string(out)
}

// startupField reads the "startup_ms" field of a worker ready line.
func startupField(raw string) (time.Duration, bool) {
	v, ok := numField(raw, "startup_ms")
	return time.Duration(v * float64(time.Millisecond)), ok
}

// numField reads the number in field key of a JSON log line.
func numField(raw, key string) (float64, bool) {
	k := `"` + key + `":`
	i := strings.Index(raw, k)
	if i < 0 {
		return 0, false
	}
	rest := raw[i+len(k):]
	j := 0
	for j < len(rest) && (rest[j] == '.' || rest[j] == '-' || rest[j] == 'e' || rest[j] >= '0' && rest[j] <= '9') {
		j++
	}
	v, err := strconv.ParseFloat(rest[:j], 64)
	return v, err == nil
}

// loadAvg1 returns the 1-minute load average.
func loadAvg1() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "?"
	}
	return f[0]
}

// listenersOn returns ss's list of the processes listening on addr's port,
// one line per socket.
func listenersOn(addr string) string {
	_, port, _ := strings.Cut(addr, ":")
	out, err := exec.Command("ss", "-ltnpH", "sport = :"+port).CombinedOutput()
	if err != nil {
		return "ss: " + err.Error()
	}
	return strings.Join(strings.Fields(string(out)), " ")
}
