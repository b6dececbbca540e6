package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// startUDS runs the server on the unix socket path and waits until every
// worker is ready; it returns the server and a client that dials path.
func startUDS(t *testing.T, path string, env ...string) (*server, *http.Client) {
	t.Helper()
	s := launch(t, append([]string{"UDS=" + path}, env...)...)
	s.waitStarted(t)
	return s, unixClient(path)
}

// unixClient is an HTTP client that dials the unix socket at path, a new
// connection for every request.
func unixClient(path string) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// TestUnixSocket: --uds serves every worker on one unix socket, with the
// access log taking the client from a proxy's X-Forwarded-For; a second
// server on the live socket is refused, a stale socket file is replaced,
// and the file is removed when the server stops.
func TestUnixSocket(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "api.sock")
	s, client := startUDS(t, path, "WORKERS=2", "ACCESS_LOG=true")
	if fi, err := os.Stat(path); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o666 {
		t.Fatalf("socket file %s: %v %v, want a socket with mode 0666", path, fi, err)
	}
	if run := s.logs.find("Corral running, press CTRL+C to quit", nil); len(run) != 1 || run[0]["url"] != "unix:"+path {
		t.Errorf("startup line %v, want url unix:%s", run, path)
	}
	// Both workers serve the one socket.
	seen := map[int]bool{}
	waitFor(t, 10*time.Second, func() error {
		req, _ := http.NewRequest("GET", "http://corral/health", nil)
		req.Header.Set("X-Forwarded-For", "203.0.113.7")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var h health
		if err := json.NewDecoder(resp.Body).Decode(&h); err != nil {
			return err
		}
		seen[h.PID] = true
		if len(seen) < 2 {
			return fmt.Errorf("answers from %v, want both workers", seen)
		}
		return nil
	})
	if lines := s.logs.find("request", map[string]any{"path": "/health"}); len(lines) == 0 || lines[0]["remote"] != "203.0.113.7" {
		t.Errorf("access log lines %v, want remote 203.0.113.7 from X-Forwarded-For", lines)
	}

	second := launch(t, "UDS="+path, "WORKERS=1", "CONTROL_SOCKET="+filepath.Join(t.TempDir(), "c.sock"))
	if code := second.wait(20 * time.Second); code != 1 {
		t.Errorf("second server on a live socket: exit %d, want 1", code)
	}
	if got, want := second.startFailure(t), "address "+path+" already in use"; got != want {
		t.Errorf("second server's error = %q, want %q", got, want)
	}

	// A master killed outright leaves the file; the next start replaces it.
	workers := s.workerPIDs()
	s.cmd.Process.Signal(syscall.SIGKILL)
	s.wait(10 * time.Second)
	waitFor(t, 10*time.Second, func() error {
		for _, p := range workers {
			if alive(p) {
				return fmt.Errorf("worker %d outlived its master", p)
			}
		}
		return nil
	})
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("after SIGKILL the socket file should remain: %v", err)
	}
	third, client := startUDS(t, path, "WORKERS=1")
	if h, err := healthVia(client); err != nil || h.Status != "ok" {
		t.Errorf("health on the replaced socket = %+v %v", h, err)
	}
	third.cmd.Process.Signal(syscall.SIGTERM)
	if code := third.wait(20 * time.Second); code != 0 {
		t.Errorf("exit %d after SIGTERM, want 0", code)
	}
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket file after a clean stop: %v, want it removed", err)
	}
}

// healthVia asks /health through client, whatever its transport.
func healthVia(client *http.Client) (health, error) {
	var h health
	resp, err := client.Get("http://corral/health")
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

// TestSocketActivationUnix: a unix socket passed by systemd is served like
// a TCP one (shared mode) and shown as unix:PATH.
func TestSocketActivationUnix(t *testing.T) {
	t.Parallel()
	activate, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skip("systemd-socket-activate not installed (Debian package systemd)")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "api.sock")
	exe, _ := os.Executable()
	args := []string{"-l", path}
	for _, e := range []string{envAsServer + "=1", "WORKERS=2", "LOG_FORMAT=json", "DATABASE_URL=sqlite:" + filepath.Join(dir, "s.db")} {
		args = append(args, "-E", e)
	}
	cmd := exec.Command(activate, append(args, exe)...)
	logs := &logBuffer{}
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs.add(sc.Bytes())
		}
	}()
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	client := unixClient(path)
	waitFor(t, 20*time.Second, func() error {
		_, err := healthVia(client)
		return err
	})
	if run := logs.find("Corral running, press CTRL+C to quit", nil); len(run) != 1 || run[0]["url"] != "unix:"+path || run[0]["socket_mode"] != "shared" {
		t.Errorf("startup line %v, want url unix:%s in shared mode", run, path)
	}
}
