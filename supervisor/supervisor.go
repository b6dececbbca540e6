package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"

	"github.com/corralhq/corral/supervisor/protocol"
)

// SocketMode says how workers share the listening port.
type SocketMode string

const (
	// Reuseport gives every worker slot its own SO_REUSEPORT socket, which
	// the kernel balances evenly; each worker also serves its neighbour's
	// socket, so a dead or stopped worker strands nothing.
	Reuseport SocketMode = "reuseport"
	// Shared gives every worker the same socket, as uvicorn and gunicorn do.
	Shared SocketMode = "shared"
)

// Defaults applied by New to zero fields of Config.
const (
	DefaultAddr               = "0.0.0.0:8000"
	DefaultWorkers            = 4
	DefaultBacklog            = 2048
	DefaultGracefulTimeout    = protocol.DefaultGracefulTimeout
	DefaultHealthcheckTimeout = 10 * time.Second
	// DefaultKillGrace is how long a worker has between SIGQUIT (stack dump)
	// or the end of its drain budget and SIGKILL.
	DefaultKillGrace = time.Second
	// MaxWorkers bounds the worker count, TTIN included.
	MaxWorkers = 512
)

// Backoff of a slot whose workers keep dying: the first crash is replaced
// at once, the next ones after backoffMin doubling to backoffMax, with
// jitter; a worker that stayed up for backoffReset resets the count.
const (
	backoffMin   = 100 * time.Millisecond
	backoffMax   = 10 * time.Second
	backoffReset = time.Minute
)

// Config configures a Supervisor. The zero value starts DefaultWorkers
// workers on DefaultAddr.
type Config struct {
	// Addr is host:port to serve; port 0 picks a free port. Default DefaultAddr.
	Addr string
	// UDS, if set, is a unix socket path served instead of Addr, by every
	// worker on one socket (shared mode), as uvicorn's --uds.
	UDS string
	// TLS says the workers serve HTTPS, so the address is logged as an
	// https:// URL.
	TLS bool
	// Workers is the initial number of workers. Default DefaultWorkers.
	Workers int
	// SocketMode is Reuseport (default) or Shared.
	SocketMode SocketMode
	// Backlog is the listen backlog of each socket. Default DefaultBacklog.
	Backlog int
	// GracefulTimeout is how long a stopping worker may drain before
	// SIGKILL. Default DefaultGracefulTimeout.
	GracefulTimeout time.Duration
	// HealthcheckTimeout is how long a worker may take to become ready, and
	// how long a ready worker may go without heartbeat before it is
	// considered hung. Default DefaultHealthcheckTimeout.
	HealthcheckTimeout time.Duration
	// MaxRequests recycles a worker after that many requests, plus a random
	// 0..MaxRequestsJitter; 0 means never.
	MaxRequests, MaxRequestsJitter int
	// Args are the command-line arguments as given to the server (without
	// the program name); a new master started by an upgrade parses them.
	Args []string
	// WorkerArgs are the command-line arguments the workers parse. Default
	// Args; an empty, non-nil slice gives workers no argument.
	WorkerArgs []string
	// Env is the environment of the workers before the markers are added.
	// Default os.Environ().
	Env []string
	// Name prefixes process titles ("NAME: worker 2 [gen 1]"). Default
	// the executable's base name.
	Name string
	// Signals delivers the supervisor's signals: SIGINT, SIGTERM, SIGQUIT,
	// SIGHUP, SIGTTIN, SIGTTOU. Only cmd/ calls signal.Notify.
	Signals <-chan os.Signal
	// Logger receives every state change; the zero value discards them.
	Logger zerolog.Logger
	// SetTitle rewrites the supervisor's own process title as the worker
	// count changes. Only a process started with a title in argv[0] (the
	// master's re-exec) should set it.
	SetTitle bool
	// Reload, if set, turns on development reload (see ReloadConfig).
	Reload *ReloadConfig
	// Listeners, if any, are listening sockets inherited from systemd's
	// socket activation: every worker serves all of them (shared mode) and
	// the supervisor binds nothing.
	Listeners []*os.File
	// DrainDelay is how long, on SIGTERM, workers keep serving with /health
	// answering 503 before they stop accepting, so load balancers move
	// away first. Default 0.
	DrainDelay time.Duration
	// ControlSocket is the path of the control socket; "" means none.
	ControlSocket string
	// MaxMemory recycles a worker whose resident memory exceeds it, in
	// bytes; 0 means no limit.
	MaxMemory uint64
	// MetricsAddr, if set, is host:port of the metrics and status page
	// server; see metrics.go.
	MetricsAddr string
	// MetricsToken, if set, is required by the metrics server.
	MetricsToken string
	// MetricsHostAllowed, if set, reports whether the metrics server
	// answers a request whose Host header names host (port included or
	// not); it answers 421 to the others, so that a page on a DNS
	// rebinding domain cannot read the status. Nil answers any host.
	MetricsHostAllowed func(host string) bool
	// StatusNotes are warnings appended to systemd's STATUS= line, so
	// that `systemctl status` shows them (an API open to every host).
	StatusNotes []string
	// Version is the application's version, as Status shows it.
	Version string
	// Info, if set, returns named facts about the application (its
	// database, its upstream) that Status shows after the supervisor's
	// own: `status` on the control socket, /status.json and the status
	// page's header. It is called outside the supervisor's loop, once per
	// status request, and must return quickly.
	Info func() []Field
	// Panel, if set, fills the status page's extra panel, below the
	// workers, on each refresh. It is called outside the supervisor's loop
	// with a context that ends after 2 seconds; an error leaves the panel
	// empty and is logged.
	Panel func(ctx context.Context) (Panel, error)
	// Upgrade, if set, makes this master the successor of one that is
	// upgrading (see Inherited): it serves the sockets handed over, binds
	// nothing, and reports to the old master once all its workers are
	// ready. Addr, UDS, Listeners, SocketMode and Workers are then ignored.
	Upgrade *Handoff
	// UpgradeTimeout is how long a new master started by an upgrade may
	// take, migrations and its workers' start included, to report that it
	// is ready; past it the upgrade fails and this master serves on.
	// Default DefaultUpgradeTimeout.
	UpgradeTimeout time.Duration
	// HandOver, if set, returns the application's own files a new master
	// inherits on an upgrade, as Handoff.Files (the store's instance lock,
	// for example). It is called from the supervisor's loop.
	HandOver func() []*os.File
	// Charts are the status page's small charts over the last 15 minutes,
	// computed from the workers' metrics (see Chart); none by default.
	Charts []Chart
	// Metrics, if set, writes the application's own metrics in Prometheus
	// text (such as a job queue's depth, which no one worker owns); /metrics
	// merges them, unlabelled, with the supervisor's and the workers'; its
	// # HELP and # TYPE lines describe its families. It
	// is called outside the supervisor's loop, once per scrape, and must
	// return quickly.
	Metrics func(w io.Writer)
	// OnWorkerExit, if set, is called from the supervisor's loop after a
	// worker process exited; crashed is false when the supervisor had asked
	// it to stop. It must return quickly.
	OnWorkerExit func(pid int, crashed bool)
}

// BootError reports that a worker of the first generation exited before it
// became ready, which stops the whole server (exit status 3).
type BootError struct {
	Slot   int
	PID    int
	Status string // "exit status 3", "signal: killed", "not ready within 10s"
}

func (e *BootError) Error() string {
	return fmt.Sprintf("worker %d (pid %d) failed to boot: %s", e.Slot, e.PID, e.Status)
}

// ErrBoot is what a BootError matches with errors.Is.
var ErrBoot = errors.New("supervisor: worker failed to boot")

// Is reports whether target is ErrBoot.
func (e *BootError) Is(target error) bool { return target == ErrBoot }

// slot is one worker position, with its socket in reuseport mode.
type slot struct {
	n        int // 1-based position
	sock     *os.File
	gen      int   // generation of the newest worker started
	current  *proc // the serving worker, nil after it died
	next     *proc // a replacement that is starting
	failures int   // consecutive deaths, for the backoff
	// restartAt is when a backed-off replacement starts; zero when none is due.
	restartAt  time.Time
	restartWhy string
	gone       bool   // scaled away
	restarts   int    // workers started after the first
	lastReason string // why the last one was started
}

// Supervisor starts, watches and replaces worker processes. Create it with
// New and run it with Run, once.
type Supervisor struct {
	cfg    Config
	env    env
	log    zerolog.Logger
	exe    string     // what workers run: the binary this master runs, through self
	path   string     // the installed binary, which an upgrade runs
	self   *os.File   // this master's binary, kept open so workers never run another
	addr   net.Addr   // *net.TCPAddr, or *net.UnixAddr with UDS
	shared []*os.File // Shared mode: the one socket, or every activated one
	uds    string     // the unix socket file to remove when done; "" once removed

	slots  []*slot
	procs  map[int]*proc // every live worker process, by pid
	events chan event

	booted  bool  // every slot has had a ready worker
	rolling []int // slots still to roll for SIGHUP, in order
	// rollAfter is when the last SIGHUP came: a worker started before it
	// is rolled.
	rollAfter time.Time
	rollSlot  *slot // the slot being rolled now
	stopping  bool
	// warnedMemory: the log said once that MaxMemory is below a fresh
	// worker's size.
	warnedMemory bool
	exitErr      error
	rng          *rand.Rand
	reload       *reloadState // nil unless Config.Reload is set

	started    time.Time
	controls   chan control
	snapshots  chan snapshotReq
	charts     *charts           // the status page's charts; nil without Config.Charts
	restartsBy map[string]uint64 // workers started after the first, by reason
	notify     *notifier
	drainUntil time.Time // end of the drain delay; zero when none runs
	lastWake   time.Time // when the loop last woke, to measure its stalls

	activated  bool              // the shared sockets are systemd's
	ctl        *net.UnixListener // the control socket, nil without one
	metricsLn  *net.TCPListener  // the metrics listener, nil without one
	handoff    *Handoff          // this master's upgrade handoff, nil when started normally
	up         *upgrade          // an upgrade in progress, nil when none
	upgradeErr string            // why the last upgrade failed
	handedOver bool              // a new master serves; this one drains and exits
	// While an upgrade starts, the control and metrics listeners are the
	// new master's to serve; these copies bring them back if it fails.
	ctlFile, metricsFile *os.File
	quit                 chan struct{} // closed when Run returns
}

// serveControlOn serves the control socket on ln until it closes.
func (s *Supervisor) serveControlOn(ln *net.UnixListener) {
	s.ctl = ln
	go s.serveControl(ln, s.quit)
}

// serveMetricsOn serves the metrics address on ln until it closes or Run
// returns.
func (s *Supervisor) serveMetricsOn(ln *net.TCPListener) {
	s.metricsLn = ln
	go s.serveMetrics(ln, s.quit)
}

// New validates cfg, binds the listening sockets and returns a Supervisor
// ready to Run. A busy or forbidden address returns an *AddrError before
// anything has started.
func New(cfg Config) (*Supervisor, error) {
	return newSupervisor(cfg, osEnv)
}

func newSupervisor(cfg Config, e env) (*Supervisor, error) {
	if cfg.Addr == "" {
		cfg.Addr = DefaultAddr
	}
	if cfg.Workers == 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.Workers < 1 || cfg.Workers > MaxWorkers {
		return nil, fmt.Errorf("supervisor: %d workers: want 1 to %d", cfg.Workers, MaxWorkers)
	}
	if cfg.SocketMode == "" {
		cfg.SocketMode = Reuseport
	}
	if cfg.SocketMode != Reuseport && cfg.SocketMode != Shared {
		return nil, fmt.Errorf("supervisor: socket mode %q: want %q or %q", cfg.SocketMode, Reuseport, Shared)
	}
	if cfg.Backlog <= 0 {
		cfg.Backlog = DefaultBacklog
	}
	if cfg.GracefulTimeout <= 0 {
		cfg.GracefulTimeout = DefaultGracefulTimeout
	}
	if cfg.HealthcheckTimeout <= 0 {
		cfg.HealthcheckTimeout = DefaultHealthcheckTimeout
	}
	if cfg.UpgradeTimeout <= 0 {
		cfg.UpgradeTimeout = DefaultUpgradeTimeout
	}
	if cfg.Env == nil {
		cfg.Env = os.Environ()
	}
	if cfg.WorkerArgs == nil {
		cfg.WorkerArgs = cfg.Args
	}
	path, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("supervisor: find own executable: %w", err)
	}
	// Workers run the binary this master runs, even after the file at path
	// was replaced: the child's execve resolves /proc/MASTER/fd/N to the
	// file this master opened. Not /proc/self/fd/N: in the child, N may
	// already hold one of the worker's inherited descriptors, which are
	// moved into place before execve.
	self, err := os.Open("/proc/self/exe")
	if err != nil {
		return nil, fmt.Errorf("supervisor: open own executable: %w", err)
	}
	exe := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), self.Fd())
	if cfg.Name == "" {
		cfg.Name = filepath.Base(path)
	}
	s := &Supervisor{
		cfg:        cfg,
		env:        e,
		log:        cfg.Logger,
		exe:        exe,
		path:       path,
		self:       self,
		procs:      make(map[int]*proc),
		events:     make(chan event, 64),
		rng:        rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(os.Getpid()))),
		controls:   make(chan control),
		snapshots:  make(chan snapshotReq),
		restartsBy: make(map[string]uint64),
		started:    e.now(),
	}
	s.notify = newNotifier(s)
	if cfg.Reload != nil {
		rc := *cfg.Reload
		rc.setDefaults()
		s.reload = &reloadState{cfg: rc, changes: make(chan []string), builds: make(chan buildResult), good: s.exe}
	}
	if cfg.Upgrade != nil {
		if err := s.adopt(cfg.Upgrade); err != nil {
			return nil, err
		}
		return s, nil
	}
	if len(cfg.Listeners) > 0 {
		s.activated = true
		addr, err := socketAddr(cfg.Listeners[0])
		if err != nil {
			return nil, err
		}
		s.addr, s.shared, s.cfg.SocketMode = addr, cfg.Listeners, Shared
		if u, ok := addr.(*net.UnixAddr); ok {
			s.cfg.UDS = u.Name // shown as unix:PATH; the file stays systemd's
		}
		for range cfg.Workers {
			s.addSlot() // cannot fail: shared slots open no socket
		}
		return s, nil
	}
	if cfg.UDS != "" {
		f, err := listenUDS(cfg.UDS, cfg.Backlog)
		if err != nil {
			return nil, err
		}
		s.addr, s.shared, s.uds, s.cfg.SocketMode = &net.UnixAddr{Name: cfg.UDS, Net: "unix"}, []*os.File{f}, cfg.UDS, Shared
		for range cfg.Workers {
			s.addSlot() // cannot fail: shared slots open no socket
		}
		return s, nil
	}
	addr, err := probeAddr(cfg.Addr)
	if err != nil {
		return nil, err
	}
	s.addr = addr
	if cfg.SocketMode == Shared {
		f, err := listenSocket(addr, false, cfg.Backlog)
		if err != nil {
			return nil, &AddrError{Addr: addr.String(), Err: err}
		}
		s.shared = []*os.File{f}
	}
	for range cfg.Workers {
		if err := s.addSlot(); err != nil {
			s.closeSockets()
			return nil, err
		}
	}
	if n := foreignListeners(addr.Port, s.sockets()); n > 0 {
		s.closeSockets()
		return nil, &AddrError{Addr: addr.String(), Err: syscall.EADDRINUSE}
	}
	return s, nil
}

// Addr returns the address the server listens on, with the chosen port.
func (s *Supervisor) Addr() net.Addr { return s.addr }

// where is the address as the title and status show it: host:port, or
// unix:PATH.
func (s *Supervisor) where() string {
	if s.cfg.UDS != "" {
		return "unix:" + s.cfg.UDS
	}
	return s.addr.String()
}

// url is where clients reach the server, as the log shows it.
func (s *Supervisor) url() string {
	if s.cfg.UDS != "" {
		return s.where()
	}
	if s.cfg.TLS {
		return "https://" + s.where()
	}
	return "http://" + s.where()
}

// Run starts the workers and supervises them until a shutdown signal has
// been handled and every worker has been reaped. It returns nil after an
// orderly or forced shutdown and a *BootError when a first-generation
// worker could not start. Run must be called once.
func (s *Supervisor) Run() (err error) {
	defer s.closeSockets()
	s.log.Info().Int("pid", os.Getpid()).Msg("Started server process")
	// Only a scale-down closes a slot's socket, and reload mode never
	// scales: say it once, where it can happen.
	if s.cfg.SocketMode == Reuseport && s.cfg.Reload == nil && len(s.slots) > 1 && migrateReqDisabled() {
		s.log.Info().Str("fix", "sysctl -w net.ipv4.tcp_migrate_req=1").
			Msg("net.ipv4.tcp_migrate_req is 0: scaling down resets the connections queued on the removed worker's socket")
	}
	s.log.Info().
		Str("url", s.url()).
		Int("workers", len(s.slots)).
		Str("socket_mode", string(s.cfg.SocketMode)).
		Msg("Corral running, press CTRL+C to quit")
	s.setTitle()
	var changes <-chan []string
	var builds <-chan buildResult
	if s.reload != nil {
		stop := make(chan struct{})
		defer close(stop)
		if err := s.startReload(stop); err != nil {
			return err
		}
		defer s.endReload()
		changes, builds = s.reload.changes, s.reload.builds
	}
	if s.handoff != nil {
		// Tell the old master, whatever ends this one before it is ready,
		// with Run's own error when there is one. (Fail does nothing once
		// the handoff has reported ready.)
		defer func() {
			why := err
			if why == nil {
				why = errors.New("the new master stopped before it was ready")
			}
			s.handoff.Fail(why)
		}()
	}
	s.quit = make(chan struct{})
	defer close(s.quit)
	if s.cfg.ControlSocket != "" {
		ln, err := s.listenControl()
		if err != nil {
			return err
		}
		s.serveControlOn(ln)
		defer func() {
			if s.ctl != nil {
				s.ctl.Close() // also removes the socket file
			}
		}()
		s.log.Info().Str("path", s.cfg.ControlSocket).Msg("control socket ready")
	}
	if s.cfg.MetricsAddr != "" {
		ln, err := s.listenMetrics()
		if err != nil {
			return err
		}
		if len(s.cfg.Charts) > 0 {
			s.charts = newCharts(s.cfg.Charts)
			go s.sampleCharts(s.quit)
		}
		s.serveMetricsOn(ln)
		s.log.Info().Str("url", "http://"+ln.Addr().String()+"/").Msg("metrics and status page ready")
	}
	s.begin()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for !s.done() {
		// The loop wakes at least every loopWakeEvery, so that a longer gap
		// between two wake-ups measures a time the master did not run.
		timer.Reset(min(s.nextDeadline().Sub(s.env.now()), loopWakeEvery))
		select {
		case sig := <-s.cfg.Signals:
			s.onSignal(sig)
		case ev := <-s.events:
			s.onEvent(ev)
		case paths := <-changes:
			s.onChanges(paths)
		case res := <-builds:
			s.onBuild(res)
		case ctl := <-s.controls:
			s.onControl(ctl)
		case req := <-s.snapshots:
			s.onSnapshot(req)
		case <-timer.C:
		}
		s.woke()
	}
	if s.handedOver {
		s.log.Info().Msg("old workers drained, old master exiting")
	}
	if s.exitErr == nil {
		s.log.Info().Msg("Finished server process")
	}
	return s.exitErr
}

// begin starts a worker on every slot; the loop takes over from there.
func (s *Supervisor) begin() {
	s.lastWake = s.env.now()
	for _, sl := range s.slots {
		s.spawn(sl, "start")
	}
}

// done reports whether the loop is over: stopping, and every worker reaped.
func (s *Supervisor) done() bool { return s.stopping && len(s.procs) == 0 && s.up == nil }

// woke runs after each input the loop handled and each time its timer
// fired: a stall of the master is taken out of the workers' silence, then
// every deadline that passed is acted on.
func (s *Supervisor) woke() {
	now := s.env.now()
	if gap := now.Sub(s.lastWake); gap > 2*loopWakeEvery {
		s.forgive(now, gap-loopWakeEvery)
	}
	s.lastWake = now
	s.tick(now)
}

// loopWakeEvery bounds how long the loop sleeps.
const loopWakeEvery = 250 * time.Millisecond

// forgive takes a time the master did not run (stopped by SIGSTOP or a
// debugger, a frozen cgroup, a starved machine) out of the workers'
// silence: the heartbeats they sent meanwhile are still queued, and
// counting that time would kill every healthy worker as hung at once.
func (s *Supervisor) forgive(now time.Time, stalled time.Duration) {
	for _, p := range s.procs {
		if p.state == ready || p.state == draining {
			p.lastBeat = p.lastBeat.Add(stalled)
			if p.lastBeat.After(now) {
				p.lastBeat = now
			}
		}
	}
	ev := s.log.Debug()
	if stalled >= time.Second {
		ev = s.log.Warn()
	}
	ev.Dur("stalled_ms", stalled).Msg("the master did not run for a while (stopped or starved); that time does not count as the workers' silence")
}

// signalMeanings says what each signal asks of the master, for the log.
var signalMeanings = map[os.Signal]string{
	syscall.SIGINT:  "drain and stop",
	syscall.SIGTERM: "drain and stop",
	syscall.SIGQUIT: "stop now",
	syscall.SIGHUP:  "rolling restart",
	syscall.SIGTTIN: "add a worker",
	syscall.SIGTTOU: "remove a worker",
}

// describeSignal names sig as kill(1) does, with what it asks of the
// master: "SIGTTIN (add a worker)". A second INT or TERM stops at once.
func (s *Supervisor) describeSignal(sig os.Signal) string {
	name := sig.String()
	if n, ok := sig.(syscall.Signal); ok && unix.SignalName(n) != "" {
		name = unix.SignalName(n)
	}
	meaning := signalMeanings[sig]
	if s.stopping && (sig == syscall.SIGINT || sig == syscall.SIGTERM) {
		meaning = "stop now"
	}
	if meaning == "" {
		return name
	}
	return name + " (" + meaning + ")"
}

func (s *Supervisor) onSignal(sig os.Signal) {
	s.log.Info().Str("signal", s.describeSignal(sig)).Msg("signal received")
	switch sig {
	case syscall.SIGINT, syscall.SIGTERM:
		if s.stopping {
			s.kill("forced")
			return
		}
		s.notify.stopping()
		if s.cfg.DrainDelay > 0 {
			// Keep serving, /health answering 503, so load balancers
			// move away before the listeners close; tick ends it.
			s.stopping, s.drainUntil = true, s.env.now().Add(s.cfg.DrainDelay)
			s.rolling = nil
			s.tellWorkers(protocol.Message{Type: protocol.TypeDrain})
			s.log.Info().Dur("delay_ms", s.cfg.DrainDelay).Msg("draining: health checks fail before shutdown")
			return
		}
		s.shutdown("shutdown")
	case syscall.SIGQUIT:
		s.stopping = true
		s.kill("quit")
	case syscall.SIGHUP:
		if s.stopping {
			return
		}
		s.rolling, s.rollAfter = s.rolling[:0], s.env.now()
		for _, sl := range s.slots {
			s.rolling = append(s.rolling, sl.n)
		}
		s.log.Info().Int("workers", len(s.slots)).Msg("rolling restart")
		s.notify.reloading()
		s.roll()
	case syscall.SIGTTIN:
		s.scaleUp()
	case syscall.SIGTTOU:
		s.scaleDown()
	case syscall.SIGUSR2:
		if err := s.startUpgrade(); err != nil && !errors.Is(err, errUpgradeFailed) {
			s.log.Error().Err(err).Msg("upgrade not started")
		}
	}
}

// shutdown starts the orderly stop: every worker drains within the
// graceful budget and is killed after it.
func (s *Supervisor) shutdown(reason string) {
	s.stopping = true
	s.giveBack()
	s.rolling = nil
	s.log.Info().Dur("budget_ms", s.cfg.GracefulTimeout).Int("workers", len(s.procs)).Str("reason", reason).Msg("Shutting down")
	for _, sl := range s.slots {
		sl.restartAt = time.Time{}
	}
	for _, p := range s.procs {
		s.stop(p, reason)
	}
	if s.upgrading() {
		s.upgradeFailed("the old master is stopping")
	}
	// No worker will start again: let go of the listening sockets, so that
	// they close once the draining workers close theirs (after the close
	// lead-in) and new connections are refused at once rather than left
	// in a backlog nobody accepts from, to be reset when the master exits.
	// Sockets from systemd stay open in systemd, queueing for the next start.
	s.closeSockets()
}

// kill sends SIGKILL to every worker; they are reaped as they exit.
func (s *Supervisor) kill(reason string) {
	s.stopping = true
	s.giveBack()
	if s.up != nil {
		s.up.process.Signal(syscall.SIGKILL)
	}
	for _, p := range s.procs {
		if p.signal(syscall.SIGKILL) {
			s.log.Warn().Int("pid", p.pid).Int("worker", p.slot.n).Str("reason", reason).Msg("worker killed")
		}
		p.reason = reason
		p.state, p.deadline = killing, s.env.now().Add(afterKill)
	}
}

func (s *Supervisor) onEvent(ev event) {
	if ev.up != nil {
		s.onUpgradeEvent(ev)
		return
	}
	p := ev.p
	if ev.exited {
		s.onExit(p, ev.status)
		return
	}
	if _, live := s.procs[p.pid]; !live {
		return // a message that raced the exit
	}
	switch ev.msg.Type {
	case protocol.TypeReady:
		s.onReady(p)
	case protocol.TypeHeartbeat:
		p.lastBeat = s.env.now()
		p.requests, p.inFlight = ev.msg.Requests, ev.msg.InFlight
		if ev.msg.Accept != p.accept {
			p.accept = ev.msg.Accept
			if p.accept == protocol.AcceptFailing {
				s.log.Warn().Int("pid", p.pid).Int("worker", p.slot.n).Msg("worker cannot accept connections (out of file descriptors or kernel memory); new ones wait in the backlog")
			} else {
				s.log.Info().Int("pid", p.pid).Int("worker", p.slot.n).Msg("worker accepts connections again")
			}
		}
		if ev.msg.Metrics != "" {
			p.metrics = []byte(ev.msg.Metrics)
		}
		s.checkMemory(p)
	case protocol.TypeRecycle:
		if p == p.slot.current && !s.stopping {
			s.log.Info().Int("pid", p.pid).Int("worker", p.slot.n).Uint64("requests", ev.msg.Requests).Str("reason", ev.msg.Reason).Msg("recycling worker")
			s.replace(p.slot, ev.msg.Reason)
		}
	}
}

// nextDeadline is the earliest time the loop has something to do on its own.
func (s *Supervisor) nextDeadline() time.Time {
	now := s.env.now()
	next := now.Add(time.Hour)
	for _, p := range s.procs {
		next = minTime(next, s.due(p))
	}
	for _, sl := range s.slots {
		if !sl.restartAt.IsZero() {
			next = minTime(next, sl.restartAt)
		}
	}
	if !s.drainUntil.IsZero() {
		next = minTime(next, s.drainUntil)
	}
	if d := s.upgradeDue(); !d.IsZero() {
		next = minTime(next, d)
	}
	return minTime(next, s.notify.deadline(now))
}

// sortedProcs returns the live workers by slot, then generation.
func (s *Supervisor) sortedProcs() []*proc {
	ps := make([]*proc, 0, len(s.procs))
	for _, p := range s.procs {
		ps = append(ps, p)
	}
	slices.SortFunc(ps, func(a, b *proc) int {
		if a.slot.n != b.slot.n {
			return a.slot.n - b.slot.n
		}
		return a.gen - b.gen
	})
	return ps
}

// checkMemory recycles p once its resident memory passes MaxMemory, unless
// it was over the limit already when it became ready: its replacement would
// be too, and recycling would never end.
func (s *Supervisor) checkMemory(p *proc) {
	if s.cfg.MaxMemory == 0 || p != p.slot.current || p.slot.next != nil {
		return
	}
	rss := s.env.rss(p.pid)
	switch {
	case rss <= s.cfg.MaxMemory:
	case p.readyRSS > s.cfg.MaxMemory:
		if !s.warnedMemory {
			s.warnedMemory = true
			s.log.Error().Int("pid", p.pid).Int("worker", p.slot.n).Uint64("rss_at_ready", p.readyRSS).Uint64("limit", s.cfg.MaxMemory).
				Msg("a worker is over --limit-max-memory as soon as it is ready, so recycling cannot help and is not done: raise the limit")
		}
	default:
		s.log.Warn().Int("pid", p.pid).Int("worker", p.slot.n).Uint64("rss", rss).Uint64("limit", s.cfg.MaxMemory).
			Str("reason", "max_memory").Msg("recycling worker")
		s.replace(p.slot, "max_memory")
	}
}

// sockets returns every listening socket the supervisor owns.
func (s *Supervisor) sockets() []*os.File {
	fs := append([]*os.File(nil), s.shared...)
	for _, sl := range s.slots {
		if sl.sock != nil {
			fs = append(fs, sl.sock)
		}
	}
	return fs
}

func (s *Supervisor) closeSockets() {
	for _, f := range s.shared {
		f.Close()
	}
	if s.uds != "" {
		os.Remove(s.uds) // once: a later server may have made its own there
		s.uds = ""
	}
	for _, sl := range s.slots {
		if sl.sock != nil {
			sl.sock.Close()
		}
	}
}

// jitter returns a random whole number from 0 to n.
func (s *Supervisor) jitter(n int) int {
	if n <= 0 {
		return 0
	}
	return s.rng.IntN(n + 1)
}
