package main

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Targets of the dev-mode issue.
const targetReloadSwap = 100 * time.Millisecond

// reloadSources are what the reload scenario copies of the repository: the
// module files and the packages ./cmd/server is built from.
var reloadSources = []string{"go.mod", "go.sum", "cmd", "supervisor", "worker", "handlers"}

// reloadTrial is one save followed by a reload. Log times are when the
// driver read the line.
type reloadTrial struct {
	OldPID, NewPID int
	Detect         time.Duration // save -> "change detected" (includes RELOAD_DELAY)
	Build          time.Duration // "change detected" -> "build succeeded, swapping worker"
	BuildField     time.Duration // build_time_ms field of that line
	Started        time.Duration // build end (or change detected) -> "worker started" of the new pid
	Ready          time.Duration // build end (or change detected) -> "worker ready" of the new pid
	Swap           time.Duration // build end (or change detected) -> first 200 from the new pid
	Total          time.Duration // save -> first 200 from the new pid
	SinceChange    time.Duration // "reloaded" line's since_change_ms field
	OldExited      time.Duration // first 200 from the new pid -> "worker exited" of the old one
}

// reloadRun is one reload-mode server and its trials.
type reloadRun struct {
	Label  string
	Build  string // RELOAD_BUILD; "(default)" when unset
	Edit   string // the file edited
	Warm   *reloadTrial
	Trials []reloadTrial
	// Medians of the trials.
	Detect, BuildTime, Swap, Total, Ready time.Duration
	Load                                  latencyStats // the 100 req/s client over the whole run
	PollFailed                            int          // failures of the 2 ms poller looking for the new pid
}

// reloadResult is the dev-mode scenario.
type reloadResult struct {
	Src   string
	Rate  int
	Delay string
	Runs  []reloadRun
}

// reloadPoll is how often the driver asks /health for the new pid after a
// save.
const reloadPoll = 2 * time.Millisecond

// reload measures RELOAD=true: a copy of the repository's Go sources is
// watched; a Go edit is built and swapped (one untimed reload warms the
// build cache, then b.reloads timed), and with RELOAD_BUILD="" a .json edit
// restarts the worker. An open-loop client sends GET /health at 100/s
// throughout.
func (b *bench) reload() error {
	res := &reloadResult{Src: b.src, Rate: 100, Delay: "250ms (default)"}
	b.res.Reload = res
	// Not under b.tmp: the server never watches the database's folder or
	// anything below it, and the databases live in b.tmp.
	src, err := os.MkdirTemp("", "procbench-reload-src-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(src)
	if err := copySources(b.src, src); err != nil {
		return err
	}
	cases := []struct {
		label, build, edit string
		warm               bool
	}{
		{"go-build", "", filepath.Join("handlers", "handlers.go"), true},
		{"restart-only", `RELOAD_BUILD=`, "procbench.json", false},
	}
	for _, c := range cases {
		run := reloadRun{Label: c.label, Build: "(default)", Edit: c.edit}
		env := []string{"RELOAD=true", "RELOAD_DIRS=" + src, "WORKERS=1"}
		if c.build != "" {
			env = append(env, c.build)
			run.Build = `""`
		}
		t, err := b.startServer("reload-"+c.label, serverOpts{workers: 1, env: env})
		if err != nil {
			return err
		}
		load := startLoad(t.addr, res.Rate, 2*time.Second, 10*time.Minute)
		edit := filepath.Join(src, c.edit)
		n := 0
		if c.warm {
			n++
			tr, failed, err := b.reloadOnce(t, edit, n, 4*time.Minute)
			run.PollFailed += failed
			if err != nil {
				load.halt()
				return fmt.Errorf("%s warm-up: %w", c.label, err)
			}
			run.Warm = &tr
		}
		for range b.reloads {
			n++
			tr, failed, err := b.reloadOnce(t, edit, n, 2*time.Minute)
			run.PollFailed += failed
			if err != nil {
				load.halt()
				return fmt.Errorf("%s: %w", c.label, err)
			}
			fmt.Fprintf(os.Stderr, "  reload %s %d: total %v, build %v, swap %v\n", c.label, n, tr.Total.Round(time.Millisecond), tr.Build.Round(time.Millisecond), tr.Swap.Round(time.Millisecond))
			run.Trials = append(run.Trials, tr)
		}
		time.Sleep(time.Second)
		reqs := load.halt()
		writeRequests(filepath.Join(b.out, "reload-"+c.label+"-requests.csv"), reqs)
		run.Load = statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
		t.stop()
		delete(b.live, t)
		pick := func(f func(reloadTrial) time.Duration) time.Duration {
			v := make([]time.Duration, len(run.Trials))
			for i, tr := range run.Trials {
				v[i] = f(tr)
			}
			return median(v)
		}
		run.Detect = pick(func(t reloadTrial) time.Duration { return t.Detect })
		run.BuildTime = pick(func(t reloadTrial) time.Duration { return t.Build })
		run.Swap = pick(func(t reloadTrial) time.Duration { return t.Swap })
		run.Total = pick(func(t reloadTrial) time.Duration { return t.Total })
		run.Ready = pick(func(t reloadTrial) time.Duration { return t.Ready })
		res.Runs = append(res.Runs, run)
	}
	return nil
}

// reloadOnce edits path (a new line each time, so the build is never a
// cache hit), polls /health on new connections until another pid answers,
// and reads the reload's log lines. It returns the poller's failures too.
func (b *bench) reloadOnce(t *target, path string, n int, timeout time.Duration) (reloadTrial, int, error) {
	var tr reloadTrial
	tr.OldPID = workerPIDs(t.log)[1]
	if tr.OldPID == 0 {
		return tr, 0, fmt.Errorf("no worker pid before reload %d", n)
	}
	pos := t.log.len()
	var line string
	if strings.HasSuffix(path, ".go") {
		line = fmt.Sprintf("\n// procbench reload %d\n", n)
	} else {
		line = fmt.Sprintf("{\"procbench_reload\": %d}\n", n)
	}
	saved := time.Now()
	if err := appendFile(path, line); err != nil {
		return tr, 0, err
	}
	failed := 0
	var first request
	fast := false
	swapBegins := msgIs("build succeeded, swapping worker")
	if !strings.HasSuffix(path, ".go") {
		swapBegins = msgIs("change detected")
	}
	deadline := saved.Add(timeout)
	for {
		r := get(t.addr, time.Second)
		if r.ok() && r.PID != tr.OldPID && r.PID != 0 {
			first = r
			break
		}
		if !r.ok() {
			failed++
		}
		if time.Now().After(deadline) {
			return tr, failed, fmt.Errorf("reload %d: no new pid on /health within %s", n, timeout)
		}
		if t.log.seen(pos, msgIs("build failed, old worker keeps serving")) {
			return tr, failed, fmt.Errorf("reload %d: build failed (see %s)", n, t.logPath)
		}
		if time.Since(saved) > 5*time.Second && !t.log.seen(pos, msgIs("change detected")) {
			return tr, failed, fmt.Errorf("reload %d: no change detected 5 s after the save of %s", n, path)
		}
		// Poll fast only once the swap has begun, so that the poller does
		// not compete with the compiler for the 2 cores.
		if !fast {
			fast = t.log.seen(pos, swapBegins)
		}
		if fast {
			time.Sleep(reloadPoll)
		} else {
			time.Sleep(25 * time.Millisecond)
		}
	}
	tr.NewPID = first.PID
	tr.Total = first.End().Sub(saved)

	wait := func(what string, match func(logEvent) bool) (logEvent, error) {
		ev, _, err := t.log.wait(pos, 10*time.Second, what, match)
		return ev, err
	}
	det, err := wait("change detected", msgIs("change detected"))
	if err != nil {
		return tr, failed, err
	}
	tr.Detect = det.At.Sub(saved)
	from := det.At // restart only: the swap starts at the detection
	if strings.HasSuffix(path, ".go") {
		built, err := wait("build succeeded", msgIs("build succeeded, swapping worker"))
		if err != nil {
			return tr, failed, err
		}
		tr.Build = built.At.Sub(det.At)
		if v, ok := numField(built.Raw, "build_time_ms"); ok {
			tr.BuildField = time.Duration(v * float64(time.Millisecond))
		}
		from = built.At
	}
	isNew := func(msg string) func(logEvent) bool {
		return func(ev logEvent) bool { return ev.Message == msg && ev.PID == tr.NewPID }
	}
	if ev, err := wait("worker started", isNew("worker started")); err == nil {
		tr.Started = ev.At.Sub(from)
	}
	if ev, err := wait("worker ready", isNew("worker ready")); err == nil {
		tr.Ready = ev.At.Sub(from)
	}
	if ev, err := wait("reloaded", isNew("reloaded")); err == nil {
		if v, ok := numField(ev.Raw, "since_change_ms"); ok {
			tr.SinceChange = time.Duration(v * float64(time.Millisecond))
		}
	}
	tr.Swap = first.End().Sub(from)
	// The next save starts with the old worker gone (RELOAD_DRAIN bounds it).
	old := tr.OldPID
	if ev, err := wait("old worker exited", func(ev logEvent) bool { return ev.Message == "worker exited" && ev.PID == old }); err == nil {
		tr.OldExited = ev.At.Sub(first.End())
	}
	return tr, failed, nil
}

// seen reports whether an event at index from or later matches.
func (w *logWatch) seen(from int, match func(logEvent) bool) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := from; i < len(w.events); i++ {
		if match(w.events[i]) {
			return true
		}
	}
	return false
}

func appendFile(path, s string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return err
	}
	if _, err := f.WriteString(s); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// copySources copies reloadSources of the repository at from into to.
func copySources(from, to string) error {
	if err := os.MkdirAll(to, 0o755); err != nil {
		return err
	}
	for _, name := range reloadSources {
		root := filepath.Join(from, name)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(from, p)
			dst := filepath.Join(to, rel)
			if d.IsDir() {
				return os.MkdirAll(dst, 0o755)
			}
			if !d.Type().IsRegular() {
				return nil
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(dst, b, 0o644)
		})
		if err != nil {
			return fmt.Errorf("copy sources: %w", err)
		}
	}
	return nil
}

// markdown writes the scenario's tables.
func (r *reloadResult) markdown(p func(string, ...any)) {
	p("## i. Reload (RELOAD=true): save -> new pid serving, open-loop %d req/s on GET /health throughout\n\n", r.Rate)
	p("Sources: a copy of %s (%s) in a temporary folder, RELOAD_DIRS=<copy>, RELOAD_DELAY %s. Times are medians of %d.\n\n", r.Src, strings.Join(reloadSources, ", "), r.Delay, trials(r.Runs))
	p("| RELOAD_BUILD | edit | save -> change detected | build (log lines) | build end -> new worker ready | swap: build end -> first 200 from new pid | total: save -> first 200 | failed / requests at %d/s | poller failures | target swap < %s, 0 failed |\n", r.Rate, fms(targetReloadSwap))
	p("|---|---|---|---|---|---|---|---|---|---|\n")
	for _, run := range r.Runs {
		build := fms(run.BuildTime)
		if run.BuildTime == 0 {
			build = "none"
		}
		p("| %s | %s | %s | %s | %s | %s | %s | %d / %d%s | %d | %s |\n", run.Build, run.Edit, fms(run.Detect), build, fms(run.Ready), fms(run.Swap), fms(run.Total),
			run.Load.Failed, run.Load.Count, errText(run.Load.Errors), run.PollFailed, passFail(run.Swap < targetReloadSwap && run.Load.Failed == 0 && run.PollFailed == 0))
	}
	p("\nEach reload (for a restart only, \"build end\" is the change detected line):\n\n")
	p("| RELOAD_BUILD | reload | old -> new pid | detect | build (lines) | build_time_ms field | -> worker started | -> worker ready | -> first 200 | total | since_change_ms field | first 200 -> old worker exited |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, run := range r.Runs {
		all := slices.Clone(run.Trials)
		label := make([]string, len(all))
		for i := range all {
			label[i] = fmt.Sprint(i + 1)
		}
		if run.Warm != nil {
			all = append([]reloadTrial{*run.Warm}, all...)
			label = append([]string{"warm-up (not counted)"}, label...)
		}
		for i, t := range all {
			build, field := "none", "none"
			if t.Build > 0 {
				build, field = fms(t.Build), fms(t.BuildField)
			}
			p("| %s | %s | %d -> %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", run.Build, label[i], t.OldPID, t.NewPID, fms(t.Detect), build, field,
				fms(t.Started), fms(t.Ready), fms(t.Swap), fms(t.Total), fms(t.SinceChange), fms(t.OldExited))
		}
	}
	p("\n")
}

func trials(runs []reloadRun) int {
	if len(runs) == 0 {
		return 0
	}
	return len(runs[0].Trials)
}
