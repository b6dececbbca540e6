package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The example's tests build it as a user would and run it as a real
// process tree: a master and its workers on a loopback port.

// TestHelloLinksNoAgentAPI checks that the process model alone reaches an
// application's binary: not the agent API, SQLite or PostgreSQL.
func TestHelloLinksNoAgentAPI(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "corral/handlers") || strings.Contains(dep, "sqlite") || strings.Contains(dep, "jackc/pgx") {
			t.Errorf("docs/examples/hello links %s", dep)
		}
	}
}

// TestHelloProcessModel runs WORKERS=3 ./hello and checks what the README
// promises: three workers answering with their pid, a SIGHUP roll without
// a failed request, a killed worker replaced, and SIGTERM exiting 0.
func TestHelloProcessModel(t *testing.T) {
	// Another file name than the App's Name: the titles take the Name.
	exe := filepath.Join(t.TempDir(), "hello-build")
	if out, err := exec.Command("go", "build", "-o", exe, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	h := start(t, exe, "", "WORKERS=3")

	pids := h.waitWorkers(t, 3, nil)
	for pid, want := range map[int][2]string{
		h.cmd.Process.Pid: {"hello: master [3 workers, 127.0.0.1:", "hello-master"},
		pids[0]:           {"hello: worker ", "hello-worker"},
	} {
		args, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if !strings.HasPrefix(string(args), want[0]) || strings.TrimSpace(string(comm)) != want[1] {
			t.Errorf("process %d: title %q, comm %q; want %q..., %q", pid, args, comm, want[0], want[1])
		}
	}
	body := h.get(t)
	if pid := pidIn(body); !slices.Contains(pids, pid) {
		t.Errorf("GET / = %q, want a line naming one of the workers %v", body, pids)
	}

	// SIGHUP: every worker is replaced while a client keeps asking.
	var ok, failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var once sync.Once
	halt := func() {
		once.Do(func() { close(stop) })
		wg.Wait()
	}
	defer halt() // also when the test fails below
	wg.Add(1)
	go func() {
		defer wg.Done()
		c := &http.Client{Timeout: 10 * time.Second}
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := c.Get(h.url)
			if err == nil {
				_, err = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d", resp.StatusCode)
				}
			}
			if err != nil {
				if failed.Add(1) <= 5 {
					t.Logf("request during the roll: %v", err)
				}
				continue
			}
			ok.Add(1)
		}
	}()
	h.signal(t, syscall.SIGHUP)
	rolled := h.waitWorkers(t, 3, pids)
	// Some load on the new workers too, then stop.
	after := ok.Load()
	waitFor(t, 30*time.Second, func() error {
		if n := ok.Load() - after; n < 20 {
			return fmt.Errorf("%d requests answered after the roll, want 20", n)
		}
		return nil
	})
	halt()
	if failed.Load() != 0 || ok.Load() == 0 {
		t.Errorf("SIGHUP roll: %d requests failed, %d succeeded; want 0 failed", failed.Load(), ok.Load())
	}

	// A killed worker is replaced.
	if err := syscall.Kill(rolled[0], syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	h.waitWorkers(t, 3, rolled[:1])
	h.get(t)

	// SIGTERM drains and exits 0.
	h.signal(t, syscall.SIGTERM)
	if code := h.wait(t, 30*time.Second); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0", code)
	}
}

// TestHelloHostsAndDrainDelay: --allowed-hosts and --drain-delay hold for
// an application of the library as for the server: a foreign Host gets
// 421, and during the drain delay GET /health answers 503 while the
// application still serves.
func TestHelloHostsAndDrainDelay(t *testing.T) {
	exe := filepath.Join(t.TempDir(), "hello")
	if out, err := exec.Command("go", "build", "-o", exe, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	h := start(t, exe, "", "WORKERS=1", "ALLOWED_HOSTS=app.example.com", "DRAIN_DELAY=5s")
	h.waitWorkers(t, 1, nil)
	status := func(path, host string) int {
		t.Helper()
		req, _ := http.NewRequest("GET", strings.TrimSuffix(h.url, "/")+path, nil)
		if host != "" {
			req.Host = host
		}
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
		if err != nil {
			t.Fatalf("GET %s (Host %q): %v", path, host, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}
	for host, want := range map[string]int{"app.example.com": 200, "app.example.com:8000": 200, "evil.example.net": 421, "": 200} {
		if got := status("/", host); got != want {
			t.Errorf("GET / with Host %q = %d, want %d", host, got, want)
		}
	}
	if got := status("/health", ""); got != 200 {
		t.Errorf("GET /health before the stop = %d, want the application's 200 (its / route)", got)
	}
	h.signal(t, syscall.SIGTERM)
	waitFor(t, 5*time.Second, func() error {
		if got := status("/health", ""); got != http.StatusServiceUnavailable {
			return fmt.Errorf("GET /health during the drain delay = %d, want 503", got)
		}
		return nil
	})
	if got := status("/", ""); got != 200 {
		t.Errorf("GET / during the drain delay = %d, want 200", got)
	}
	if code := h.wait(t, 30*time.Second); code != 0 {
		t.Errorf("exit status = %d, want 0", code)
	}
}

// TestHelloReload runs RELOAD=true ./hello in a module of its own, edits
// the source, and waits for the rebuilt program's answer.
func TestHelloReload(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the example twice")
	}
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	src, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	mod := "module hello\n\ngo 1.26.0\n\nrequire github.com/corralhq/corral v0.0.0\n\nreplace github.com/corralhq/corral => " + root + "\n"
	for name, b := range map[string][]byte{"main.go": src, "go.sum": sum, "go.mod": []byte(mod)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	exe := filepath.Join(t.TempDir(), "hello")
	build := exec.Command("go", "build", "-o", exe, "hello")
	build.Dir = dir
	// -mod=mod lists the module's requirements in go.mod once, before the
	// server watches it.
	build.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	h := start(t, exe, dir, "RELOAD=true", "RELOAD_DELAY=50ms")
	h.waitWorkers(t, 1, nil)
	if body := h.get(t); !strings.HasPrefix(body, "hello from pid") {
		t.Fatalf("GET / = %q, want hello from pid", body)
	}
	edited := strings.Replace(string(src), `"hello from pid %d\n"`, `"reloaded, pid %d\n"`, 1)
	if edited == string(src) {
		t.Fatal("main.go no longer holds the greeting this test edits")
	}
	if err := os.WriteFile(filepath.Join(dir, "main.go"), []byte(edited), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 120*time.Second, func() error {
		if body := h.get(t); !strings.HasPrefix(body, "reloaded, pid") {
			return fmt.Errorf("GET / = %q, want the rebuilt program's answer", body)
		}
		return nil
	})
	h.signal(t, syscall.SIGTERM)
	if code := h.wait(t, 30*time.Second); code != 0 {
		t.Errorf("exit status after SIGTERM = %d, want 0", code)
	}
}

// hello is one running ./hello.
type hello struct {
	cmd    *exec.Cmd
	url    string
	done   chan struct{}
	status int
}

// start runs exe on a free loopback port, in dir if not "", and waits
// until it says where it serves and that every worker is ready. Cleanup
// stops it.
func start(t *testing.T, exe, dir string, env ...string) *hello {
	t.Helper()
	cmd := exec.Command(exe)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), append([]string{"HOST=127.0.0.1", "PORT=0", "LOG_FORMAT=json"}, env...)...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &hello{cmd: cmd, done: make(chan struct{})}
	urls := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var url string
		for sc.Scan() {
			var line struct{ URL, Message string }
			if json.Unmarshal(sc.Bytes(), &line) == nil {
				switch {
				case line.URL != "" && strings.HasPrefix(line.Message, "Corral running"):
					url = line.URL
				case line.Message == "Application startup complete":
					// Every worker is ready: what a user waits for before
					// sending signals.
					urls <- url
				}
			}
			if testing.Verbose() {
				t.Log(sc.Text())
			}
		}
		cmd.Wait()
		h.status = cmd.ProcessState.ExitCode()
		close(h.done)
	}()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-h.done
		}
	})
	select {
	case u := <-urls:
		h.url = u + "/"
	case <-h.done:
		t.Fatalf("hello exited with status %d before serving", h.status)
	case <-time.After(60 * time.Second):
		t.Fatal("hello did not log that it serves, every worker ready, within 60s")
	}
	return h
}

func (h *hello) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := h.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// get returns the body of GET /, failing the test on any error.
func (h *hello) get(t *testing.T) string {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(h.url)
	if err != nil {
		t.Fatalf("GET %s: %v", h.url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: status %d, %v", h.url, resp.StatusCode, err)
	}
	return string(b)
}

// wait returns the exit status once the master exited, within d.
func (h *hello) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-h.done:
		return h.status
	case <-time.After(d):
		t.Fatalf("hello still running %s after the signal", d)
		return -1
	}
}

// waitWorkers waits until the master has exactly n children, none of them
// in gone, and returns their pids.
func (h *hello) waitWorkers(t *testing.T, n int, gone []int) []int {
	t.Helper()
	var pids []int
	waitFor(t, 60*time.Second, func() error {
		pids = children(h.cmd.Process.Pid)
		if len(pids) != n {
			return fmt.Errorf("master has workers %v, want %d", pids, n)
		}
		for _, p := range pids {
			if slices.Contains(gone, p) {
				return fmt.Errorf("worker %d is still there among %v", p, pids)
			}
		}
		return nil
	})
	return pids
}

// children lists the pids of pid's child processes, those of every thread
// (the supervisor starts workers from a thread of their own).
func children(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var out []int
	for _, task := range tasks {
		b, _ := os.ReadFile(task)
		for _, f := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(f); err == nil {
				out = append(out, n)
			}
		}
	}
	slices.Sort(out)
	return out
}

// pidIn reads the pid from "hello from pid N".
func pidIn(body string) int {
	f := strings.Fields(body)
	if len(f) == 0 {
		return 0
	}
	n, _ := strconv.Atoi(f[len(f)-1])
	return n
}

// waitFor polls check until it returns nil, failing the test with its last
// error after d.
func waitFor(t *testing.T, d time.Duration, check func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", d, err)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
}
