package supervisor

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The control socket: a unix socket (mode 0600) on which `server status`,
// `server reload`, `server scale N`, `server stop` and `server upgrade`
// talk to the supervisor. One JSON request line, one JSON response line,
// then close; except that "upgrade" is answered twice: at once, with the
// new master's pid and the time limit (Upgrade.State "starting"), then
// once the new master is ready or the upgrade failed.

// Request is one command on the control socket.
type Request struct {
	// Cmd is "status", "reload", "scale", "stop" or "upgrade".
	Cmd string `json:"cmd"`
	// Workers is the target count for "scale".
	Workers int `json:"workers,omitempty"`
	// Force makes "stop" kill the workers at once.
	Force bool `json:"force,omitempty"`
}

// Response answers a Request.
type Response struct {
	OK     bool    `json:"ok"`
	Error  string  `json:"error,omitempty"`
	Status *Status `json:"status,omitempty"`
	// Upgrade answers "upgrade": first with State "starting", then, on a
	// second line, once the new master is ready (OK, State "done") or the
	// upgrade failed (Error).
	Upgrade *UpgradeStatus `json:"upgrade,omitempty"`
}

// Interim reports whether r is the first answer to "upgrade", which a
// final one follows on the same connection.
func (r Response) Interim() bool { return r.OK && r.Upgrade != nil && r.Upgrade.State == "starting" }

// Status is a snapshot of the supervisor and its workers.
type Status struct {
	Name       string         `json:"name"` // Config.Name
	Version    string         `json:"version"`
	PID        int            `json:"pid"`
	Started    time.Time      `json:"started"`
	UptimeS    float64        `json:"uptime_s"`
	Addr       string         `json:"addr"`
	SocketMode string         `json:"socket_mode"`
	State      string         `json:"state"` // starting, running, rolling, stopping
	Info       []Field        `json:"info,omitempty"`
	Workers    []WorkerStatus `json:"workers"`
	// Upgrade is the upgrade in progress or the last one that failed.
	Upgrade *UpgradeStatus `json:"upgrade,omitempty"`
}

// Field is one named fact about the application in Status (Config.Info).
type Field struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Panel is a table the status page shows below the workers (Config.Panel).
type Panel struct {
	Title   string     `json:"title"`
	Columns []string   `json:"columns"`
	Rows    [][]string `json:"rows"`
}

// WorkerStatus describes one worker process. A slot has one, or two while
// a replacement starts or an old worker drains.
type WorkerStatus struct {
	Slot       int     `json:"slot"`
	PID        int     `json:"pid"`
	Generation int     `json:"generation"`
	Version    string  `json:"version"` // the master's: a worker runs its master's binary
	State      string  `json:"state"`
	UptimeS    float64 `json:"uptime_s"`
	Requests   uint64  `json:"requests"`
	InFlight   int64   `json:"in_flight"`
	// Accept is "failing" while the worker's accept fails for want of
	// descriptors or kernel memory (its last heartbeat said so); omitted
	// otherwise.
	Accept      string  `json:"accept,omitempty"`
	RSS         uint64  `json:"rss_bytes"`
	CPUS        float64 `json:"cpu_s"`
	FDs         int     `json:"fds"`
	Restarts    int     `json:"restarts"`
	LastReason  string  `json:"last_restart_reason,omitempty"`
	HeartbeatS  float64 `json:"last_heartbeat_s"` // seconds ago; -1 before the first
	StartReason string  `json:"start_reason"`
}

// control is a request from a control connection to the loop.
type control struct {
	req   Request
	reply chan Response
}

// ErrControlInUse is returned when another running server answers on the
// control socket path.
var ErrControlInUse = errors.New("supervisor: control socket in use by a running server")

// listenControl creates the control socket at path, readable and writable
// by the owner only. A stale socket left by a dead server is replaced; a
// live one is an error.
func listenControl(path string) (*net.UnixListener, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen %s: %w", path, ErrControlInUse)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		os.Remove(path)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("supervisor: control socket: %w", err)
	}
	// The umask around bind gives the mode; a chmod after it would follow
	// a symlink put at path meanwhile (see listenUDS).
	old := syscall.Umask(0o177)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("supervisor: control socket: %w", err)
	}
	return ln, nil
}

// listenControl listens on the control socket: the one a new master
// inherits on an upgrade (the old master answered on it until then), or a
// new one at Config.ControlSocket.
func (s *Supervisor) listenControl() (*net.UnixListener, error) {
	h := s.handoff
	if h == nil || h.control == nil {
		return listenControl(s.cfg.ControlSocket)
	}
	ln, err := net.FileListener(h.control)
	h.control.Close()
	if err != nil {
		return nil, fmt.Errorf("supervisor: inherited control socket: %w", err)
	}
	ul, ok := ln.(*net.UnixListener)
	if !ok {
		ln.Close()
		return nil, fmt.Errorf("supervisor: inherited control socket is a %T, not a unix listener", ln)
	}
	// The path stays the old master's until this one is ready (takeOver):
	// a new master that fails must leave it to the old one.
	ul.SetUnlinkOnClose(false)
	return ul, nil
}

// serveControl accepts control connections until ln closes.
func (s *Supervisor) serveControl(ln *net.UnixListener, done <-chan struct{}) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		go s.handleControl(c, done)
	}
}

// controlTimeout bounds a control connection: reading its request and
// writing the answer (an upgrade's second answer gets the upgrade's limit).
const controlTimeout = 10 * time.Second

func (s *Supervisor) handleControl(c *net.UnixConn, done <-chan struct{}) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(controlTimeout))
	write := func(resp Response) {
		b, _ := json.Marshal(resp)
		c.Write(append(b, '\n'))
	}
	if err := sameUser(c); err != nil {
		write(Response{Error: err.Error()})
		return
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		write(Response{Error: "read request: " + err.Error()})
		return
	}
	var req Request
	if err := json.Unmarshal(line, &req); err != nil {
		write(Response{Error: "bad request: " + err.Error()})
		return
	}
	if req.Cmd == "upgrade" {
		// An upgrade is answered when it is done.
		c.SetDeadline(time.Now().Add(s.cfg.UpgradeTimeout + 30*time.Second))
	}
	// Room for both answers to an upgrade: the loop never waits on a
	// client.
	ctl := control{req: req, reply: make(chan Response, 2)}
	select {
	case s.controls <- ctl:
	case <-done:
		write(Response{Error: "server is stopping"})
		return
	}
	for {
		select {
		case resp := <-ctl.reply:
			s.addInfo(resp.Status)
			write(resp)
			if !resp.Interim() {
				return
			}
		case <-done:
			select {
			case resp := <-ctl.reply: // sent before Run returned
				write(resp)
			default:
				write(Response{Error: "server is stopping"})
			}
			return
		}
	}
}

// sameUser refuses peers other than the server's own user and root; the
// socket's mode already keeps others out, this holds if it is loosened.
func sameUser(c *net.UnixConn) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var cred *unix.Ucred
	var cerr error
	raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	})
	if cerr != nil {
		return cerr
	}
	if cred.Uid != 0 && int(cred.Uid) != os.Getuid() {
		return fmt.Errorf("uid %d may not control a server run by uid %d", cred.Uid, os.Getuid())
	}
	return nil
}

// onControl runs a control request in the loop.
func (s *Supervisor) onControl(ctl control) {
	if s.handoff != nil && !s.booted && ctl.req.Cmd != "status" {
		// Stopping a new master before it serves fails the upgrade and
		// the old master serves on: not what the command asked.
		ctl.reply <- Response{Error: fmt.Sprintf("an upgrade is in progress: this new master (pid %d) is taking over from pid %d; retry once it serves (server status shows when)",
			os.Getpid(), s.handoff.ParentPID)}
		return
	}
	r := Response{OK: true}
	switch ctl.req.Cmd {
	case "status":
		r.Status = s.status()
	case "reload":
		if s.stopping {
			r = Response{Error: "server is stopping"}
			break
		}
		s.onSignal(syscall.SIGHUP)
	case "scale":
		n := ctl.req.Workers
		if n < 1 || n > MaxWorkers {
			r = Response{Error: fmt.Sprintf("scale to %d workers: want 1 to %d", n, MaxWorkers)}
			break
		}
		if s.stopping {
			r = Response{Error: "server is stopping"}
			break
		}
		if s.reload != nil {
			r = Response{Error: "reload mode runs one worker; scaling is for production mode"}
			break
		}
		for len(s.slots) < n {
			before := len(s.slots)
			s.scaleUp()
			if len(s.slots) == before {
				r = Response{Error: "scale up failed; see the server log"}
				break
			}
		}
		for len(s.slots) > n {
			s.scaleDown()
		}
	case "upgrade":
		if err := s.startUpgrade(); err != nil {
			r = Response{Error: strings.TrimPrefix(err.Error(), "supervisor: ")}
			break
		}
		ctl.reply <- Response{OK: true, Upgrade: &UpgradeStatus{State: "starting", NewPID: s.up.pid, TimeoutS: seconds(s.cfg.UpgradeTimeout)}}
		s.up.waiters = append(s.up.waiters, ctl.reply)
		return
	case "stop":
		switch {
		case ctl.req.Force:
			s.kill("forced")
		case !s.stopping:
			s.onSignal(syscall.SIGTERM)
		}
		// A second stop waits like the first: cutting the drain short
		// takes --force (a second SIGTERM does it too).
	default:
		r = Response{Error: fmt.Sprintf("unknown command %q: want status, reload, scale, stop or upgrade", ctl.req.Cmd)}
	}
	ctl.reply <- r
}

// addInfo adds Config.Info's fields to st, outside the loop.
func (s *Supervisor) addInfo(st *Status) {
	if st != nil && s.cfg.Info != nil {
		st.Info = s.cfg.Info()
	}
}

// status snapshots the supervisor for `server status`.
// seconds is d in seconds, to the millisecond: the *_s fields of the
// status carry no more digits than they mean.
func seconds(d time.Duration) float64 {
	return math.Round(d.Seconds()*1000) / 1000
}

func (s *Supervisor) status() *Status {
	now := s.env.now()
	st := &Status{
		Name:       s.cfg.Name,
		Version:    s.cfg.Version,
		PID:        os.Getpid(),
		Started:    s.started,
		UptimeS:    seconds(now.Sub(s.started)),
		Addr:       s.where(),
		SocketMode: string(s.cfg.SocketMode),
		State:      "running",
		Workers:    []WorkerStatus{},
	}
	st.Upgrade = s.upgradeStatus()
	switch {
	case s.handedOver:
		st.State = "handed over"
	case s.stopping:
		st.State = "stopping"
	case s.upgrading():
		st.State = "upgrading"
	case !s.booted:
		st.State = "starting"
	case s.rollSlot != nil || len(s.rolling) > 0:
		st.State = "rolling"
	}
	for _, p := range s.sortedProcs() {
		u := readUsage(p.pid)
		w := WorkerStatus{
			Slot: p.slot.n, PID: p.pid, Generation: p.gen, Version: s.cfg.Version, State: p.state.String(),
			UptimeS: seconds(now.Sub(p.started)), Requests: p.requests, InFlight: p.inFlight, Accept: p.accept,
			RSS: u.RSS, CPUS: seconds(u.CPU), FDs: u.FDs,
			Restarts: p.slot.restarts, LastReason: p.slot.lastReason, HeartbeatS: -1, StartReason: p.why,
		}
		if !p.lastBeat.IsZero() {
			w.HeartbeatS = seconds(now.Sub(p.lastBeat))
		}
		st.Workers = append(st.Workers, w)
	}
	return st
}
