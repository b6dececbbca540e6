package supervisor

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/supervisor/protocol"
)

// The restart engine under test without processes: fake worker processes
// (real pipes, no exec) and a fake clock. The harness plays the loop of
// Run: one input at a time (a signal, a message, an exit), then woke, and
// between inputs the timer wake-ups Run would have, at most every
// loopWakeEvery.

// fakeProc is a worker process that never ran: the test speaks for it on
// the control pipe and decides when it exits.
type fakeProc struct {
	pid     int
	cmd     *exec.Cmd
	control *os.File // the worker's end of the control pipe
	output  *os.File // the worker's stderr
	exit    chan string

	mu      sync.Mutex
	signals []syscall.Signal
	reaped  bool
}

func (f *fakeProc) Pid() int { return f.pid }

func (f *fakeProc) Signal(sig syscall.Signal) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.reaped {
		return false
	}
	f.signals = append(f.signals, sig)
	return true
}

func (f *fakeProc) Wait() string {
	st := <-f.exit
	f.mu.Lock()
	f.reaped = true
	f.mu.Unlock()
	return st
}

// got returns the signals sent so far.
func (f *fakeProc) got() []syscall.Signal {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.signals)
}

func (f *fakeProc) env(key string) string {
	for _, kv := range f.cmd.Env {
		if k, v, _ := strings.Cut(kv, "="); k == key {
			return v
		}
	}
	return ""
}

// syncBuffer collects log lines from the loop and the output readers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

// lines returns the log lines whose message is msg.
func (b *syncBuffer) lines(msg string) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, l := range bytes.Split(b.b.Bytes(), []byte("\n")) {
		var m map[string]any
		if json.Unmarshal(l, &m) == nil && m["message"] == msg {
			out = append(out, m)
		}
	}
	return out
}

type harness struct {
	t      *testing.T
	s      *Supervisor
	now    time.Time
	log    *syncBuffer
	procs  []*fakeProc // every process started, in order
	failAt int         // the start number (1-based) that fails to execute; 0 none
	// auto, when set, makes every fake ready as it starts and exit on
	// SIGTERM, SIGQUIT or SIGKILL, for tests that run the real loop.
	auto bool
	// rss is every fake's resident memory; its default is 0.
	rss sync.Map // pid -> uint64
}

func (h *harness) rssOf(pid int) uint64 {
	v, _ := h.rss.Load(pid)
	n, _ := v.(uint64)
	return n
}

// newHarness creates a supervisor on fake processes and a fake clock and
// starts its workers, as Run does before its loop.
func newHarness(t *testing.T, cfg Config) *harness {
	t.Helper()
	h := &harness{t: t, now: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), log: &syncBuffer{}}
	if cfg.Addr == "" && cfg.UDS == "" && cfg.Listeners == nil {
		cfg.Addr = "127.0.0.1:0"
	}
	cfg.Logger = zerolog.New(h.log)
	s, err := newSupervisor(cfg, env{startProcess: h.start, now: func() time.Time { return h.now }, rss: h.rssOf})
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	t.Cleanup(func() {
		s.closeSockets()
		for _, f := range h.procs {
			f.control.Close()
			f.output.Close()
			select {
			case f.exit <- "exit 0":
			default:
			}
		}
	})
	return h
}

func (h *harness) start(cmd *exec.Cmd) (process, error) {
	if len(h.procs)+1 == h.failAt {
		h.failAt = 0
		return nil, &os.PathError{Op: "fork/exec", Path: cmd.Path, Err: syscall.ENOEXEC}
	}
	dup := func(f *os.File) *os.File {
		fd, err := syscall.Dup(int(f.Fd()))
		if err != nil {
			h.t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), f.Name())
	}
	f := &fakeProc{
		pid:     5_000_000 + len(h.procs) + 1, // above any pid Linux hands out
		cmd:     cmd,
		control: dup(cmd.ExtraFiles[0]),
		output:  dup(cmd.Stderr.(*os.File)),
		exit:    make(chan string, 1),
	}
	h.procs = append(h.procs, f)
	if h.auto {
		f.control.Write(protocol.Message{Type: protocol.TypeReady, PID: f.pid}.Encode())
	}
	return &autoProc{fakeProc: f, h: h}, nil
}

// autoProc exits on the signals that end a real worker when the harness
// runs in auto mode.
type autoProc struct {
	*fakeProc
	h *harness
}

func (a *autoProc) Signal(sig syscall.Signal) bool {
	ok := a.fakeProc.Signal(sig)
	if ok && a.h.auto && (sig == syscall.SIGTERM || sig == syscall.SIGKILL || sig == syscall.SIGQUIT) {
		a.die("signal " + sig.String())
	}
	return ok
}

func (f *fakeProc) die(status string) {
	f.control.Close()
	f.output.Close()
	select {
	case f.exit <- status:
	default:
	}
}

// pid is the pid of the process an event is about.
func (ev event) pid() int {
	if ev.up != nil {
		return ev.up.pid
	}
	return ev.p.pid
}

// begin starts the workers.
func (h *harness) begin() { h.s.begin() }

// pump handles the loop's events as Run does, until one matches.
func (h *harness) pump(what string, match func(event) bool) {
	h.t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case ev := <-h.s.events:
			h.s.onEvent(ev)
			h.s.woke()
			if match(ev) {
				return
			}
		case <-deadline:
			h.t.Fatalf("no event %s within 5s", what)
		}
	}
}

// send writes m on f's control pipe and lets the loop handle it.
func (h *harness) send(f *fakeProc, m protocol.Message) {
	h.t.Helper()
	m.PID = f.pid
	if _, err := f.control.Write(m.Encode()); err != nil {
		h.t.Fatal(err)
	}
	h.pump(m.Type+" from "+strconv.Itoa(f.pid), func(ev event) bool { return !ev.exited && ev.pid() == f.pid && ev.msg.Type == m.Type })
}

func (h *harness) ready(fs ...*fakeProc) {
	h.t.Helper()
	for _, f := range fs {
		h.send(f, protocol.Message{Type: protocol.TypeReady})
	}
}

func (h *harness) beat(fs ...*fakeProc) {
	h.t.Helper()
	for _, f := range fs {
		h.send(f, protocol.Message{Type: protocol.TypeHeartbeat})
	}
}

// exit ends f with status and lets the loop reap it.
func (h *harness) exit(f *fakeProc, status string) {
	h.t.Helper()
	f.die(status)
	h.pump("exit of "+strconv.Itoa(f.pid), func(ev event) bool { return ev.exited && ev.pid() == f.pid })
}

// signal delivers sig to the master.
func (h *harness) signal(sig syscall.Signal) {
	h.s.onSignal(sig)
	h.s.woke()
}

// advance lets d pass with the master running: the loop wakes at each
// deadline and at least every loopWakeEvery.
func (h *harness) advance(d time.Duration) {
	end := h.now.Add(d)
	for spins := 0; ; {
		wake := minTime(h.s.nextDeadline(), h.now.Add(loopWakeEvery))
		if !wake.After(h.now) {
			// A deadline that tick did not move: Run's loop would spin.
			if spins++; spins > 100 {
				h.t.Fatalf("the loop spins at %s: a deadline passed and nothing moved it", h.now)
			}
			wake = h.now
		} else {
			spins = 0
		}
		if wake.After(end) {
			h.now = end
			return
		}
		h.now = wake
		h.s.woke()
	}
}

// live lets d pass with fs heartbeating every half second.
func (h *harness) live(d time.Duration, fs ...*fakeProc) {
	h.t.Helper()
	for d > 0 {
		step := min(d, 500*time.Millisecond)
		h.advance(step)
		d -= step
		h.beat(fs...)
	}
}

// stall lets d pass with the master stopped, then wakes it once.
func (h *harness) stall(d time.Duration) {
	h.now = h.now.Add(d)
	h.s.woke()
}

// slotOf returns the slot a fake process was started for.
func slotOf(f *fakeProc) int {
	n, _ := strconv.Atoi(f.env(protocol.EnvSlot))
	return n
}

// state returns the supervisor's state of f's process, or "gone".
func (h *harness) state(f *fakeProc) string {
	if p, ok := h.s.procs[f.pid]; ok {
		return p.state.String()
	}
	return "gone"
}

func wantSignals(t *testing.T, f *fakeProc, want ...syscall.Signal) {
	t.Helper()
	if got := f.got(); !slices.Equal(got, want) {
		t.Errorf("signals to worker %d (pid %d) = %v, want %v", slotOf(f), f.pid, got, want)
	}
}

func wantStarted(t *testing.T, h *harness, n int) {
	t.Helper()
	if len(h.procs) != n {
		t.Fatalf("%d workers started, want %d", len(h.procs), n)
	}
}

// bootWith starts n workers and makes them ready.
func bootWith(t *testing.T, cfg Config) *harness {
	t.Helper()
	h := newHarness(t, cfg)
	h.begin()
	wantStarted(t, h, cfg.Workers)
	h.ready(h.procs...)
	if !h.s.booted {
		t.Fatalf("not booted after %d workers were ready", cfg.Workers)
	}
	return h
}

func TestCrashRestartsAtOnceThenAfterBackoff(t *testing.T) {
	h := bootWith(t, Config{Workers: 1})
	first := h.procs[0]
	h.advance(2 * time.Second)
	h.beat(first)

	h.exit(first, "exit 1")
	wantStarted(t, h, 2)
	second := h.procs[1]
	if got := h.s.procs[second.pid].why; got != "crash" {
		t.Errorf("replacement reason = %q, want crash", got)
	}
	h.ready(second)
	h.exit(second, "signal killed")
	wantStarted(t, h, 2) // the second crash waits
	wait := h.s.slots[0].restartAt.Sub(h.now)
	if lo, hi := backoffMin-backoffMin/8, backoffMin+backoffMin/8; wait < lo || wait > hi {
		t.Errorf("second crash backs off %s, want %s to %s", wait, lo, hi)
	}
	h.advance(wait - time.Millisecond)
	wantStarted(t, h, 2)
	h.advance(time.Millisecond)
	wantStarted(t, h, 3)

	// A third crash doubles the delay.
	h.ready(h.procs[2])
	h.exit(h.procs[2], "exit 2")
	if wait := h.s.slots[0].restartAt.Sub(h.now); wait < 2*backoffMin-backoffMin/4 || wait > 2*backoffMin+backoffMin/4 {
		t.Errorf("third crash backs off %s, want about %s", wait, 2*backoffMin)
	}
	h.advance(time.Second)
	wantStarted(t, h, 4)

	// A slot that keeps failing (its database down for an hour) waits
	// backoffMax between tries, no more.
	for i := range 400 {
		h.exit(h.procs[len(h.procs)-1], "exit 1")
		wait := h.s.slots[0].restartAt.Sub(h.now)
		if i > 10 && (wait < backoffMax-backoffMax/8 || wait > backoffMax+backoffMax/8) {
			t.Fatalf("crash %d backs off %s, want about %s", i+4, wait, backoffMax)
		}
		h.advance(wait)
	}
	wantStarted(t, h, 404)

	// A worker that stayed up a minute resets the count: its crash is
	// replaced at once again.
	last := h.procs[len(h.procs)-1]
	h.ready(last)
	for range 30 {
		h.advance(2 * time.Second)
		h.beat(last)
	}
	h.exit(last, "exit 1")
	wantStarted(t, h, 405)
	if n := len(h.log.lines("worker exited")); n != 404 {
		t.Errorf("%d \"worker exited\" lines, want 404", n)
	}
}

func TestDeathBeforeReadyInTheFirstGenerationIsABootFailure(t *testing.T) {
	h := newHarness(t, Config{Workers: 2})
	h.begin()
	h.ready(h.procs[0])
	h.exit(h.procs[1], "exit 3")
	var be *BootError
	if !errors.As(h.s.exitErr, &be) || be.Slot != 2 || be.PID != h.procs[1].pid || be.Status != "exit 3" {
		t.Fatalf("exitErr = %v, want a BootError for worker 2 (pid %d), exit 3", h.s.exitErr, h.procs[1].pid)
	}
	// The ready worker drains, as at any stop: it may be serving.
	wantSignals(t, h.procs[0], syscall.SIGTERM)
	wantStarted(t, h, 2) // no replacement
	h.exit(h.procs[0], "exit 0")
	if !h.s.done() {
		t.Errorf("loop not done after every worker was reaped")
	}
}

func TestReadyTimeoutInTheFirstGenerationIsABootFailure(t *testing.T) {
	h := newHarness(t, Config{Workers: 1, HealthcheckTimeout: 3 * time.Second})
	h.begin()
	h.advance(3*time.Second - time.Millisecond)
	if h.s.exitErr != nil {
		t.Fatalf("boot failed before the healthcheck timeout: %v", h.s.exitErr)
	}
	h.advance(time.Millisecond)
	if h.s.exitErr == nil || !strings.Contains(h.s.exitErr.Error(), "not ready within 3s") {
		t.Fatalf("exitErr = %v, want a boot failure: not ready within 3s", h.s.exitErr)
	}
	wantSignals(t, h.procs[0], syscall.SIGKILL)
}

func TestAWorkerThatCannotExecuteIsABootFailureOrBacksOff(t *testing.T) {
	h := newHarness(t, Config{Workers: 1})
	h.failAt = 1
	h.begin()
	if h.s.exitErr == nil || !strings.Contains(h.s.exitErr.Error(), "exec format error") {
		t.Fatalf("exitErr = %v, want a boot failure naming the exec error", h.s.exitErr)
	}

	h = bootWith(t, Config{Workers: 1})
	h.failAt = 2
	h.exit(h.procs[0], "exit 1")
	if h.s.exitErr != nil {
		t.Fatalf("a start failure after boot stopped the server: %v", h.s.exitErr)
	}
	if h.s.slots[0].restartAt.IsZero() {
		t.Fatalf("a start failure after a crash is not retried")
	}
	h.advance(time.Second)
	wantStarted(t, h, 2)
}

func TestSIGHUPRollsOneSlotAtATimeNewReadyBeforeOldDrains(t *testing.T) {
	h := bootWith(t, Config{Workers: 3})
	old := slices.Clone(h.procs)
	h.signal(syscall.SIGHUP)
	for i := range 3 {
		wantStarted(t, h, 4+i)
		next := h.procs[3+i]
		if slotOf(next) != i+1 {
			t.Fatalf("roll step %d started worker %d, want %d", i+1, slotOf(next), i+1)
		}
		if got := h.s.procs[next.pid].why; got != "hup" {
			t.Errorf("roll step %d reason %q, want hup", i+1, got)
		}
		// The old worker serves until its successor is ready.
		wantSignals(t, old[i])
		h.advance(time.Second)
		h.beat(old...)
		wantStarted(t, h, 4+i)
		h.ready(next)
		wantSignals(t, old[i], syscall.SIGTERM)
		if st := h.state(old[i]); st != "draining" {
			t.Errorf("old worker %d is %s after its successor was ready, want draining", i+1, st)
		}
	}
	if n := len(h.log.lines("rolling restart done")); n != 1 {
		t.Errorf("%d \"rolling restart done\" lines, want 1", n)
	}
	// The drains end in their own time; the loop never waited for them.
	// One that outlives the graceful budget (still heartbeating) is killed.
	h.exit(old[0], "exit 0")
	for range DefaultGracefulTimeout / (2 * time.Second) {
		h.advance(2 * time.Second)
		h.beat(old[1], old[2])
	}
	wantSignals(t, old[1], syscall.SIGTERM)
	h.advance(DefaultKillGrace + time.Millisecond)
	wantSignals(t, old[1], syscall.SIGTERM, syscall.SIGKILL)
}

func TestScaleDownRewiresTheNeighbour(t *testing.T) {
	h := bootWith(t, Config{Workers: 3})
	h.signal(syscall.SIGTTOU)
	wantSignals(t, h.procs[2], syscall.SIGTERM)
	wantStarted(t, h, 4)
	rewired := h.procs[3]
	if slotOf(rewired) != 2 || h.s.procs[rewired.pid].why != "rewire" {
		t.Fatalf("TTOU started worker %d (%s), want worker 2 rewired", slotOf(rewired), h.s.procs[rewired.pid].why)
	}
	// Slot 2 served slot 3's socket as its neighbour; now it serves slot
	// 1's, wrapping around.
	if got, want := listenerInodes(rewired.cmd), socketInodes(h.s.slots[1].sock, h.s.slots[0].sock); !slices.Equal(got, want) {
		t.Errorf("rewired worker's listeners = %v, want slot 2's and slot 1's sockets %v", got, want)
	}
	if rewired.env(protocol.EnvSlots) != "2" {
		t.Errorf("%s = %s, want 2", protocol.EnvSlots, rewired.env(protocol.EnvSlots))
	}
	h.ready(rewired)
	wantSignals(t, h.procs[1], syscall.SIGTERM)

	// TTIN adds slot 3 back and rewires slot 2 to serve its socket too.
	h.signal(syscall.SIGTTIN)
	wantStarted(t, h, 6)
	added, again := h.procs[4], h.procs[5]
	if slotOf(added) != 3 || slotOf(again) != 2 || h.s.procs[again.pid].why != "rewire" {
		t.Fatalf("TTIN started workers %d and %d, want 3 and 2 (rewire)", slotOf(added), slotOf(again))
	}
	if got, want := listenerInodes(again.cmd), socketInodes(h.s.slots[1].sock, h.s.slots[2].sock); !slices.Equal(got, want) {
		t.Errorf("rewired worker's listeners = %v, want slot 2's and slot 3's sockets %v", got, want)
	}

	// Never below one worker.
	h = bootWith(t, Config{Workers: 1})
	h.signal(syscall.SIGTTOU)
	wantStarted(t, h, 1)
	wantSignals(t, h.procs[0])
}

func listenerInodes(cmd *exec.Cmd) []uint64 { return socketInodes(cmd.ExtraFiles[3:]...) }

func socketInodes(fs ...*os.File) []uint64 {
	var out []uint64
	for _, f := range fs {
		var st syscall.Stat_t
		syscall.Fstat(int(f.Fd()), &st)
		out = append(out, st.Ino)
	}
	return out
}

func TestASilentWorkerGetsSIGQUITThenSIGKILL(t *testing.T) {
	h := bootWith(t, Config{Workers: 2, HealthcheckTimeout: 5 * time.Second})
	quiet, busy := h.procs[0], h.procs[1]
	for range 4 {
		h.advance(time.Second)
		h.beat(busy)
	}
	h.advance(time.Second - time.Millisecond)
	wantSignals(t, quiet)
	h.advance(time.Millisecond)
	wantSignals(t, quiet, syscall.SIGQUIT, syscall.SIGCONT)
	wantStarted(t, h, 3) // the replacement starts at once
	if slotOf(h.procs[2]) != 1 || h.s.procs[h.procs[2].pid].why != "hung" {
		t.Errorf("replacement for worker %d (%s), want worker 1 (hung)", slotOf(h.procs[2]), h.s.procs[h.procs[2].pid].why)
	}
	h.advance(DefaultKillGrace)
	wantSignals(t, quiet, syscall.SIGQUIT, syscall.SIGCONT, syscall.SIGKILL)
	wantSignals(t, busy)
	if l := h.log.lines("worker hung, sending SIGQUIT"); len(l) != 1 || l[0]["reason"] != "hung" {
		t.Errorf("hang log lines = %v, want one with reason hung", l)
	}
	h.exit(quiet, "signal killed")
	h.advance(time.Minute)
	wantSignals(t, quiet, syscall.SIGQUIT, syscall.SIGCONT, syscall.SIGKILL)
}

func TestASilentDrainingWorkerIsKilledBeforeItsBudget(t *testing.T) {
	h := bootWith(t, Config{Workers: 1, HealthcheckTimeout: 2 * time.Second})
	old := h.procs[0]
	h.signal(syscall.SIGHUP)
	h.ready(h.procs[1])
	wantSignals(t, old, syscall.SIGTERM)
	h.live(2*time.Second, h.procs[1])
	wantSignals(t, old, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGCONT)
	wantSignals(t, h.procs[1])
	if l := h.log.lines("worker hung, sending SIGQUIT"); len(l) != 1 || l[0]["reason"] != "hung while draining" {
		t.Errorf("hang log lines = %v, want one with reason hung while draining", l)
	}
}

func TestAStoppedMastersGapIsNotCountedAsSilence(t *testing.T) {
	h := bootWith(t, Config{Workers: 2, HealthcheckTimeout: 5 * time.Second})
	h.advance(4 * time.Second)
	h.stall(30 * time.Second) // SIGSTOP, a debugger, a frozen cgroup
	for _, f := range h.procs {
		wantSignals(t, f)
	}
	if l := h.log.lines("the master did not run for a while (stopped or starved); that time does not count as the workers' silence"); len(l) != 1 {
		t.Errorf("stall log lines = %d, want 1", len(l))
	}
	// The silence before the stall still counts: 4s before, 1s after.
	h.advance(time.Second - loopWakeEvery)
	for _, f := range h.procs[:2] {
		wantSignals(t, f, syscall.SIGQUIT, syscall.SIGCONT)
	}
}

func TestMaxRequestsRecycle(t *testing.T) {
	h := bootWith(t, Config{Workers: 2, MaxRequests: 1000, MaxRequestsJitter: 50})
	for _, f := range h.procs {
		n, err := strconv.Atoi(f.env(protocol.EnvMaxRequests))
		if err != nil || n < 1000 || n > 1050 {
			t.Errorf("%s = %q, want 1000 to 1050", protocol.EnvMaxRequests, f.env(protocol.EnvMaxRequests))
		}
	}
	old := h.procs[1]
	h.send(old, protocol.Message{Type: protocol.TypeRecycle, Requests: 1003, Reason: "max_requests"})
	wantStarted(t, h, 3)
	if slotOf(h.procs[2]) != 2 || h.s.procs[h.procs[2].pid].why != "max_requests" {
		t.Fatalf("recycle started worker %d (%s), want 2 (max_requests)", slotOf(h.procs[2]), h.s.procs[h.procs[2].pid].why)
	}
	// Asking twice starts nothing more.
	h.send(old, protocol.Message{Type: protocol.TypeRecycle, Requests: 1004, Reason: "max_requests"})
	wantStarted(t, h, 3)
	wantSignals(t, old)
	h.ready(h.procs[2])
	wantSignals(t, old, syscall.SIGTERM)
	if got := h.s.restartsBy["max_requests"]; got != 1 {
		t.Errorf("restarts by max_requests = %d, want 1", got)
	}
	h.exit(old, "exit 0")
	if l := h.log.lines("worker exited"); len(l) != 1 || l[0]["reason"] != "max_requests" {
		t.Errorf("exit lines = %v, want one with reason max_requests", l)
	}
}

// TestMaxMemory: a worker that grows past MaxMemory is recycled; one that
// is over it as soon as it is ready is not (its replacement would be too),
// and the log says so once.
func TestMaxMemory(t *testing.T) {
	const limit = 100 << 20
	h := bootWith(t, Config{Workers: 1, MaxMemory: limit})
	f := h.procs[0]
	h.rss.Store(f.pid, uint64(limit+1))
	h.beat(f)
	wantStarted(t, h, 2)
	if why := h.s.procs[h.procs[1].pid].why; why != "max_memory" {
		t.Fatalf("replacement started for %q, want max_memory", why)
	}

	h = newHarness(t, Config{Workers: 1, MaxMemory: limit})
	h.begin()
	f = h.procs[0]
	h.rss.Store(f.pid, uint64(2*limit))
	h.ready(f)
	h.beat(f)
	h.beat(f)
	wantStarted(t, h, 1)
	if n := len(h.log.lines("a worker is over --limit-max-memory as soon as it is ready, so recycling cannot help and is not done: raise the limit")); n != 1 {
		t.Errorf("%d lines saying the limit is below a fresh worker, want 1", n)
	}
}

func TestScaleWhileRolling(t *testing.T) {
	h := bootWith(t, Config{Workers: 2})
	h.signal(syscall.SIGHUP)
	wantStarted(t, h, 3) // slot 1 rolling
	h.signal(syscall.SIGTTIN)
	// Slot 3 starts; slot 2, which now also serves slot 3's socket, is
	// rewired while slot 1 is still rolling.
	wantStarted(t, h, 5)
	if slotOf(h.procs[3]) != 3 || slotOf(h.procs[4]) != 2 {
		t.Fatalf("TTIN while rolling started workers %d and %d, want 3 and 2", slotOf(h.procs[3]), slotOf(h.procs[4]))
	}
	h.ready(h.procs[3], h.procs[4]) // slot 2's rewire also serves its roll
	h.ready(h.procs[2])             // slot 1 done: the roll goes on to slot 2; slot 3 started after the HUP
	wantStarted(t, h, 6)
	if slotOf(h.procs[5]) != 2 {
		t.Fatalf("roll went on with worker %d, want 2", slotOf(h.procs[5]))
	}
	// Scaling down while slot 2's replacement starts: that replacement was
	// given slot 3's socket, which is going away, so once ready it is
	// rewired at once.
	h.signal(syscall.SIGTTOU)
	wantSignals(t, h.procs[3], syscall.SIGTERM)
	wantStarted(t, h, 6)
	h.ready(h.procs[5])
	wantStarted(t, h, 7)
	if slotOf(h.procs[6]) != 2 || h.s.procs[h.procs[6].pid].why != "rewire" {
		t.Fatalf("started worker %d (%s), want 2 (rewire)", slotOf(h.procs[6]), h.s.procs[h.procs[6].pid].why)
	}
	if n := len(h.log.lines("rolling restart done")); n != 1 {
		t.Errorf("%d \"rolling restart done\" lines, want 1", n)
	}
	h.ready(h.procs[6])
	if got, want := listenerInodes(h.procs[6].cmd), socketInodes(h.s.slots[1].sock, h.s.slots[0].sock); !slices.Equal(got, want) {
		t.Errorf("rewired worker's listeners = %v, want slot 2's and slot 1's sockets %v", got, want)
	}
	// Every slot ends with one ready worker; no slot had two starting.
	for _, sl := range h.s.slots {
		if sl.current == nil || sl.current.state != ready || sl.next != nil {
			t.Errorf("slot %d: current %v, next %v; want one ready worker", sl.n, sl.current, sl.next)
		}
	}
	if len(h.s.slots) != 2 {
		t.Errorf("%d slots, want 2", len(h.s.slots))
	}
}

// TestHUPRollsAReplacementStartedBeforeIt: a slot whose replacement
// started before the HUP (here the rewire a scale-up starts) is rolled
// again once that replacement is ready, so every worker serving after the
// roll started after the signal.
func TestHUPRollsAReplacementStartedBeforeIt(t *testing.T) {
	h := bootWith(t, Config{Workers: 1})
	h.signal(syscall.SIGTTIN)
	wantStarted(t, h, 3) // slot 2, then slot 1's rewire
	if slotOf(h.procs[1]) != 2 || slotOf(h.procs[2]) != 1 {
		t.Fatalf("TTIN started workers %d and %d, want 2 and 1", slotOf(h.procs[1]), slotOf(h.procs[2]))
	}
	h.advance(100 * time.Millisecond)
	h.signal(syscall.SIGHUP)
	wantStarted(t, h, 3) // slot 1 is being replaced: the roll waits for it
	h.ready(h.procs[1], h.procs[2])
	wantStarted(t, h, 4)
	if slotOf(h.procs[3]) != 1 || h.s.procs[h.procs[3].pid].why != "hup" {
		t.Fatalf("started worker %d (%s), want 1 (hup)", slotOf(h.procs[3]), h.s.procs[h.procs[3].pid].why)
	}
	h.ready(h.procs[3])
	wantStarted(t, h, 5)
	if slotOf(h.procs[4]) != 2 || h.s.procs[h.procs[4].pid].why != "hup" {
		t.Fatalf("started worker %d (%s), want 2 (hup)", slotOf(h.procs[4]), h.s.procs[h.procs[4].pid].why)
	}
	h.ready(h.procs[4])
	if n := len(h.log.lines("rolling restart done")); n != 1 {
		t.Errorf("%d \"rolling restart done\" lines, want 1", n)
	}
}

func TestShutdownDrainsThenKillsAndASecondSignalForces(t *testing.T) {
	h := bootWith(t, Config{Workers: 2, GracefulTimeout: 10 * time.Second})
	h.signal(syscall.SIGTERM)
	for _, f := range h.procs {
		wantSignals(t, f, syscall.SIGTERM)
	}
	h.exit(h.procs[0], "exit 0")
	h.live(10*time.Second, h.procs[1])
	wantSignals(t, h.procs[1], syscall.SIGTERM) // within budget + kill grace
	h.advance(DefaultKillGrace + time.Millisecond)
	wantSignals(t, h.procs[1], syscall.SIGTERM, syscall.SIGKILL)
	h.exit(h.procs[1], "signal killed")
	if !h.s.done() || h.s.exitErr != nil {
		t.Errorf("done = %v, exitErr = %v; want done, nil", h.s.done(), h.s.exitErr)
	}

	h = bootWith(t, Config{Workers: 1})
	h.signal(syscall.SIGINT)
	h.signal(syscall.SIGINT)
	wantSignals(t, h.procs[0], syscall.SIGTERM, syscall.SIGKILL)
}

// TestASecondStopCommandWaits: server stop twice drains once; only
// --force kills (a second SIGTERM does too, above).
func TestASecondStopCommandWaits(t *testing.T) {
	h := bootWith(t, Config{Workers: 1, GracefulTimeout: 10 * time.Second})
	stop := func(force bool) {
		t.Helper()
		ctl := control{req: Request{Cmd: "stop", Force: force}, reply: make(chan Response, 1)}
		h.s.onControl(ctl)
		h.s.woke()
		if r := <-ctl.reply; !r.OK {
			t.Fatalf("stop (force %v) = %+v, want OK", force, r)
		}
	}
	stop(false)
	stop(false)
	wantSignals(t, h.procs[0], syscall.SIGTERM)
	stop(true)
	wantSignals(t, h.procs[0], syscall.SIGTERM, syscall.SIGKILL)
}

// TestANewMasterTakingOverRefusesCommands: until its workers serve, a new
// master of an upgrade answers status only; a stop would fail the upgrade
// and leave the old master serving.
func TestANewMasterTakingOverRefusesCommands(t *testing.T) {
	h := bootWith(t, Config{Workers: 1})
	h.s.handoff, h.s.booted = &Handoff{ParentPID: 4321}, false
	for _, cmd := range []string{"stop", "reload", "scale", "upgrade"} {
		ctl := control{req: Request{Cmd: cmd, Workers: 2}, reply: make(chan Response, 2)}
		h.s.onControl(ctl)
		if r := <-ctl.reply; r.OK || !strings.Contains(r.Error, "upgrade is in progress") || !strings.Contains(r.Error, "4321") {
			t.Errorf("%s while taking over = %+v, want refused, naming the old master", cmd, r)
		}
	}
	wantSignals(t, h.procs[0])
	ctl := control{req: Request{Cmd: "status"}, reply: make(chan Response, 1)}
	h.s.onControl(ctl)
	if r := <-ctl.reply; !r.OK || r.Status == nil || r.Status.Upgrade == nil || r.Status.Upgrade.State != "taking over" {
		t.Errorf("status while taking over = %+v, want OK and the upgrade's state", r)
	}
}

func TestDrainDelayKeepsServingThenShutsDown(t *testing.T) {
	h := bootWith(t, Config{Workers: 1, DrainDelay: 3 * time.Second})
	h.signal(syscall.SIGTERM)
	wantSignals(t, h.procs[0])
	h.advance(3 * time.Second)
	wantSignals(t, h.procs[0], syscall.SIGTERM)
}

func TestAReplacementNotReadyInTimeIsRetriedWhileTheOldOneServes(t *testing.T) {
	h := bootWith(t, Config{Workers: 1, HealthcheckTimeout: 2 * time.Second})
	old := h.procs[0]
	h.signal(syscall.SIGHUP)
	slow := h.procs[1]
	h.live(2*time.Second, old)
	wantSignals(t, slow, syscall.SIGKILL)
	wantSignals(t, old)
	h.exit(slow, "signal killed")
	h.live(time.Second, old)
	wantStarted(t, h, 3)
	h.ready(h.procs[2])
	wantSignals(t, old, syscall.SIGTERM)
}

func TestScalingDownTheSlotBeingRolledLetsTheRollGoOn(t *testing.T) {
	h := bootWith(t, Config{Workers: 3})
	h.signal(syscall.SIGHUP)
	h.ready(h.procs[3]) // slot 1 rolled
	h.ready(h.procs[4]) // slot 2 rolled; slot 3 starting
	if slotOf(h.procs[5]) != 3 {
		t.Fatalf("roll is at worker %d, want 3", slotOf(h.procs[5]))
	}
	h.signal(syscall.SIGTTOU) // removes slot 3 and its starting replacement
	if st := h.state(h.procs[5]); st != "killing" {
		t.Errorf("the removed slot's starting replacement is %s, want killing", st)
	}
	h.ready(h.procs[6]) // slot 2 rewired
	if n := len(h.log.lines("rolling restart done")); n != 1 {
		t.Errorf("%d \"rolling restart done\" lines, want 1: the roll stalled on a removed slot", n)
	}
	if st := h.s.status().State; st != "running" {
		t.Errorf("state = %s, want running", st)
	}
}

func TestAReplacementThatDiesBeforeReadyAfterBootBacksOff(t *testing.T) {
	h := bootWith(t, Config{Workers: 2})
	h.exit(h.procs[0], "signal killed")
	for i := range 4 {
		f := h.procs[len(h.procs)-1]
		f.output.WriteString("server: test worker refuses to boot\n")
		h.exit(f, "exit 3")
		if h.s.exitErr != nil {
			t.Fatalf("the master stops (%v) when a later generation fails to boot", h.s.exitErr)
		}
		wait := h.s.slots[0].restartAt.Sub(h.now)
		if want := backoffMin << i; wait < want-want/8 || wait > want+want/8 {
			t.Errorf("retry %d backs off %s, want about %s", i+1, wait, want)
		}
		h.live(wait, h.procs[1])
	}
	if l := h.log.lines("worker exited"); len(l) != 5 || l[4]["reason"] != "died before ready" || l[4]["status"] != "exit 3" {
		t.Errorf("exit lines = %v, want the last: died before ready, exit 3", l)
	}
	// The worker's own error reaches the log, line by line.
	waitFor(t, 5*time.Second, func() error {
		if l := h.log.lines("worker output"); len(l) < 4 || l[0]["line"] != "server: test worker refuses to boot" {
			return fmt.Errorf("worker output lines = %v, want 4 with its error", l)
		}
		return nil
	})
	wantSignals(t, h.procs[1])
}
