package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/corralhq/corral/supervisor"
)

// installFile puts content at path as `install` does: a new file renamed
// over the old one, which running processes keep.
func installFile(t *testing.T, path string, content []byte) {
	t.Helper()
	tmp := path + ".new"
	writeExecutable(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// tally counts the outcomes of GET requests sent from several goroutines,
// with the first failures' errors.
type tally struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	errs       []string
	wg         sync.WaitGroup
}

// get sends GET url with c and counts the outcome: a 200 or a failure.
func (t *tally) get(c *http.Client, url string) {
	resp, err := c.Get(url)
	if err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			err = fmt.Errorf("status %d", resp.StatusCode)
		}
	}
	if err != nil {
		t.failed.Add(1)
		t.mu.Lock()
		if len(t.errs) < 5 {
			t.errs = append(t.errs, err.Error())
		}
		t.mu.Unlock()
		return
	}
	t.ok.Add(1)
}

// result waits for the senders and returns the counts and errors.
func (t *tally) result() (int64, int64, []string) {
	t.wg.Wait()
	return t.ok.Load(), t.failed.Load(), t.errs
}

// openLoop sends GET /health on a new connection every interval, whether
// or not the earlier ones were answered, until stop closes; it returns the
// count of requests and of failures with the first failures' errors.
func openLoop(s func() string, interval time.Duration, stop <-chan struct{}) func() (int64, int64, []string) {
	t := &tally{}
	tick := time.NewTicker(interval)
	t.wg.Go(func() {
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			t.wg.Go(func() { t.get(fresh, s()) })
		}
	})
	return t.result
}

// TestUpgrade installs a broken binary under a running server, then a new
// build, with load and chats in flight: workers keep running the master's
// binary, the broken upgrade fails without a dropped request, the good
// one hands over without one, and systemd hears of the new main process.
func TestUpgrade(t *testing.T) {
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	build, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	exe := filepath.Join(dir, "server")
	installFile(t, exe, build)
	versionFile := filepath.Join(dir, "version")
	os.WriteFile(versionFile, []byte("v1"), 0o644)
	notify := newNotifySocket(t)
	ctl := filepath.Join(dir, "server.sock")
	s := launchExe(t, exe, nil, "WORKERS=2", "SIMULATED_LATENCY=4s", "TIMEOUT_GRACEFUL_SHUTDOWN=30s", "TIMEOUT_WORKER_HEALTHCHECK=10s",
		"CONTROL_SOCKET="+ctl, "NOTIFY_SOCKET="+notify.path, envVersionFile+"="+versionFile)
	s.waitStarted(t)
	u, _ := s.logs.find("Corral running, press CTRL+C to quit", nil)[0]["url"].(string)
	s.port, _ = strconv.Atoi(u[strings.LastIndex(u, ":")+1:])
	oldMaster := s.cmd.Process.Pid
	var newMaster int
	t.Cleanup(func() {
		if newMaster != 0 {
			syscall.Kill(newMaster, syscall.SIGTERM)
			waitFor(t, 20*time.Second, func() error {
				if alive(newMaster) {
					return fmt.Errorf("new master %d still running", newMaster)
				}
				return nil
			})
		}
	})

	// No version skew: with a broken binary installed, a killed worker's
	// replacement still runs the master's binary and becomes ready.
	installFile(t, exe, []byte("#!/bin/sh\necho 'server: this build is broken' >&2\nexit 1\n"))
	victim := s.workerPIDs()[0]
	syscall.Kill(victim, syscall.SIGKILL)
	waitFor(t, 20*time.Second, func() error {
		if len(s.logs.find("worker ready", map[string]any{"reason": "crash"})) == 0 {
			return fmt.Errorf("no replacement ready for the killed worker %d", victim)
		}
		return nil
	})

	stop := make(chan struct{})
	closed := loadLoop(s, stop)
	open := openLoop(func() string { return s.url("/health") }, 10*time.Millisecond, stop)

	// An upgrade to the broken binary fails; the old master serves on.
	s.cmd.Process.Signal(syscall.SIGUSR2)
	waitFor(t, 20*time.Second, func() error {
		if len(s.logs.find("upgrade failed, old master keeps serving", nil)) == 0 {
			return errors.New("no failed upgrade logged")
		}
		return nil
	})
	if l := s.logs.find("upgrade failed, old master keeps serving", nil); !strings.Contains(fmt.Sprint(l[0]["reason"]), "exit 1") {
		t.Errorf("failed upgrade reason = %v, want the new master's exit 1", l[0]["reason"])
	}
	st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
	if err != nil || st.Status.PID != oldMaster || st.Status.Upgrade == nil || st.Status.Upgrade.State != "failed" {
		t.Fatalf("status after the failed upgrade = %+v %v, want the old master %d showing the failure", st.Status, err, oldMaster)
	}

	// The new build, upgraded to with 10 chats of 4 s in flight.
	installFile(t, exe, build)
	os.WriteFile(versionFile, []byte("v2"), 0o644)
	chats := make(chan chatReply, 10)
	for i := range 10 {
		go func() { chats <- s.chat(fresh, fmt.Sprintf("chat %d", i), i%2 == 0) }()
	}
	waitFor(t, 10*time.Second, func() error {
		acts := s.allActivities(t)
		n := 0
		for _, a := range acts {
			if a.Type == "chat.started" {
				n++
			}
		}
		if n < 10 {
			return fmt.Errorf("%d chats started, want 10", n)
		}
		return nil
	})
	start := time.Now()
	up, err := callControl(ctl, supervisor.Request{Cmd: "upgrade"})
	took := time.Since(start)
	if err != nil || !up.OK || up.Upgrade == nil || up.Upgrade.NewVersion != "v2" {
		t.Fatalf("upgrade = %+v %v, want done with v2; log:\n%s", up, err, s.logs)
	}
	newMaster = up.Upgrade.NewPID
	st, err = callControl(ctl, supervisor.Request{Cmd: "status"})
	if err != nil || st.Status.PID != newMaster || st.Status.Version != "v2" || len(st.Status.Workers) != 2 || st.Status.Workers[0].Version != "v2" {
		t.Errorf("status after the upgrade = %+v %v, want the new master %d, v2, 2 workers of v2", st.Status, err, newMaster)
	}
	for range 10 {
		if r := <-chats; r.err != nil || r.status != 200 || r.event == "error" {
			t.Errorf("chat in flight during the upgrade: status %d, event %q, err %v, body %.200s", r.status, r.event, r.err, r.body)
		}
	}
	// The new master failed none of the chats the old workers were running.
	for _, a := range s.allActivities(t) {
		if a.Type == "chat.failed" {
			t.Errorf("chat %s failed across the upgrade: %v", a.ChatID, a.Data)
		}
	}
	waitFor(t, 30*time.Second, func() error {
		if alive(oldMaster) {
			return fmt.Errorf("old master %d still running after its chats ended", oldMaster)
		}
		return nil
	})
	close(stop)
	okC, failedC, errsC := closed()
	okO, failedO, errsO := open()
	if failedC+failedO != 0 || okC == 0 || okO == 0 {
		t.Errorf("during both upgrades: closed loop %d ok %d failed %v; open loop %d ok %d failed %v; want 0 failed", okC, failedC, errsC, okO, failedO, errsO)
	}
	ready := s.logs.find("new master ready, old workers draining", nil)
	if len(ready) != 1 || ready[0]["old_version"] != "v1" || ready[0]["new_version"] != "v2" {
		t.Errorf("new master ready lines = %v, want one from v1 to v2", ready)
	}
	for _, msg := range []string{"upgrade started", "old workers drained, old master exiting"} {
		if len(s.logs.find(msg, map[string]any{})) == 0 {
			t.Errorf("no %q line", msg)
		}
	}
	if got := notify.from(newMaster); !strings.Contains(got, "MAINPID="+strconv.Itoa(newMaster)+"\nREADY=1") {
		t.Errorf("the new master told systemd %q, want MAINPID=%d then READY=1", got, newMaster)
	}
	if got := notify.from(oldMaster); strings.Contains(got, "STOPPING=1") {
		t.Errorf("the old master told systemd %q: STOPPING=1 would stop the service", got)
	}
	t.Logf("upgrade with 10 chats in flight: answered after %s (new master ready %.0f ms after it started); %d + %d requests, none failed",
		took.Round(time.Millisecond), ready[0]["took_ms"], okC, okO)
}

// startedMaster returns the pid of the master the n-th upgrade started,
// from the "upgrade started" lines.
func startedMaster(t *testing.T, logs *logBuffer, n int) int {
	t.Helper()
	var pid int
	waitFor(t, 20*time.Second, func() error {
		l := logs.find("upgrade started", nil)
		if len(l) < n {
			return fmt.Errorf("%d upgrade started lines, want %d", len(l), n)
		}
		pid = int(l[n-1]["new_pid"].(float64))
		return nil
	})
	return pid
}

// stopMasterAtEnd stops, when t ends, a master started by an upgrade:
// the test did not start it, so no cleanup of launch's reaches it.
func stopMasterAtEnd(t *testing.T, pid *int) {
	t.Cleanup(func() {
		if *pid == 0 || !alive(*pid) {
			return
		}
		syscall.Kill(*pid, syscall.SIGTERM)
		waitFor(t, 20*time.Second, func() error {
			if alive(*pid) {
				return fmt.Errorf("master %d still running", *pid)
			}
			return nil
		})
	})
}

// wantTitle waits until pid's process title ends with suffix.
func wantTitle(t *testing.T, pid int, suffix string) {
	t.Helper()
	waitFor(t, 20*time.Second, func() error {
		if got := processTitle(pid); !strings.HasSuffix(got, suffix) {
			return fmt.Errorf("title of %d = %q, want it to end with %q", pid, got, suffix)
		}
		return nil
	})
}

// TestUpgradeProgress follows two upgrades as ps and `server status` show
// them. The first one's new workers are held back: meanwhile the old
// master's title is "[upgrading to PID]" and the new master, which holds
// the control socket from its start, answers status as taking over; once
// they start, the old master's title is "[draining]" while a chat of its
// finishes, and the new master's status says so, then nothing. The second
// upgrade's workers never start: it fails after TIMEOUT_UPGRADE (the one
// its old master read from the env file at its start), and the master
// that stays shows the reason in its status and its usual title, and still
// has its control socket: the failed master leaves the path alone.
func TestUpgradeProgress(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	versionFile, hold, envFile := filepath.Join(dir, "version"), filepath.Join(dir, "hold"), filepath.Join(dir, "env")
	ctl := filepath.Join(dir, "server.sock")
	os.WriteFile(versionFile, []byte("v1"), 0o644)
	os.WriteFile(envFile, []byte("TIMEOUT_UPGRADE=60s\n"), 0o644)
	notify := newNotifySocket(t)
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=8s", "TIMEOUT_WORKER_HEALTHCHECK=20s", "CONTROL_SOCKET="+ctl, "ENV_FILE="+envFile, "NOTIFY_SOCKET="+notify.path,
		envVersionFile+"="+versionFile, envHoldFile+"="+hold)
	old := s.cmd.Process.Pid
	usual := fmt.Sprintf(": master [2 workers, 127.0.0.1:%d]", s.port)
	var next int
	stopMasterAtEnd(t, &next)

	// The limit of an upgrade is the one its old master started with:
	// the next master will have 2 s.
	os.WriteFile(envFile, []byte("TIMEOUT_UPGRADE=2s\n"), 0o644)
	os.WriteFile(hold, nil, 0o644)
	os.WriteFile(versionFile, []byte("v2"), 0o644)
	s.cmd.Process.Signal(syscall.SIGUSR2)
	next = startedMaster(t, s.logs, 1)
	wantTitle(t, old, fmt.Sprintf(": master [upgrading to %d]", next))
	wantTitle(t, next, usual)
	st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
	if err != nil || st.Status.PID != next || st.Status.Version != "v2" || st.Status.State != "starting" ||
		st.Status.Upgrade == nil || st.Status.Upgrade.State != "taking over" || st.Status.Upgrade.OldPID != old || st.Status.Upgrade.OldVersion != "v1" {
		t.Fatalf("status during the upgrade = %+v %v, want the new master %d (v2) starting, taking over from %d (v1)", st.Status, err, next, old)
	}
	var out strings.Builder
	printStatus(&out, st.Status)
	if want := fmt.Sprintf("upgrade from master %d (v1): taking over\n", old); !strings.Contains(out.String(), want) {
		t.Errorf("server status during the upgrade printed\n%s\nwant a line %q", out.String(), want)
	}
	var cliOut, cliErr strings.Builder
	if code := runCLI("upgrade", []string{"--control-socket", ctl}, &cliOut, &cliErr); code != 1 || !strings.Contains(cliErr.String(), "an upgrade is in progress") {
		t.Errorf("server upgrade during the upgrade: exit %d, %q %q; want 1 and a refusal: in progress", code, &cliOut, &cliErr)
	}

	// A chat on an old worker keeps the old master draining for a while.
	chat := make(chan chatReply, 1)
	go func() { chat <- s.chat(fresh, "across the upgrade", false) }()
	waitFor(t, 20*time.Second, func() error {
		for _, a := range s.allActivities(t) {
			if a.Type == "chat.started" {
				return nil
			}
		}
		return errors.New("chat not started")
	})
	os.Remove(hold)
	wantTitle(t, old, ": master [draining]")
	// While its chat runs, the old master is draining for certain.
	chatRunning := len(chat) == 0
	st, err = callControl(ctl, supervisor.Request{Cmd: "status"})
	if chatRunning && (err != nil || st.Status.PID != next || st.Status.State != "running" || st.Status.Upgrade == nil ||
		st.Status.Upgrade.State != "old master draining" || st.Status.Upgrade.OldPID != old) {
		t.Errorf("status while the old master drains = %+v %v, want the new master %d running, old master %d draining", st.Status, err, next, old)
	}
	if r := <-chat; r.err != nil || r.status != 200 {
		t.Errorf("chat on the old master = %d %v %.200s, want 200", r.status, r.err, r.body)
	}
	waitFor(t, 30*time.Second, func() error {
		if alive(old) {
			return fmt.Errorf("old master %d still running after its chat ended", old)
		}
		return nil
	})
	// Its main thread may show as exited a moment before the thread that
	// started the new master (its parent) has.
	waitFor(t, 10*time.Second, func() error {
		st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
		if err != nil || st.Status.PID != next || st.Status.Upgrade != nil {
			return fmt.Errorf("status after the old master exited = %+v %v, want the new master %d and no upgrade", st.Status, err, next)
		}
		return nil
	})

	// The next upgrade, with a limit of 2 s, never gets its workers.
	os.WriteFile(hold, nil, 0o644)
	t.Cleanup(func() { os.Remove(hold) })
	syscall.Kill(next, syscall.SIGUSR2)
	third := startedMaster(t, s.logs, 2)
	waitFor(t, 30*time.Second, func() error {
		if len(s.logs.find("upgrade failed, old master keeps serving", nil)) == 0 {
			return fmt.Errorf("upgrade to %d not failed", third)
		}
		return nil
	})
	l := s.logs.find("upgrade failed, old master keeps serving", nil)
	if reason := fmt.Sprint(l[0]["reason"]); reason != "the new master was not ready within 2s" {
		t.Errorf("failed upgrade's reason = %q, want the 2s limit", reason)
	}
	// The failed master lets go of the control socket as soon as it is
	// told to stop: a status asked in that moment may still reach it.
	waitFor(t, 10*time.Second, func() error {
		st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
		if err != nil || st.Status.PID != next || st.Status.Upgrade == nil || st.Status.Upgrade.State != "failed" || st.Status.Upgrade.Error != "the new master was not ready within 2s" {
			return fmt.Errorf("status after the failed upgrade = %+v %v, want master %d showing the reason", st.Status, err, next)
		}
		out.Reset()
		printStatus(&out, st.Status)
		if want := "last upgrade failed: the new master was not ready within 2s\n"; !strings.Contains(out.String(), want) {
			t.Errorf("server status after the failed upgrade printed\n%s\nwant a line %q", out.String(), want)
		}
		return nil
	})
	wantTitle(t, next, usual)
	waitFor(t, 20*time.Second, func() error {
		if alive(third) {
			return fmt.Errorf("the failed new master %d still running", third)
		}
		return nil
	})
	// A new master speaks to systemd once ready, first to say it is the
	// main process; one that failed never does.
	if got := notify.from(next); !strings.HasPrefix(got, "MAINPID="+strconv.Itoa(next)+"\nREADY=1") {
		t.Errorf("the new master told systemd %q, want MAINPID=%d and READY=1 first", got, next)
	}
	if got := notify.from(third); got != "" {
		t.Errorf("the failed new master told systemd %q, want nothing (STOPPING=1 would stop the service)", got)
	}
}

// clientLoop GETs url with each client from its own goroutine until stop
// closes; it returns the count of requests and of failures with the first
// failures' errors.
func clientLoop(clients []*http.Client, url string, stop <-chan struct{}) func() (int64, int64, []string) {
	t := &tally{}
	for _, c := range clients {
		t.wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				t.get(c, url)
			}
		})
	}
	return t.result
}

// upgradeUnderLoad upgrades the server whose master is old, on the control
// socket ctl, to v2 (written to versionFile) while clients GET url, and
// checks the hand-over: no request failed, the new master and its workers
// run v2 and answer, the old master exits. It returns the new master's
// pid.
func upgradeUnderLoad(t *testing.T, old int, ctl, versionFile string, clients []*http.Client, url string) int {
	t.Helper()
	var next int
	stopMasterAtEnd(t, &next)
	stop := make(chan struct{})
	results := clientLoop(clients, url, stop)
	os.WriteFile(versionFile, []byte("v2"), 0o644)
	// As an operator would: `server upgrade`.
	var out, errOut strings.Builder
	code := runCLI("upgrade", []string{"--control-socket", ctl}, &out, &errOut)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if code != 0 || len(lines) != 2 ||
		!strings.HasPrefix(lines[0], "server upgrade: new master pid ") || !strings.HasSuffix(lines[0], " started; waiting up to 2m0s for its workers") ||
		!strings.HasPrefix(lines[1], "server upgrade: done: new master pid ") || !strings.Contains(lines[1], ", version v2;") {
		close(stop)
		results()
		t.Fatalf("server upgrade: exit %d, printed\n%s%s\nwant the new master's pid when started, then done with v2", code, &out, &errOut)
	}
	fmt.Sscanf(lines[1], "server upgrade: done: new master pid %d", &next)
	waitFor(t, 30*time.Second, func() error {
		if alive(old) {
			return fmt.Errorf("old master %d still running", old)
		}
		return nil
	})
	close(stop)
	ok, failed, errs := results()
	if failed != 0 || ok == 0 {
		t.Errorf("during the upgrade: %d requests ok, %d failed %v; want none failed", ok, failed, errs)
	}
	st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
	if err != nil || st.Status.PID != next || st.Status.Version != "v2" || len(st.Status.Workers) != 2 {
		t.Fatalf("status after the upgrade = %+v %v, want the new master %d, v2, 2 workers", st.Status, err, next)
	}
	workers := map[int]bool{}
	for _, w := range st.Status.Workers {
		workers[w.PID] = w.Version == "v2"
	}
	resp, err := clients[0].Get(url)
	if err != nil {
		t.Fatalf("GET after the upgrade: %v", err)
	}
	defer resp.Body.Close()
	var h health
	if err := json.NewDecoder(resp.Body).Decode(&h); err != nil || !workers[h.PID] {
		t.Errorf("after the upgrade /health answered from pid %d (%v), want one of the new master's v2 workers %v", h.PID, err, workers)
	}
	return next
}

// TestUpgradeSockets upgrades under load a server on PostgreSQL, one on a
// unix socket (--uds) and one on a socket from systemd's socket
// activation: each hands its sockets over without a failed request.
func TestUpgradeSockets(t *testing.T) {
	t.Parallel()
	keep := func(dial func(ctx context.Context, _, _ string) (net.Conn, error)) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: dial}}
	}
	t.Run("postgres", func(t *testing.T) {
		db := testPostgresDB(t)
		dir := t.TempDir()
		versionFile, ctl := filepath.Join(dir, "version"), filepath.Join(dir, "server.sock")
		os.WriteFile(versionFile, []byte("v1"), 0o644)
		s := startServer(t, "WORKERS=2", "DATABASE_URL="+db, "TIMEOUT_WORKER_HEALTHCHECK=10s", "CONTROL_SOCKET="+ctl, envVersionFile+"="+versionFile,
			"METRICS_ADDR=127.0.0.1:0")
		next := upgradeUnderLoad(t, s.cmd.Process.Pid, ctl, versionFile, []*http.Client{fresh, fresh, keep(nil), keep(nil)}, s.url("/health"))
		// The metrics listener was handed over too.
		code, body := get(t, s.metricsURL(t)+"status.json", "")
		var st supervisor.Status
		if err := json.Unmarshal([]byte(body), &st); code != 200 || err != nil || st.PID != next || st.Version != "v2" {
			t.Errorf("/status.json after the upgrade = %d %.300s (%v), want the new master %d, v2", code, body, err, next)
		}
	})
	t.Run("uds", func(t *testing.T) {
		dir := t.TempDir()
		versionFile, ctl, path := filepath.Join(dir, "version"), filepath.Join(dir, "server.sock"), filepath.Join(dir, "api.sock")
		os.WriteFile(versionFile, []byte("v1"), 0o644)
		s, client := startUDS(t, path, "WORKERS=2", "TIMEOUT_WORKER_HEALTHCHECK=10s", "CONTROL_SOCKET="+ctl, envVersionFile+"="+versionFile)
		dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		upgradeUnderLoad(t, s.cmd.Process.Pid, ctl, versionFile, []*http.Client{client, client, keep(dial), keep(dial)}, "http://corral/health")
		if fi, err := os.Stat(path); err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Errorf("socket file after the upgrade: %v %v, want the socket the new master serves", fi, err)
		}
	})
	t.Run("socket activation", func(t *testing.T) {
		activate, err := exec.LookPath("systemd-socket-activate")
		if err != nil {
			t.Skip("systemd-socket-activate not installed (Debian package systemd)")
		}
		dir := t.TempDir()
		versionFile, ctl := filepath.Join(dir, "version"), filepath.Join(dir, "server.sock")
		os.WriteFile(versionFile, []byte("v1"), 0o644)
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		exe, _ := os.Executable()
		args := []string{"-l", addr}
		for _, e := range []string{envAsServer + "=1", "WORKERS=2", "LOG_FORMAT=json", "TIMEOUT_WORKER_HEALTHCHECK=10s", "CONTROL_SOCKET=" + ctl,
			envVersionFile + "=" + versionFile, "DATABASE_URL=sqlite:" + filepath.Join(dir, "s.db")} {
			args = append(args, "-E", e)
		}
		cmd := exec.Command(activate, append(args, exe)...)
		// A file, not a pipe: the new master keeps writing to it after the
		// process started here has exited.
		logFile, err := os.Create(filepath.Join(dir, "server.log"))
		if err != nil {
			t.Fatal(err)
		}
		defer logFile.Close()
		cmd.Stderr = logFile
		t.Cleanup(func() {
			if t.Failed() {
				b, _ := os.ReadFile(logFile.Name())
				t.Logf("server log:\n%s", b)
			}
		})
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		defer func() {
			cmd.Process.Signal(syscall.SIGTERM)
			<-exited
		}()
		url := "http://" + addr + "/health"
		// The first connection makes systemd-socket-activate start the
		// server, in its own process.
		waitFor(t, 20*time.Second, func() error {
			resp, err := fresh.Get(url)
			if err != nil {
				return err
			}
			resp.Body.Close()
			st, err := callControl(ctl, supervisor.Request{Cmd: "status"})
			if err != nil || st.Status.State != "running" {
				return fmt.Errorf("status = %+v %v, want running", st.Status, err)
			}
			return nil
		})
		upgradeUnderLoad(t, cmd.Process.Pid, ctl, versionFile, []*http.Client{fresh, fresh, keep(nil), keep(nil)}, url)
		if err := <-exited; err != nil {
			t.Errorf("old master: %v, want exit status 0", err)
		}
		exited <- nil // for the deferred stop
	})
}
