package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/corralhq/corral/supervisor"
)

// notifySocket is a unixgram socket standing in for systemd's. Like
// systemd it takes the sender's pid from the kernel (SO_PASSCRED).
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []string
	pids []int // the sender of each message
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(t.TempDir(), "notify.sock")}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	if raw, err := c.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1) })
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			k, noob, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			pid := 0
			if cms, err := syscall.ParseSocketControlMessage(oob[:noob]); err == nil && len(cms) > 0 {
				if cred, err := syscall.ParseUnixCredentials(&cms[0]); err == nil {
					pid = int(cred.Pid)
				}
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.pids = append(n.pids, pid)
			n.mu.Unlock()
		}
	}()
	return n
}

// from returns the messages pid sent, one after the other.
func (n *notifySocket) from(pid int) string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var b strings.Builder
	for i, m := range n.msgs {
		if n.pids[i] == pid {
			b.WriteString(m + "\n")
		}
	}
	return b.String()
}

// count returns how many messages contain line as one of their lines.
func (n *notifySocket) count(line string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, m := range n.msgs {
		for _, l := range strings.Split(m, "\n") {
			if l == line || strings.HasSuffix(line, "=") && strings.HasPrefix(l, line) {
				c++
			}
		}
	}
	return c
}

func (n *notifySocket) String() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return strings.Join(n.msgs, " | ")
}

func (n *notifySocket) waitFor(t *testing.T, line string, want int) {
	t.Helper()
	waitFor(t, 15*time.Second, func() error {
		if got := n.count(line); got < want {
			return fmt.Errorf("%d %q notifications, want %d; got: %s", got, line, want, n)
		}
		return nil
	})
}

func TestSystemdNotify(t *testing.T) {
	t.Parallel()
	n := newNotifySocket(t)
	s := startServer(t, "WORKERS=2", "NOTIFY_SOCKET="+n.path, "WATCHDOG_USEC=400000")
	n.waitFor(t, "READY=1", 1)
	n.waitFor(t, "STATUS=2/2 workers ready, 0 requests in flight", 1)
	n.waitFor(t, "WATCHDOG=1", 2)
	// The workers never see systemd's variables.
	for _, pid := range s.workerPIDs() {
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		for _, v := range []string{"NOTIFY_SOCKET=", "WATCHDOG_USEC="} {
			if bytes.Contains(env, []byte(v)) {
				t.Errorf("worker %d has %s in its environment", pid, v)
			}
		}
	}
	s.cmd.Process.Signal(syscall.SIGHUP)
	n.waitFor(t, "RELOADING=1", 1)
	n.waitFor(t, "MONOTONIC_USEC=", 1)
	n.waitFor(t, "READY=1", 2) // after the roll
	s.cmd.Process.Signal(syscall.SIGTERM)
	n.waitFor(t, "STOPPING=1", 1)
	if code := s.wait(15 * time.Second); code != 0 {
		t.Errorf("exit %d, want 0", code)
	}
}

func TestSocketActivation(t *testing.T) {
	t.Parallel()
	activate, err := exec.LookPath("systemd-socket-activate")
	if err != nil {
		t.Skip("systemd-socket-activate not installed (Debian package systemd)")
	}
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := free.Addr().(*net.TCPAddr).Port
	free.Close()
	exe, _ := os.Executable()
	dir := t.TempDir()
	args := []string{"-l", "127.0.0.1:" + strconv.Itoa(port)}
	for _, e := range []string{envAsServer + "=1", "WORKERS=2", "LOG_FORMAT=json", "PORT=1", "DATABASE_URL=sqlite:" + filepath.Join(dir, "s.db")} {
		args = append(args, "-E", e)
	}
	cmd := exec.Command(activate, append(args, exe)...)
	var logs bytes.Buffer
	var mu sync.Mutex
	cmd.Stderr = writerFunc(func(b []byte) (int, error) { mu.Lock(); defer mu.Unlock(); return logs.Write(b) })
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	s := &server{t: t, port: port}
	var h health
	waitFor(t, 20*time.Second, func() error {
		h, err = s.health(fresh)
		return err
	})
	mu.Lock()
	out := logs.String()
	mu.Unlock()
	if !strings.Contains(out, "using sockets from systemd") || !strings.Contains(out, `"socket_mode":"shared"`) {
		t.Errorf("server did not use the activated socket in shared mode:\n%s", out)
	}
	// PORT=1 would have needed a bind (and failed as a busy or privileged
	// port); answering on the activated port proves nothing was bound.
	if h.PID == 0 {
		t.Errorf("health = %+v", h)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }

func TestDrainDelayFailsHealthFirst(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "DRAIN_DELAY=1500ms")
	s.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, func() error {
		resp, err := fresh.Get(s.url("/health"))
		if err != nil {
			return err
		}
		var h health
		json.NewDecoder(resp.Body).Decode(&h)
		resp.Body.Close()
		if resp.StatusCode != 503 || h.Status != "draining" {
			return fmt.Errorf("GET /health during the drain delay = %d %q, want 503 draining", resp.StatusCode, h.Status)
		}
		return nil
	})
	if code := s.wait(15 * time.Second); code != 0 {
		t.Errorf("exit %d, want 0", code)
	}
}

// cli runs the server binary's subcommand and returns its exit status and
// output.
func cli(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	exe, _ := os.Executable()
	cmd := exec.Command(exe, args...)
	cmd.Env = append(os.Environ(), envAsServer+"=1")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if err != nil {
		code = cmd.ProcessState.ExitCode()
	}
	return code, stdout.String(), stderr.String()
}

func TestControlSocket(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServer(t, "WORKERS=2", "CONTROL_SOCKET="+sock, "SIMULATED_LATENCY=2s")
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket %s: %v, mode %v; want 0600", sock, err, fi.Mode().Perm())
	}
	status := func() supervisor.Status {
		t.Helper()
		code, out, errOut := cli(t, "status", "--json", "--control-socket", sock)
		var st supervisor.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("server status --json: exit %d, %q %q", code, out, errOut)
		}
		return st
	}
	st := status()
	if st.PID != s.cmd.Process.Pid || len(st.Workers) != 2 || st.State != "running" || st.Addr != "127.0.0.1:"+strconv.Itoa(s.port) {
		t.Errorf("status = %+v, want master %d, 2 workers, running, on port %d", st, s.cmd.Process.Pid, s.port)
	}
	for _, w := range st.Workers {
		if w.RSS == 0 || w.State != "ready" || w.HeartbeatS < 0 {
			t.Errorf("worker status %+v: want ready with RSS and a heartbeat", w)
		}
	}
	code, out, _ := cli(t, "status", "--control-socket", sock)
	if code != 0 || !strings.Contains(out, "SLOT") || !strings.Contains(out, strconv.Itoa(st.Workers[0].PID)) {
		t.Errorf("server status: exit %d\n%s", code, out)
	}

	if code, _, errOut := cli(t, "scale", "3", "--control-socket", sock); code != 0 {
		t.Fatalf("server scale 3: exit %d %s", code, errOut)
	}
	waitFor(t, 10*time.Second, func() error {
		if n := len(s.workerPIDs()); n != 3 {
			return fmt.Errorf("%d workers after scale 3", n)
		}
		return nil
	})
	before := s.workerPIDs()
	if code, _, errOut := cli(t, "reload", "--control-socket", sock); code != 0 {
		t.Fatalf("server reload: exit %d %s", code, errOut)
	}
	waitFor(t, 20*time.Second, func() error {
		now := s.workerPIDs()
		for _, p := range now {
			for _, b := range before {
				if p == b {
					return fmt.Errorf("worker %d not rolled", p)
				}
			}
		}
		if len(now) != 3 {
			return fmt.Errorf("%d workers during the roll", len(now))
		}
		return nil
	})
	for _, bad := range [][]string{{"scale", "0"}, {"scale"}, {"scale", "x"}, {"status", "extra"}, {"reload", "--json"}} {
		if code, _, errOut := cli(t, append(bad, "--control-socket", sock)...); code != 2 || errOut == "" {
			t.Errorf("server %v: exit %d %q, want 2 with a message", bad, code, errOut)
		}
	}
	// server stop returns once the master has exited, after the chat it
	// drains: the port is free for the next server.
	chat := make(chan int, 1)
	go func() { chat <- s.chat(&http.Client{Timeout: 30 * time.Second}, "drain me", false).status }()
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.started")
		if err == nil && len(p.Activities) == 0 {
			err = errors.New("no chat started yet")
		}
		return err
	})
	code, out, errOut := cli(t, "stop", "--control-socket", sock)
	if code != 0 || !strings.Contains(out, "exited") {
		t.Fatalf("server stop: exit %d %q %q, want 0 and the master's exit", code, out, errOut)
	}
	if running(s.cmd.Process.Pid) {
		t.Errorf("server stop returned while the master %d still ran", s.cmd.Process.Pid)
	}
	if c := <-chat; c != 200 {
		t.Errorf("chat in flight during server stop = %d, want 200", c)
	}
	if code, want := s.wait(15*time.Second), documentedExit(t, "`server stop`"); code != want {
		t.Errorf("exit after server stop = %d, want %d", code, want)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("control socket left behind after stop: %v", err)
	}
	code, _, errOut = cli(t, "status", "--control-socket", sock)
	if want := documentedExit(t, "control command that found no server"); code != want || !strings.Contains(errOut, "no server running") || !strings.Contains(errOut, sock) {
		t.Errorf("server status with no server: exit %d %q, want %d naming the socket", code, errOut, want)
	}
}

func TestControlSocketRefusesOtherUsers(t *testing.T) {
	t.Parallel()
	if os.Getuid() != 0 {
		t.Skip("needs root to run the client as another user")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv not installed")
	}
	dir := t.TempDir()
	os.Chmod(dir, 0o755)
	sock := filepath.Join(dir, "ctl.sock")
	startServer(t, "WORKERS=1", "CONTROL_SOCKET="+sock)
	exe, _ := os.Executable()
	cmd := exec.Command(setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", exe, "status", "--control-socket", sock)
	cmd.Env = append(os.Environ(), envAsServer+"=1")
	out, err := cmd.CombinedOutput()
	if !strings.Contains(string(out), "server status") {
		t.Skipf("the test binary cannot run as uid 65534: %v %s", err, out)
	}
	if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(string(out), "permission denied") {
		t.Errorf("server status as another user: %v %q, want exit 1 and permission denied", err, out)
	}
}

func TestMaxMemoryRecyclesWorker(t *testing.T) {
	s := startServer(t, "WORKERS=1", "LIMIT_MAX_MEMORY=400MiB")
	first := s.workerPIDs()[0]
	resp, err := fresh.Get(s.url("/test/alloc?mb=500"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	waitFor(t, 20*time.Second, func() error {
		h, err := s.health(fresh)
		if err != nil {
			return err
		}
		if h.PID == first || alive(first) {
			return fmt.Errorf("worker %d holding 500 MiB not recycled yet", first)
		}
		return nil
	})
	if len(s.logs.find("recycling worker", map[string]any{"reason": "max_memory", "pid": first})) == 0 {
		t.Errorf("no max_memory recycle logged")
	}
}
