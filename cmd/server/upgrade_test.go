package main

import (
	"errors"
	"fmt"
	"io"
	"os"
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
	if err := os.WriteFile(tmp, content, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// openLoop sends GET /health on a new connection every interval, whether
// or not the earlier ones were answered, until stop closes; it returns the
// count of requests and of failures with the first failures' errors.
func openLoop(s func() string, interval time.Duration, stop <-chan struct{}) func() (int64, int64, []string) {
	var ok, failed atomic.Int64
	var mu sync.Mutex
	var errs []string
	var wg sync.WaitGroup
	tick := time.NewTicker(interval)
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				resp, err := fresh.Get(s())
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					mu.Lock()
					if len(errs) < 5 {
						errs = append(errs, err.Error())
					}
					mu.Unlock()
					return
				}
				ok.Add(1)
			}()
		}
	}()
	return func() (int64, int64, []string) {
		wg.Wait()
		return ok.Load(), failed.Load(), errs
	}
}

// TestUpgrade installs a broken binary under a running server, then a new
// build, with load and chats in flight: workers keep running the master's
// binary, the broken upgrade fails without a dropped request, the good
// one hands over without one, and systemd hears of the new main process.
func TestUpgrade(t *testing.T) {
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
