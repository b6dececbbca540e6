package supervisor

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/corralhq/corral/supervisor/protocol"
)

// The hitless upgrade. SIGUSR2 (or `upgrade` on the control socket) makes
// the master execute the binary installed at its path as a new master and
// hand it every listening socket, the control and metrics listeners and the
// application's own files (Config.HandOver). The new master starts its
// workers on those sockets and, once all are ready, reports on the upgrade
// pipe; only then does the old master drain its own workers and exit 0. No
// socket is closed or bound again, so the kernel's queues are never lost.
// Until the report, the old master serves as before; if the new master
// exits, reports a failure or is not ready within Config.UpgradeTimeout, it
// is stopped and the old master keeps serving.

// DefaultUpgradeTimeout is Config.UpgradeTimeout's default.
const DefaultUpgradeTimeout = 2 * time.Minute

// ErrUpgrade is what errors refusing or failing an upgrade match.
var ErrUpgrade = errors.New("supervisor: upgrade")

// errUpgradeFailed marks an upgrade that failed as it started (the binary
// does not execute): logged and kept for the status like any later
// failure, unlike a refusal.
var errUpgradeFailed = errors.New("failed")

// upgrade is an upgrade in progress, seen from the old master.
type upgrade struct {
	process  process
	pid      int
	started  time.Time
	deadline time.Time // starting: give up at this time; stopping: SIGKILL
	stopping bool      // failed, and the new master is being stopped
	waiters  []chan Response
}

// Handoff is what a master started by an upgrade inherits from the master
// it replaces. Get it with Inherited and pass it as Config.Upgrade.
type Handoff struct {
	// Files are the application's own files the old master handed over
	// (its Config.HandOver), in the same order.
	Files []*os.File
	// ParentPID and ParentVersion describe the old master.
	ParentPID     int
	ParentVersion string

	info             protocol.Upgrade
	report           *os.File // the upgrade pipe; nil once reported
	control, metrics *os.File
	slots, shared    []*os.File
}

// Inherited returns the handoff of a master started by an upgrade, and nil
// in any other process. It takes the descriptors protocol.EnvUpgrade
// names and unsets the variable, so that it reaches no child.
func Inherited() (*Handoff, error) {
	enc, ok := os.LookupEnv(protocol.EnvUpgrade)
	if !ok {
		return nil, nil
	}
	os.Unsetenv(protocol.EnvUpgrade)
	h := &Handoff{}
	if err := json.Unmarshal([]byte(enc), &h.info); err != nil {
		return nil, fmt.Errorf("invalid %s %q: it is set by the server itself; unset it", protocol.EnvUpgrade, enc)
	}
	h.ParentPID, h.ParentVersion = h.info.Parent, h.info.Version
	fd := protocol.UpgradeFD
	next := func(name string) *os.File {
		f := os.NewFile(uintptr(fd), name)
		fd++
		syscall.CloseOnExec(int(f.Fd()))
		return f
	}
	h.report = next("upgrade pipe")
	if h.info.Control {
		h.control = next("control socket")
	}
	if h.info.Metrics {
		h.metrics = next("metrics listener")
	}
	for i := range h.info.Slots {
		h.slots = append(h.slots, next("socket "+strconv.Itoa(i+1)))
	}
	for range h.info.Shared {
		h.shared = append(h.shared, next("shared socket"))
	}
	for range h.info.Files {
		h.Files = append(h.Files, next("handed-over file"))
	}
	return h, nil
}

// Fail tells the old master that this new master gives up, with err as the
// reason; the old master keeps serving and stops this one. It does nothing
// once the handoff has been reported, and may be called more than once.
func (h *Handoff) Fail(err error) {
	if h == nil || err == nil {
		return
	}
	h.send(protocol.Message{Type: protocol.TypeFailed, PID: os.Getpid(), Error: err.Error()})
}

func (h *Handoff) send(m protocol.Message) {
	if h == nil || h.report == nil {
		return
	}
	h.report.Write(m.Encode())
	h.report.Close()
	h.report = nil
}

// adopt takes the sockets of the handoff as the supervisor's own.
func (s *Supervisor) adopt(h *Handoff) error {
	s.handoff = h
	s.cfg.Workers = max(h.info.Workers, 1)
	switch {
	case len(h.slots) > 0:
		addr, err := socketAddr(h.slots[0])
		if err != nil {
			return err
		}
		s.addr, s.cfg.SocketMode, s.cfg.UDS = addr, Reuseport, ""
		for _, f := range h.slots {
			s.slots = append(s.slots, &slot{n: len(s.slots) + 1, sock: f})
		}
		s.cfg.Workers = len(h.slots)
		return nil
	case len(h.shared) > 0:
		addr, err := socketAddr(h.shared[0])
		if err != nil {
			return err
		}
		s.addr, s.shared, s.cfg.SocketMode, s.cfg.UDS = addr, h.shared, Shared, h.info.UDS
		s.activated = h.info.Activated
		for range s.cfg.Workers {
			s.addSlot() // cannot fail: shared slots open no socket
		}
		return nil
	}
	return fmt.Errorf("%w: the old master handed over no listening socket", ErrUpgrade)
}

// takeOver makes the paths of the control socket and of the --uds socket
// this master's to remove when it stops, once its workers are ready and it
// has told the old master so. Until then they are the old master's: a new
// master that fails leaves them in place for it.
func (s *Supervisor) takeOver() {
	h := s.handoff
	if s.ctl != nil {
		s.ctl.SetUnlinkOnClose(true)
	}
	if h.info.UDS != "" && !h.info.Activated {
		s.uds = h.info.UDS
	}
}

// giveBack closes, in a new master that stops before it was ready, the
// control and metrics listeners it was serving: the old master serves them
// again, and no request may reach a master on its way out. The control
// socket's path stays (takeOver has not run).
func (s *Supervisor) giveBack() {
	if s.handoff == nil || s.handoff.report == nil {
		return
	}
	if s.ctl != nil {
		s.ctl.Close()
		s.ctl = nil
	}
	if s.metricsLn != nil {
		s.metricsLn.Close()
		s.metricsLn = nil
	}
}

// startUpgrade starts a new master from the installed binary, or says why
// not.
func (s *Supervisor) startUpgrade() error {
	switch {
	case s.reload != nil:
		return fmt.Errorf("%w refused: reload mode builds and swaps its worker itself; upgrades are for production mode", ErrUpgrade)
	case s.up != nil:
		return fmt.Errorf("%w refused: an upgrade is in progress (new master pid %d)", ErrUpgrade, s.up.pid)
	case s.stopping:
		return fmt.Errorf("%w refused: the server is stopping", ErrUpgrade)
	case !s.booted && s.handoff != nil:
		// The control socket is this master's from its start, so a second
		// `server upgrade` during an upgrade lands here.
		return fmt.Errorf("%w refused: an upgrade is in progress (this master, pid %d, is taking over from pid %d)", ErrUpgrade, os.Getpid(), s.handoff.ParentPID)
	case !s.booted:
		return fmt.Errorf("%w refused: the server is still starting", ErrUpgrade)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("%w: pipe: %w", ErrUpgrade, err)
	}
	info := protocol.Upgrade{Parent: os.Getpid(), Version: s.cfg.Version, Workers: len(s.slots), UDS: s.cfg.UDS, Activated: s.activated}
	files := []*os.File{w}
	// The control and metrics listeners pass to the new master, which
	// serves them from its start; this master stops accepting on them
	// first. (Handing a descriptor to a child puts its open file
	// description in blocking mode, os/exec calls Fd, and an Accept of this
	// master's running meanwhile would then block in the kernel, and its
	// Close with it.) Connections wait in the backlog until the new master
	// accepts them; if it fails, this master serves them again (resume).
	if err := s.pauseListeners(); err != nil {
		r.Close()
		w.Close()
		s.resumeListeners()
		return fmt.Errorf("%w: %w", ErrUpgrade, err)
	}
	if s.ctlFile != nil {
		files, info.Control = append(files, s.ctlFile), true
	}
	if s.metricsFile != nil {
		files, info.Metrics = append(files, s.metricsFile), true
	}
	if s.shared == nil {
		for _, sl := range s.slots {
			files = append(files, sl.sock)
			info.Slots++
		}
	} else {
		files = append(files, s.shared...)
		info.Shared = len(s.shared)
	}
	if s.cfg.HandOver != nil {
		own := s.cfg.HandOver()
		files = append(files, own...)
		info.Files = len(own)
	}
	enc, _ := json.Marshal(info)
	args, _ := json.Marshal(s.cfg.Args)
	title := fmt.Sprintf("%s: master [%d workers, %s]", s.cfg.Name, len(s.slots), s.where())
	cmd := &exec.Cmd{
		Path: s.path,
		// Padded, as the first master's re-exec pads it, so that the title
		// can be rewritten in place.
		Args: []string{title + strings.Repeat(" ", 24)},
		Env: masterEnv(os.Environ(), map[string]string{
			protocol.EnvRole:    protocol.RoleMaster,
			protocol.EnvArgs:    string(args),
			protocol.EnvUpgrade: string(enc),
		}),
		Stdout:     os.Stdout,
		Stderr:     os.Stderr,
		ExtraFiles: files,
	}
	child, err := s.env.startProcess(cmd)
	w.Close()
	if err != nil {
		r.Close()
		s.resumeListeners()
		s.upgradeErr = fmt.Sprintf("the new master did not start: %v", err)
		s.log.Error().Str("binary", s.path).Str("reason", s.upgradeErr).Msg("upgrade failed, old master keeps serving")
		return fmt.Errorf("%w %w: %s", ErrUpgrade, errUpgradeFailed, s.upgradeErr)
	}
	now := s.env.now()
	s.up = &upgrade{process: child, pid: child.Pid(), started: now, deadline: now.Add(s.cfg.UpgradeTimeout)}
	s.upgradeErr = ""
	go s.readUpgrade(s.up, r)
	go func(up *upgrade) {
		s.events <- event{up: up, exited: true, status: child.Wait()}
	}(s.up)
	s.log.Info().Int("pid", os.Getpid()).Int("new_pid", s.up.pid).Str("binary", s.path).Str("version", s.cfg.Version).Msg("upgrade started")
	s.setTitle()
	return nil
}

// pauseListeners stops serving the control and metrics listeners and keeps
// a copy of each in ctlFile and metricsFile.
func (s *Supervisor) pauseListeners() error {
	if s.ctl != nil {
		f, err := s.ctl.File()
		if err != nil {
			return fmt.Errorf("control socket: %w", err)
		}
		s.ctl.SetUnlinkOnClose(false)
		s.ctl.Close()
		s.ctl, s.ctlFile = nil, f
	}
	if s.metricsLn != nil {
		f, err := s.metricsLn.File()
		if err != nil {
			return fmt.Errorf("metrics listener: %w", err)
		}
		s.metricsLn.Close()
		s.metricsLn, s.metricsFile = nil, f
	}
	return nil
}

// resumeListeners serves the listeners pauseListeners kept again.
func (s *Supervisor) resumeListeners() {
	if f := s.ctlFile; f != nil {
		s.ctlFile = nil
		ln, err := net.FileListener(f)
		f.Close()
		if ul, ok := ln.(*net.UnixListener); err == nil && ok {
			ul.SetUnlinkOnClose(true)
			s.serveControlOn(ul)
		} else {
			s.log.Error().Err(err).Msg("control socket lost")
		}
	}
	if f := s.metricsFile; f != nil {
		s.metricsFile = nil
		ln, err := net.FileListener(f)
		f.Close()
		if tl, ok := ln.(*net.TCPListener); err == nil && ok {
			s.serveMetricsOn(tl)
		} else {
			s.log.Error().Err(err).Msg("metrics listener lost")
		}
	}
}

// dropListeners closes the copies pauseListeners kept: the new master
// serves the listeners now.
func (s *Supervisor) dropListeners() {
	for _, f := range []*os.File{s.ctlFile, s.metricsFile} {
		if f != nil {
			f.Close()
		}
	}
	s.ctlFile, s.metricsFile = nil, nil
}

// masterEnv is base for a new master: the server's markers replaced, and
// without systemd's socket-activation variables (the sockets come through
// the handoff) and WATCHDOG_PID (systemd set it to the old master's pid;
// without it the new master pets the watchdog too). NOTIFY_SOCKET stays:
// the new master tells systemd it is the main process now.
func masterEnv(base []string, markers map[string]string) []string {
	env := make([]string, 0, len(base)+len(markers))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "CORRAL_") || k == "WATCHDOG_PID" || k == "LISTEN_FDS" || k == "LISTEN_PID" || k == "LISTEN_FDNAMES" {
			continue
		}
		env = append(env, kv)
	}
	for k, v := range markers {
		env = append(env, k+"="+v)
	}
	return env
}

// readUpgrade forwards the new master's one report to the loop.
func (s *Supervisor) readUpgrade(up *upgrade, r *os.File) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), protocol.MaxMessage)
	if sc.Scan() {
		m, err := protocol.Decode(sc.Bytes())
		if err != nil {
			m = protocol.Message{Type: protocol.TypeFailed, Error: err.Error()}
		}
		s.events <- event{up: up, msg: m}
	}
}

// onUpgradeEvent handles the new master's report or exit.
func (s *Supervisor) onUpgradeEvent(ev event) {
	up := ev.up
	if up != s.up {
		return // an upgrade already handed over or forgotten
	}
	switch {
	case ev.exited:
		if !up.stopping {
			s.upgradeFailed(fmt.Sprintf("the new master exited (%s) before it was ready", ev.status))
		}
		s.up = nil
		s.setTitle()
	case up.stopping:
	case ev.msg.Type == protocol.TypeReady:
		s.handOver(up, ev.msg)
	default:
		reason := ev.msg.Error
		if reason == "" {
			reason = "the new master reported " + ev.msg.Type
		}
		s.upgradeFailed(reason)
	}
}

// upgradeFailed logs why the upgrade failed, once, and stops the new
// master; the old one keeps serving.
func (s *Supervisor) upgradeFailed(reason string) {
	up := s.up
	s.upgradeErr = reason
	s.log.Error().Int("new_pid", up.pid).Str("reason", reason).Msg("upgrade failed, old master keeps serving")
	for _, w := range up.waiters {
		w <- Response{Error: "upgrade failed: " + reason}
	}
	up.waiters = nil
	// The new master closes its copies of the listeners when it gets the
	// signal; until then a connection may still reach it.
	up.process.Signal(syscall.SIGTERM)
	up.stopping = true
	up.deadline = s.env.now().Add(s.cfg.GracefulTimeout + DefaultKillGrace)
	s.resumeListeners()
}

// handOver lets the new master serve alone: the old master drains its
// workers and exits.
func (s *Supervisor) handOver(up *upgrade, m protocol.Message) {
	s.log.Info().Int("old_pid", os.Getpid()).Str("old_version", s.cfg.Version).
		Int("new_pid", up.pid).Str("new_version", m.Version).
		Dur("took_ms", s.env.now().Sub(up.started)).Msg("new master ready, old workers draining")
	s.up, s.handedOver = nil, true
	// systemd follows the new master now; a STOPPING=1 from here would stop
	// the service.
	s.notify.enabled = false
	// The control socket's path and the unix socket's are the new
	// master's now.
	s.dropListeners()
	for _, w := range up.waiters {
		w <- Response{OK: true, Upgrade: &UpgradeStatus{State: "done", NewPID: up.pid, NewVersion: m.Version}}
	}
	s.uds = ""
	s.shutdown("upgrade")
	s.setTitle()
}

// UpgradeStatus describes an upgrade in Status and in the answers to
// "upgrade".
type UpgradeStatus struct {
	// State, seen from the old master: "starting" while a new master
	// starts (and in the first answer to "upgrade"), "failed" after the
	// last one failed, "done" in the final answer to a completed upgrade.
	// Seen from the new master, which answers on the control socket from
	// its start: "taking over" until its workers are ready, then "old
	// master draining" until the old master has exited.
	State      string `json:"state"`
	NewPID     int    `json:"new_pid,omitempty"`
	NewVersion string `json:"new_version,omitempty"`
	OldPID     int    `json:"old_pid,omitempty"`
	OldVersion string `json:"old_version,omitempty"`
	// TimeoutS is the time limit of a starting upgrade, in seconds.
	TimeoutS float64 `json:"timeout_s,omitempty"`
	Error    string  `json:"error,omitempty"`
}

// upgrading reports whether an upgrade is in progress: a new master is
// starting, and has not failed.
func (s *Supervisor) upgrading() bool { return s.up != nil && !s.up.stopping }

func (s *Supervisor) upgradeStatus() *UpgradeStatus {
	switch {
	case s.upgrading():
		return &UpgradeStatus{State: "starting", NewPID: s.up.pid, TimeoutS: seconds(s.cfg.UpgradeTimeout)}
	case s.upgradeErr != "":
		return &UpgradeStatus{State: "failed", Error: s.upgradeErr}
	case s.handoff == nil:
		return nil
	case !s.booted:
		return &UpgradeStatus{State: "taking over", OldPID: s.handoff.ParentPID, OldVersion: s.handoff.ParentVersion}
	case os.Getppid() == s.handoff.ParentPID:
		// The old master is this master's parent until it exits; then
		// the kernel gives this master another.
		return &UpgradeStatus{State: "old master draining", OldPID: s.handoff.ParentPID, OldVersion: s.handoff.ParentVersion}
	}
	return nil
}

// upgradeDue returns when the upgrade next needs the loop; zero when none
// runs.
func (s *Supervisor) upgradeDue() time.Time {
	if s.up == nil {
		return time.Time{}
	}
	return s.up.deadline
}

// upgradeTick acts on the upgrade's deadline.
func (s *Supervisor) upgradeTick(now time.Time) {
	up := s.up
	if up == nil || now.Before(up.deadline) {
		return
	}
	if !up.stopping {
		s.upgradeFailed(fmt.Sprintf("the new master was not ready within %s", s.cfg.UpgradeTimeout))
		return
	}
	up.process.Signal(syscall.SIGKILL)
	up.deadline = now.Add(afterKill)
}
