package main

import (
	"bufio"
	"bytes"
	"encoding/json"
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
	"syscall"
	"testing"
	"time"
)

// waitFor polls cond until it returns nil or d has passed, then fails the
// test with cond's last error.
func waitFor(t *testing.T, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", d, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// server is a running server process: the test binary as the server.
type server struct {
	t    *testing.T
	cmd  *exec.Cmd
	port int
	logs *logBuffer
	done chan struct{} // closed when the process has exited
	err  error         // Wait's result, once done is closed
}

// logBuffer collects the server's JSON log lines.
type logBuffer struct {
	mu    sync.Mutex
	lines []map[string]any
	raw   bytes.Buffer
}

func (b *logBuffer) add(line []byte) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.raw.Write(line)
	b.raw.WriteByte('\n')
	var m map[string]any
	if json.Unmarshal(line, &m) == nil {
		b.lines = append(b.lines, m)
	}
}

// find returns the log lines whose message is msg and whose fields match.
func (b *logBuffer) find(msg string, fields map[string]any) []map[string]any {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, l := range b.lines {
		if l["message"] != msg {
			continue
		}
		ok := true
		for k, v := range fields {
			if fmt.Sprint(l[k]) != fmt.Sprint(v) {
				ok = false
			}
		}
		if ok {
			out = append(out, l)
		}
	}
	return out
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.raw.String()
}

// startServer runs the server with env (KEY=VALUE) added to a test default
// of one loopback port picked by the kernel, JSON logs and short timeouts,
// and waits until every worker is ready.
func startServer(t *testing.T, env ...string) *server {
	t.Helper()
	return startServerArgs(t, nil, env...)
}

// startServerArgs is startServer with command-line arguments.
func startServerArgs(t *testing.T, args []string, env ...string) *server {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return startExe(t, exe, args, env...)
}

// startExe is startServerArgs with the binary exe, a copy of the test
// binary or a script that executes it.
func startExe(t *testing.T, exe string, args []string, env ...string) *server {
	t.Helper()
	s := launchExe(t, exe, args, env...)
	s.waitStarted(t)
	run := s.logs.find("Corral running, press CTRL+C to quit", nil)
	u, _ := run[0]["url"].(string)
	_, port, _ := net.SplitHostPort(u[strings.Index(u, "://")+3:])
	s.port, _ = strconv.Atoi(port)
	if s.port == 0 {
		t.Fatalf("no port in %v", run[0])
	}
	return s
}

// waitStarted waits until the server logs that every worker is ready.
func (s *server) waitStarted(t *testing.T) {
	t.Helper()
	waitFor(t, 20*time.Second, func() error {
		select {
		case <-s.done:
			return fmt.Errorf("server exited early (%v); log:\n%s", s.err, s.logs)
		default:
		}
		if len(s.logs.find("Application startup complete", nil)) == 0 {
			return fmt.Errorf("no startup complete in log:\n%s", s.logs)
		}
		return nil
	})
}

// launch starts the server process without waiting for it.
func launch(t *testing.T, env ...string) *server {
	t.Helper()
	return launchArgs(t, nil, env...)
}

// launchArgs is launch with command-line arguments.
func launchArgs(t *testing.T, args []string, env ...string) *server {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	return launchExe(t, exe, args, env...)
}

// writeExecutable writes a program to path, mode 0755. It holds
// syscall.ForkLock while the file is open for writing: a process that
// parallel tests fork meanwhile would inherit the descriptor, and exec of
// the file fails with "text file busy" until that process execs.
func writeExecutable(t *testing.T, path string, content []byte) {
	t.Helper()
	syscall.ForkLock.Lock()
	defer syscall.ForkLock.Unlock()
	if err := os.WriteFile(path, content, 0o755); err != nil {
		t.Fatal(err)
	}
}

// launchExe starts the server from the binary exe, a copy of the test
// binary.
func launchExe(t *testing.T, exe string, args []string, env ...string) *server {
	t.Helper()
	cmd := exec.Command(exe, args...)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(),
		envAsServer+"=1", "HOST=127.0.0.1", "PORT=0", "LOG_FORMAT=json", "LOG_LEVEL=debug",
		"ACCESS_LOG=false", "TIMEOUT_WORKER_HEALTHCHECK=5s", "TIMEOUT_GRACEFUL_SHUTDOWN=10s",
		"DATABASE_URL=sqlite:"+filepath.Join(t.TempDir(), "server.db"))
	cmd.Env = append(cmd.Env, env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = io.Discard
	s := &server{t: t, cmd: cmd, logs: &logBuffer{}, done: make(chan struct{})}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			s.logs.add(sc.Bytes())
		}
		s.err = cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() { s.stop() })
	return s
}

// stop ends the server: SIGTERM, a bounded wait, SIGKILL to the whole
// family, wait. Safe to call more than once.
func (s *server) stop() {
	select {
	case <-s.done:
		return
	default:
	}
	pids := s.workerPIDs()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(15 * time.Second):
		s.t.Errorf("server did not stop within 15s after SIGTERM; log:\n%s", s.logs)
		s.cmd.Process.Kill()
		for _, p := range pids {
			syscall.Kill(p, syscall.SIGKILL)
		}
		<-s.done
	}
}

// wait waits for the process to exit by itself and returns its exit code.
func (s *server) wait(d time.Duration) int {
	s.t.Helper()
	select {
	case <-s.done:
	case <-time.After(d):
		s.t.Fatalf("server still running after %s; log:\n%s", d, s.logs)
	}
	return s.cmd.ProcessState.ExitCode()
}

func (s *server) url(path string) string {
	return "http://127.0.0.1:" + strconv.Itoa(s.port) + path
}

// fresh is a client that opens a new connection for every request, so the
// kernel picks a worker each time.
var fresh = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

type health struct {
	Status     string  `json:"status"`
	PID        int     `json:"pid"`
	Worker     int     `json:"worker"`
	Generation int     `json:"generation"`
	Uptime     float64 `json:"uptime_s"`
	Store      string  `json:"store"`
}

// health asks /health on a new connection.
func (s *server) health(c *http.Client) (health, error) {
	var h health
	resp, err := c.Get(s.url("/health"))
	if err != nil {
		return h, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return h, fmt.Errorf("GET /health = %d", resp.StatusCode)
	}
	return h, json.NewDecoder(resp.Body).Decode(&h)
}

// workerPIDs lists the live children of the master, from /proc.
func (s *server) workerPIDs() []int {
	return childrenOf(s.cmd.Process.Pid)
}

func childrenOf(ppid int) []int {
	var pids []int
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procStat(pid)
		if err == nil && st.ppid == ppid && st.state != "Z" {
			pids = append(pids, pid)
		}
	}
	return pids
}

type stat struct {
	state string
	ppid  int
	pgid  int
}

// procStat reads state, ppid and pgid of pid.
func procStat(pid int) (stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return stat{}, err
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	ppid, _ := strconv.Atoi(f[1])
	pgid, _ := strconv.Atoi(f[2])
	return stat{state: f[0], ppid: ppid, pgid: pgid}, nil
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	st, err := procStat(pid)
	return err == nil && st.state != "Z"
}

// pidsServing asks /health n times on new connections and returns the pids
// that answered, with counts.
func (s *server) pidsServing(n int) (map[int]int, error) {
	seen := map[int]int{}
	for range n {
		h, err := s.health(fresh)
		if err != nil {
			return seen, err
		}
		seen[h.PID]++
	}
	return seen, nil
}

// listeningSockets counts the TCP sockets in LISTEN state on port.
func listeningSockets(t *testing.T, port int) int {
	t.Helper()
	n := 0
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 4 || fs[3] != "0A" {
				continue
			}
			if i := strings.LastIndexByte(fs[1], ':'); i >= 0 {
				if p, _ := strconv.ParseInt(fs[1][i+1:], 16, 32); int(p) == port {
					n++
				}
			}
		}
	}
	return n
}

func sameSet(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	m := map[int]bool{}
	for _, x := range a {
		m[x] = true
	}
	for _, x := range b {
		if !m[x] {
			return false
		}
	}
	return true
}
