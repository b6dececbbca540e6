package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// logEvent is one JSON log line of the server or the baseline, stamped with
// the time the driver read it.
type logEvent struct {
	At         time.Time
	Message    string
	PID        int
	Worker     int
	Generation int
	Reason     string
	URL        string
	Requests   int // "requests" of a drain finished line
	Raw        string
}

// mixedLines counts JSON log lines that arrived glued to other output
// (see logWatch.follow); the summary reports it.
var mixedLines atomic.Int64

// logWatch collects the log lines of one process tree as they arrive, so a
// scenario can wait for a message and know when it came.
type logWatch struct {
	mu      sync.Mutex
	events  []logEvent
	changed chan struct{} // closed and replaced on every new event
	done    chan struct{} // closed when the stream ends
}

func newLogWatch() *logWatch {
	return &logWatch{changed: make(chan struct{}), done: make(chan struct{})}
}

// follow reads r line by line until EOF, copying every line to raw.
func (w *logWatch) follow(r io.Reader, raw io.Writer) {
	defer close(w.done)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		at := time.Now()
		line := sc.Text()
		if raw != nil {
			fmt.Fprintf(raw, "%s %s\n", at.Format("15:04:05.000000"), line)
		}
		var f struct {
			Message    string  `json:"message"`
			PID        int     `json:"pid"`
			Worker     int     `json:"worker"`
			Proc       int     `json:"proc"`
			Generation int     `json:"generation"`
			Reason     string  `json:"reason"`
			URL        string  `json:"url"`
			Startup    float64 `json:"startup_ms"`
			Requests   int     `json:"requests"`
		}
		// Workers and master share stderr: a goroutine dump after SIGQUIT
		// is not JSON, and a log line can land in the middle of one of its
		// lines, so parse from the first '{'.
		i := strings.IndexByte(line, '{')
		if i < 0 || json.Unmarshal([]byte(line[i:]), &f) != nil {
			continue
		}
		if i > 0 {
			mixedLines.Add(1)
		}
		ev := logEvent{At: at, Message: f.Message, PID: f.PID, Worker: max(f.Worker, f.Proc),
			Generation: f.Generation, Reason: f.Reason, URL: f.URL, Requests: f.Requests, Raw: line}
		w.mu.Lock()
		w.events = append(w.events, ev)
		close(w.changed)
		w.changed = make(chan struct{})
		w.mu.Unlock()
	}
}

// wait returns the first event at index from or later that match accepts,
// and the index after it. It gives up after timeout.
func (w *logWatch) wait(from int, timeout time.Duration, what string, match func(logEvent) bool) (logEvent, int, error) {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		w.mu.Lock()
		for i := from; i < len(w.events); i++ {
			if match(w.events[i]) {
				ev := w.events[i]
				w.mu.Unlock()
				return ev, i + 1, nil
			}
		}
		from = len(w.events)
		changed := w.changed
		w.mu.Unlock()
		select {
		case <-changed:
		case <-w.done:
			return logEvent{}, from, fmt.Errorf("log ended before %s", what)
		case <-deadline.C:
			return logEvent{}, from, fmt.Errorf("no %s within %s", what, timeout)
		}
	}
}

// len returns the number of events so far, a position for wait.
func (w *logWatch) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.events)
}

// all returns a copy of the events so far.
func (w *logWatch) all() []logEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]logEvent(nil), w.events...)
}

func msgIs(msg string) func(logEvent) bool {
	return func(ev logEvent) bool { return ev.Message == msg }
}

// target is a running process tree under test: Corral's server or the
// baseline.
type target struct {
	name    string
	cmd     *exec.Cmd
	addr    string // 127.0.0.1:port
	procs   int
	log     *logWatch // nil when stderr goes straight to a file
	logFile *os.File
	logPath string
	started time.Time // just before exec
	exited  chan struct{}
	// baseline is true for the baseline, false for Corral's server.
	baseline bool
	stopped  bool // stop has run
}

// serverOpts configures startServer.
type serverOpts struct {
	workers     int
	accessLog   bool
	socketMode  string        // "" is the server's default (reuseport)
	healthcheck time.Duration // 0 is the server's default
	// stderrToFile sends stderr straight to the log file instead of through
	// the driver, so the driver spends no CPU on it (access-log runs).
	stderrToFile bool
	// db names the SQLite file (and control socket) in the run's temporary
	// folder; "" is the label, a fresh database.
	db string
	// env is added last, so it overrides the settings above
	// (SIMULATED_LATENCY, METRICS_ADDR, RELOAD=true, ...).
	env []string
}

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// startServer starts ./server and waits until every worker is ready.
func (b *bench) startServer(label string, o serverOpts) (*target, error) {
	t, err := b.launchServer(label, o)
	return b.ready(label, t, err)
}

// ready waits until a launched target serves; on failure it stops it.
func (b *bench) ready(label string, t *target, err error) (*target, error) {
	if err != nil {
		return nil, err
	}
	if err := t.waitReady(15 * time.Second); err != nil {
		t.stop()
		delete(b.live, t)
		return nil, fmt.Errorf("%s: %w", label, err)
	}
	return t, nil
}

// launchServer starts ./server with a free loopback port and returns at once.
func (b *bench) launchServer(label string, o serverOpts) (*target, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	db := o.db
	if db == "" {
		db = label
	}
	env := append(os.Environ(),
		"WORKERS="+strconv.Itoa(o.workers),
		"HOST=127.0.0.1",
		"PORT="+strconv.Itoa(port),
		"LOG_FORMAT=json",
		"LOG_LEVEL=info",
		"ACCESS_LOG="+strconv.FormatBool(o.accessLog),
		"TIMEOUT_GRACEFUL_SHUTDOWN=2s",
		// Each server gets its own database and so its own control socket
		// (which lives next to it): several servers run at once here.
		"DATABASE_URL=sqlite:"+filepath.Join(b.tmp, db+".db"),
		"CONTROL_SOCKET="+filepath.Join(b.tmp, db+".sock"),
		"RELOAD=false",
	)
	if o.socketMode != "" {
		env = append(env, "SOCKET_MODE="+o.socketMode)
	}
	if o.healthcheck > 0 {
		env = append(env, "TIMEOUT_WORKER_HEALTHCHECK="+o.healthcheck.String())
	}
	// exec.Cmd keeps the last value of a duplicated variable.
	env = append(env, o.env...)
	cmd := exec.Command(b.server)
	cmd.Env = env
	t := &target{name: label, cmd: cmd, addr: "127.0.0.1:" + strconv.Itoa(port), procs: o.workers}
	if err := b.startTarget(t, label, o.stderrToFile); err != nil {
		return nil, err
	}
	return t, nil
}

// startBaseline starts the baseline with n processes and waits for all.
func (b *bench) startBaseline(label string, n int) (*target, error) {
	t, err := b.launchBaseline(label, n)
	return b.ready(label, t, err)
}

// launchBaseline starts the baseline on a free loopback port and returns at once.
func (b *bench) launchBaseline(label string, n int) (*target, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd := exec.Command(b.baseline, "-addr", addr, "-procs", strconv.Itoa(n))
	t := &target{name: label, cmd: cmd, addr: addr, procs: n, baseline: true}
	if err := b.startTarget(t, label, false); err != nil {
		return nil, err
	}
	return t, nil
}

func (b *bench) startTarget(t *target, label string, stderrToFile bool) error {
	b.seq++
	t.logPath = filepath.Join(b.out, "logs", fmt.Sprintf("%03d-%s.log", b.seq, label))
	f, err := os.Create(t.logPath)
	if err != nil {
		return err
	}
	t.logFile = f
	t.cmd.Stdout = f
	var pr *os.File
	if stderrToFile {
		t.cmd.Stderr = f
	} else {
		var pw *os.File
		if pr, pw, err = os.Pipe(); err != nil {
			f.Close()
			return err
		}
		t.cmd.Stderr = pw
		defer pw.Close()
	}
	t.started = time.Now()
	if err := t.cmd.Start(); err != nil {
		f.Close()
		if pr != nil {
			pr.Close()
		}
		return fmt.Errorf("start %s: %w", label, err)
	}
	t.exited = make(chan struct{})
	go func() {
		t.cmd.Wait()
		close(t.exited)
	}()
	if pr != nil {
		t.log = newLogWatch()
		go func() {
			defer pr.Close()
			t.log.follow(pr, f)
		}()
	}
	b.live[t] = true
	return nil
}

// waitReady waits for the message that says the whole target serves:
// "Application startup complete" from the server, one "baseline ready" per
// process from the baseline. Without a log watch it polls the log file.
func (t *target) waitReady(timeout time.Duration) error {
	if t.log == nil {
		deadline := time.Now().Add(timeout)
		for time.Now().Before(deadline) {
			b, _ := os.ReadFile(t.logPath)
			if strings.Contains(string(b), `"Application startup complete"`) {
				return nil
			}
			time.Sleep(5 * time.Millisecond)
		}
		return fmt.Errorf("no startup line in %s within %s", t.logPath, timeout)
	}
	if t.baseline {
		pos := 0
		for range t.procs {
			_, next, err := t.log.wait(pos, timeout, "baseline ready", msgIs("baseline ready"))
			if err != nil {
				return err
			}
			pos = next
		}
		return nil
	}
	_, _, err := t.log.wait(0, timeout, "Application startup complete", msgIs("Application startup complete"))
	return err
}

// pid returns the master's (or the baseline parent's) pid.
func (t *target) pid() int { return t.cmd.Process.Pid }

// stop sends SIGTERM, waits up to 10 s, then SIGKILLs the tree it knows.
// Only the first call does anything.
func (t *target) stop() {
	if t.cmd.Process == nil || t.stopped {
		return
	}
	t.stopped = true
	kids := children(t.pid())
	t.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-t.exited:
	case <-time.After(10 * time.Second):
		t.cmd.Process.Kill()
		<-t.exited
	}
	for _, k := range kids {
		syscall.Kill(k, syscall.SIGKILL) // normally long gone: ESRCH
	}
	if t.log != nil {
		select {
		case <-t.log.done:
		case <-time.After(2 * time.Second):
		}
	}
	t.logFile.Close()
}

// children lists the pids whose parent is ppid, from /proc.
func children(ppid int) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if p, err := parentPID(pid); err == nil && p == ppid {
			out = append(out, pid)
		}
	}
	return out
}

func parentPID(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses; fields resume after
	// the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 2 {
		return 0, errors.New("bad stat")
	}
	return strconv.Atoi(f[1])
}

// rssKiB reads VmRSS of pid from /proc/PID/status.
func rssKiB(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				return strconv.Atoi(f[0])
			}
		}
	}
	return 0, errors.New("no VmRSS")
}

// workerPIDs returns the current pid of each slot (1-based index) from the
// "worker ready" lines seen so far, ignoring workers that have exited.
func workerPIDs(w *logWatch) map[int]int {
	cur := map[int]int{}
	exited := map[int]bool{}
	for _, ev := range w.all() {
		switch ev.Message {
		case "worker ready", "baseline ready":
			cur[ev.Worker] = ev.PID
		case "worker exited":
			exited[ev.PID] = true
		}
	}
	for slot, pid := range cur {
		if exited[pid] {
			delete(cur, slot)
		}
	}
	return cur
}
