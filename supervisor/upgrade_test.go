package supervisor

import (
	"bufio"
	"encoding/json"
	"errors"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/corralhq/corral/supervisor/protocol"
)

// The upgrade on fake processes: the new master is a fake too, and the
// test speaks for it on the upgrade pipe.

// upgradeInfo returns the handoff a new master was started with.
func upgradeInfo(t *testing.T, f *fakeProc) protocol.Upgrade {
	t.Helper()
	var u protocol.Upgrade
	if err := json.Unmarshal([]byte(f.env(protocol.EnvUpgrade)), &u); err != nil {
		t.Fatalf("%s = %q: %v", protocol.EnvUpgrade, f.env(protocol.EnvUpgrade), err)
	}
	return u
}

func TestUpgradeHandsOverOnceTheNewMasterIsReady(t *testing.T) {
	sock := t.TempDir() + "/ctl.sock"
	h := bootWith(t, Config{Workers: 2, Version: "v1", HandOver: func() []*os.File { return []*os.File{os.Stdin} }})
	ln, err := listenControl(sock)
	if err != nil {
		t.Fatal(err)
	}
	h.s.ctl = ln
	h.signal(syscall.SIGUSR2)
	wantStarted(t, h, 3)
	nm := h.procs[2]
	if nm.cmd.Path != h.s.path || !strings.Contains(nm.cmd.Args[0], "master") {
		t.Errorf("new master runs %s %q, want %s with a master title", nm.cmd.Path, nm.cmd.Args, h.s.path)
	}
	u := upgradeInfo(t, nm)
	if u.Parent != os.Getpid() || u.Version != "v1" || u.Workers != 2 || u.Slots != 2 || !u.Control || u.Files != 1 {
		t.Errorf("handoff = %+v, want parent %d, v1, 2 workers, 2 slots, control, 1 file", u, os.Getpid())
	}
	if n := len(nm.cmd.ExtraFiles); n != 1+1+2+1 {
		t.Errorf("new master inherits %d files, want 5: pipe, control, 2 slots, 1 of the application's", n)
	}
	if got := nm.env(protocol.EnvRole); got != protocol.RoleMaster {
		t.Errorf("%s = %q, want master", protocol.EnvRole, got)
	}
	if h.s.ctl != nil {
		t.Errorf("the old master still accepts on the control socket the new master serves")
	}
	if st := h.s.status(); st.State != "upgrading" || st.Upgrade == nil || st.Upgrade.NewPID != nm.pid {
		t.Errorf("status = %s %+v, want upgrading to %d", st.State, st.Upgrade, nm.pid)
	}
	// One at a time.
	h.signal(syscall.SIGUSR2)
	wantStarted(t, h, 3)
	if l := h.log.lines("upgrade not started"); len(l) != 1 || !strings.Contains(l[0]["error"].(string), "an upgrade is in progress") {
		t.Errorf("second upgrade lines = %v, want one refusal: in progress", l)
	}
	// The old workers serve until the new master is ready.
	h.live(5*time.Second, h.procs[0], h.procs[1])
	wantSignals(t, h.procs[0])
	h.send(nm, protocol.Message{Type: protocol.TypeReady, Version: "v2"})
	l := h.log.lines("new master ready, old workers draining")
	if len(l) != 1 || l[0]["new_version"] != "v2" || l[0]["old_version"] != "v1" || int(l[0]["new_pid"].(float64)) != nm.pid {
		t.Errorf("ready lines = %v, want one with v1, v2 and pid %d", l, nm.pid)
	}
	for _, f := range h.procs[:2] {
		wantSignals(t, f, syscall.SIGTERM)
	}
	wantSignals(t, nm)
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("the control socket's path went away with the old master's listener: %v", err)
	}
	if st := h.s.status(); st.State != "handed over" {
		t.Errorf("state = %s, want handed over", st.State)
	}
	h.exit(h.procs[0], "exit 0")
	h.exit(h.procs[1], "exit 0")
	if !h.s.done() {
		t.Errorf("old master not done once its workers drained")
	}
	if got := h.log.lines("Shutting down"); len(got) != 1 || got[0]["reason"] != "upgrade" {
		t.Errorf("shutdown lines = %v, want one with reason upgrade", got)
	}
}

func TestUpgradeFailsWhenTheNewMasterExits(t *testing.T) {
	sock := t.TempDir() + "/ctl.sock"
	h := bootWith(t, Config{Workers: 1})
	ln, err := listenControl(sock)
	if err != nil {
		t.Fatal(err)
	}
	h.s.quit = make(chan struct{})
	defer close(h.s.quit)
	h.s.serveControlOn(ln)
	h.signal(syscall.SIGUSR2)
	h.exit(h.procs[1], "exit 1")
	l := h.log.lines("upgrade failed, old master keeps serving")
	if len(l) != 1 || l[0]["reason"] != "the new master exited (exit 1) before it was ready" {
		t.Errorf("failure lines = %v, want one: exited (exit 1) before it was ready", l)
	}
	wantSignals(t, h.procs[0])
	// The old master answers on the control socket again.
	if h.s.ctl == nil {
		t.Fatalf("control socket not served again after the failed upgrade")
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("control socket after the failed upgrade: %v", err)
	}
	c.Close()
	st := h.s.status()
	if st.State != "running" || st.Upgrade == nil || st.Upgrade.State != "failed" || !strings.Contains(st.Upgrade.Error, "exit 1") {
		t.Errorf("status = %s %+v, want running with the failed upgrade", st.State, st.Upgrade)
	}
	// The next upgrade may start.
	h.signal(syscall.SIGUSR2)
	wantStarted(t, h, 3)
}

func TestUpgradeFailsOnTheNewMastersReportOrItsTimeout(t *testing.T) {
	h := bootWith(t, Config{Workers: 1, GracefulTimeout: 5 * time.Second, UpgradeTimeout: 30 * time.Second})
	h.signal(syscall.SIGUSR2)
	nm := h.procs[1]
	h.send(nm, protocol.Message{Type: protocol.TypeFailed, Error: "migrate: disk full"})
	wantSignals(t, nm, syscall.SIGTERM)
	if l := h.log.lines("upgrade failed, old master keeps serving"); len(l) != 1 || l[0]["reason"] != "migrate: disk full" {
		t.Errorf("failure lines = %v, want its own reason", l)
	}
	h.signal(syscall.SIGUSR2)
	wantStarted(t, h, 2) // still in progress until it exits
	h.exit(nm, "exit 1")
	if n := len(h.log.lines("upgrade failed, old master keeps serving")); n != 1 {
		t.Errorf("%d failure lines, want the reason logged once", n)
	}

	h.signal(syscall.SIGUSR2)
	slow := h.procs[2]
	if st := h.s.status(); st.Upgrade == nil || st.Upgrade.State != "starting" || st.Upgrade.TimeoutS != 30 {
		t.Errorf("status while starting = %+v, want starting with a 30 s limit", st.Upgrade)
	}
	h.live(30*time.Second, h.procs[0])
	wantSignals(t, slow, syscall.SIGTERM)
	if l := h.log.lines("upgrade failed, old master keeps serving"); len(l) != 2 || !strings.Contains(l[1]["reason"].(string), "not ready within 30s") {
		t.Errorf("failure lines = %v, want a timeout", l)
	}
	h.live(5*time.Second+DefaultKillGrace, h.procs[0])
	wantSignals(t, slow, syscall.SIGTERM, syscall.SIGKILL)
	wantSignals(t, h.procs[0])
}

func TestUpgradeFailsWhenTheBinaryDoesNotExecute(t *testing.T) {
	sock := t.TempDir() + "/ctl.sock"
	h := bootWith(t, Config{Workers: 1})
	ln, err := listenControl(sock)
	if err != nil {
		t.Fatal(err)
	}
	h.s.quit = make(chan struct{})
	defer close(h.s.quit)
	h.s.serveControlOn(ln)
	h.failAt = 2
	h.signal(syscall.SIGUSR2)
	l := h.log.lines("upgrade failed, old master keeps serving")
	if len(l) != 1 || !strings.Contains(l[0]["reason"].(string), "the new master did not start") || !strings.Contains(l[0]["reason"].(string), "exec format error") {
		t.Errorf("failure lines = %v, want one saying the binary did not start", l)
	}
	if n := len(h.log.lines("upgrade not started")); n != 0 {
		t.Errorf("%d refusal lines, want the failure logged once", n)
	}
	st := h.s.status()
	if st.State != "running" || st.Upgrade == nil || st.Upgrade.State != "failed" || !strings.Contains(st.Upgrade.Error, "exec format error") {
		t.Errorf("status = %s %+v, want running with the failed upgrade", st.State, st.Upgrade)
	}
	if h.s.ctl == nil {
		t.Errorf("control socket not served again after the failed upgrade")
	}
	wantSignals(t, h.procs[0])
}

func TestUpgradeIsRefusedInReloadModeAndWhileStopping(t *testing.T) {
	h, _, _ := reloadHarness(t)
	if err := h.s.startUpgrade(); err == nil || !strings.Contains(err.Error(), "reload mode") {
		t.Errorf("upgrade in reload mode = %v, want a refusal naming reload mode", err)
	}
	h = bootWith(t, Config{Workers: 1})
	h.signal(syscall.SIGUSR2)
	h.signal(syscall.SIGTERM) // stops the new master too
	wantSignals(t, h.procs[1], syscall.SIGTERM)
	if err := h.s.startUpgrade(); err == nil {
		t.Errorf("upgrade while stopping = nil, want a refusal")
	}
	h.exit(h.procs[0], "exit 0")
	if h.s.done() {
		t.Errorf("done before the new master was reaped")
	}
	h.exit(h.procs[1], "exit 0")
	if !h.s.done() {
		t.Errorf("not done after every child was reaped")
	}
}

func TestANewMasterServesTheHandedOverSocketsAndReportsReady(t *testing.T) {
	old := bootWith(t, Config{Workers: 2})
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The old master is the new one's parent: this test's.
	parent := os.Getppid()
	ho := &Handoff{
		ParentPID: parent, ParentVersion: "v1",
		info:   protocol.Upgrade{Parent: parent, Version: "v1", Workers: 2, Slots: 2},
		report: w,
		slots:  []*os.File{old.s.slots[0].sock, old.s.slots[1].sock},
	}
	h := newHarness(t, Config{Workers: 7, Version: "v2", Upgrade: ho})
	if got, want := h.s.Addr().String(), old.s.Addr().String(); got != want || len(h.s.slots) != 2 {
		t.Fatalf("new master serves %s with %d slots, want %s with 2", got, len(h.s.slots), want)
	}
	h.begin()
	if st := h.s.status(); st.State != "starting" || st.Upgrade == nil || st.Upgrade.State != "taking over" || st.Upgrade.OldPID != parent || st.Upgrade.OldVersion != "v1" {
		t.Errorf("new master's status before ready = %s %+v, want starting, taking over from %d v1", st.State, st.Upgrade, parent)
	}
	// `server upgrade` reaches the new master during an upgrade.
	if err := h.s.startUpgrade(); err == nil || !strings.Contains(err.Error(), "an upgrade is in progress") {
		t.Errorf("upgrade of a new master before ready = %v, want a refusal: in progress", err)
	}
	if got, want := listenerInodes(h.procs[0].cmd), socketInodes(old.s.slots[0].sock, old.s.slots[1].sock); !slices.Equal(got, want) {
		t.Errorf("new worker 1 serves %v, want the old slots 1 and 2 %v", got, want)
	}
	h.ready(h.procs[0])
	h.ready(h.procs[1])
	line, err := bufio.NewReader(r).ReadBytes('\n')
	if err != nil {
		t.Fatal(err)
	}
	m, err := protocol.Decode(line)
	if err != nil || m.Type != protocol.TypeReady || m.Version != "v2" || m.PID != os.Getpid() {
		t.Errorf("report = %+v %v, want ready from this pid with v2", m, err)
	}
	ho.Fail(errors.New("too late")) // after the report: nothing
	if st := h.s.status(); st.State != "running" || st.Upgrade == nil || st.Upgrade.State != "old master draining" || st.Upgrade.OldPID != parent {
		t.Errorf("new master's status once ready = %s %+v, want running, old master %d draining", st.State, st.Upgrade, parent)
	}
	// Once the old master has exited, this master's parent is another.
	ho.ParentPID = -1
	if st := h.s.status(); st.Upgrade != nil {
		t.Errorf("new master's status after the old one exited: upgrade %+v, want none", st.Upgrade)
	}
}

// A new master that fails leaves the --uds socket's path and the control
// socket's to the old master; once ready, they are its own to remove.
func TestANewMasterTakesThePathsOverOnlyOnceReady(t *testing.T) {
	dir := t.TempDir()
	path, ctlPath := dir+"/api.sock", dir+"/ctl.sock"
	for _, ready := range []bool{false, true} {
		uds, err := listenUDS(path, 16)
		if err != nil {
			t.Fatal(err)
		}
		ctl, err := listenControl(ctlPath)
		if err != nil {
			t.Fatal(err)
		}
		ctlFile, err := ctl.File()
		if err != nil {
			t.Fatal(err)
		}
		ctl.SetUnlinkOnClose(false)
		ctl.Close()
		_, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		ho := &Handoff{
			ParentPID: os.Getppid(), ParentVersion: "v1",
			info:   protocol.Upgrade{Parent: os.Getppid(), Version: "v1", Workers: 1, Shared: 1, UDS: path, Control: true},
			report: w, control: ctlFile, shared: []*os.File{uds},
		}
		h := newHarness(t, Config{Version: "v2", Upgrade: ho, ControlSocket: ctlPath})
		if h.s.ctl, err = h.s.listenControl(); err != nil {
			t.Fatal(err)
		}
		h.begin()
		if ready {
			h.ready(h.procs[0])
		}
		// What Run does when it returns.
		h.s.ctl.Close()
		h.s.closeSockets()
		for _, p := range []string{path, ctlPath} {
			_, err := os.Stat(p)
			if gone := errors.Is(err, os.ErrNotExist); gone != ready {
				t.Errorf("ready %v: %s gone = %v, want %v", ready, p, gone, ready)
			}
			os.Remove(p)
		}
	}
}
