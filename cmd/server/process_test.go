package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestWorkersShareThePort(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		mode    string
		sockets int
	}{{"reuseport", 3}, {"shared", 1}} {
		t.Run(tc.mode, func(t *testing.T) {
			s := startServer(t, "WORKERS=3", "SOCKET_MODE="+tc.mode)
			pids := s.workerPIDs()
			if len(pids) != 3 {
				t.Fatalf("worker processes = %v, want 3", pids)
			}
			if n := listeningSockets(t, s.port); n != tc.sockets {
				t.Errorf("listening sockets on port %d = %d, want %d", s.port, n, tc.sockets)
			}
			// Many new connections reach every worker.
			waitFor(t, 10*time.Second, func() error {
				seen, err := s.pidsServing(60)
				if err != nil {
					return err
				}
				for _, p := range pids {
					if seen[p] == 0 {
						return fmt.Errorf("worker %d answered none of 60 connections: %v", p, seen)
					}
				}
				return nil
			})
		})
	}
}

func TestProcessTitlesAndGroups(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2")
	master := s.cmd.Process.Pid
	args, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", master))
	title := strings.TrimRight(strings.ReplaceAll(string(args), "\x00", " "), " ")
	if !strings.Contains(title, ": master [2 workers, 127.0.0.1:"+strconv.Itoa(s.port)+"]") {
		t.Errorf("master title = %q, want it to name the role, 2 workers and the address", title)
	}
	if comm := readComm(master); !strings.HasSuffix(comm, "-master") {
		t.Errorf("master comm = %q, want ...-master", comm)
	}
	mst, _ := procStat(master)
	for _, pid := range s.workerPIDs() {
		args, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if !workerTitleRE.Match(bytes.TrimRight(args, "\x00")) {
			t.Errorf("worker title = %q, want \"...: worker N [gen 1]\"", args)
		}
		if comm := readComm(pid); !strings.HasSuffix(comm, "-worker") {
			t.Errorf("worker comm = %q, want ...-worker", comm)
		}
		// Own process group: a terminal's Ctrl+C reaches the master only.
		if st, _ := procStat(pid); st.pgid == mst.pgid {
			t.Errorf("worker %d is in the master's process group %d", pid, mst.pgid)
		}
	}
}

func readComm(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	return strings.TrimSpace(string(b))
}

func TestKilledWorkerIsReplaced(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2")
	before := s.workerPIDs()
	victim := before[0]
	syscall.Kill(victim, syscall.SIGKILL)
	waitFor(t, 10*time.Second, func() error {
		now := s.workerPIDs()
		if len(now) != 2 || sameSet(now, before) {
			return fmt.Errorf("workers %v, want 2 with %d replaced (before %v)", now, victim, before)
		}
		return nil
	})
	if got := s.logs.find("worker exited", map[string]any{"pid": victim, "reason": "crashed"}); len(got) != 1 {
		t.Errorf("log has %d 'worker exited' lines for pid %d with reason crashed, want 1", len(got), victim)
	}
	waitFor(t, 10*time.Second, func() error {
		seen, err := s.pidsServing(40)
		if err != nil {
			return err
		}
		if seen[victim] > 0 || len(seen) != 2 {
			return fmt.Errorf("pids serving %v, want 2 without %d", seen, victim)
		}
		return nil
	})
}

func TestStoppedWorkerIsReplacedAndStrandsNothing(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "TIMEOUT_WORKER_HEALTHCHECK=3s")
	before := s.workerPIDs()
	victim := before[0]
	syscall.Kill(victim, syscall.SIGSTOP)
	t.Cleanup(func() { syscall.Kill(victim, syscall.SIGKILL) })
	// kill returns before every thread has stopped; one still running
	// could answer a request.
	waitFor(t, 5*time.Second, func() error {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*", victim))
		for _, task := range tasks {
			tid, _ := strconv.Atoi(filepath.Base(task))
			if st, err := procStat(tid); err == nil && st.state != "T" {
				return fmt.Errorf("thread %d of worker %d in state %s", tid, victim, st.state)
			}
		}
		return nil
	})
	// While it is stopped and before it is replaced, new connections are
	// answered by the other worker, including those the kernel queues on the
	// stopped worker's socket.
	client := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := range 40 {
		h, err := s.health(client)
		if err != nil {
			t.Fatalf("request %d while worker %d is stopped: %v", i, victim, err)
		}
		if h.PID == victim {
			t.Fatalf("request %d answered by the stopped worker", i)
		}
	}
	waitFor(t, 10*time.Second, func() error {
		if alive(victim) {
			return fmt.Errorf("stopped worker %d still alive", victim)
		}
		if n := len(s.workerPIDs()); n != 2 {
			return fmt.Errorf("%d workers, want 2", n)
		}
		return nil
	})
	if len(s.logs.find("worker hung, sending SIGQUIT", map[string]any{"pid": victim, "reason": "hung"})) != 1 {
		t.Errorf("no 'worker hung' line for pid %d; log:\n%s", victim, s.logs)
	}
	// Its goroutine dump reaches the log as whole JSON events, one a line.
	dumped := false
	for _, l := range s.logs.find("worker output", map[string]any{"pid": victim}) {
		if line, _ := l["line"].(string); strings.HasPrefix(line, "goroutine ") {
			dumped = true
		}
	}
	if !dumped {
		t.Errorf("no goroutine dump of the hung worker %d logged as worker output", victim)
	}
}

// loadLoop runs requests from a few goroutines, half of them on kept-alive
// connections, until stop closes; it returns the count of requests and of
// failures with the first failures' errors.
func loadLoop(s *server, stop <-chan struct{}) func() (int64, int64, []string) {
	var ok, failed atomic.Int64
	var mu sync.Mutex
	var errs []string
	var wg sync.WaitGroup
	keep := &http.Client{Timeout: 10 * time.Second}
	for i := range 4 {
		c := fresh
		if i%2 == 0 {
			c = keep
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if _, err := s.health(c); err != nil {
					failed.Add(1)
					mu.Lock()
					if len(errs) < 5 {
						errs = append(errs, err.Error())
					}
					mu.Unlock()
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	return func() (int64, int64, []string) {
		wg.Wait()
		return ok.Load(), failed.Load(), errs
	}
}

func TestRollingRestartDropsNothing(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=3")
	before := s.workerPIDs()
	stop := make(chan struct{})
	results := loadLoop(s, stop)
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 20*time.Second, func() error {
		now := s.workerPIDs()
		if len(now) != 3 {
			return fmt.Errorf("workers %v, want 3", now)
		}
		for _, p := range now {
			for _, b := range before {
				if p == b {
					return fmt.Errorf("worker %d not replaced yet", p)
				}
			}
		}
		return nil
	})
	close(stop)
	ok, failed, errs := results()
	if failed != 0 || ok == 0 {
		t.Errorf("during SIGHUP: %d ok, %d failed %v; want 0 failed", ok, failed, errs)
	}
	for _, b := range before {
		if alive(b) {
			t.Errorf("old worker %d still alive", b)
		}
	}
	if got := len(s.logs.find("worker ready", map[string]any{"reason": "hup"})); got != 3 {
		t.Errorf("%d workers ready with reason hup, want 3", got)
	}
}

func TestScaleUpAndDown(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2")
	count := func(want int) func() error {
		return func() error {
			if n := len(s.workerPIDs()); n != want {
				return fmt.Errorf("%d workers, want %d; log:\n%s", n, want, s.logs)
			}
			if n := listeningSockets(t, s.port); n != want {
				return fmt.Errorf("%d listening sockets, want %d", n, want)
			}
			seen, err := s.pidsServing(30)
			if err != nil {
				return err
			}
			if len(seen) != want {
				return fmt.Errorf("%d pids serving, want %d", len(seen), want)
			}
			return nil
		}
	}
	s.cmd.Process.Signal(syscall.SIGTTIN)
	waitFor(t, 10*time.Second, count(3))
	// One signal at a time: the kernel merges a signal sent while the same
	// one is still pending.
	s.cmd.Process.Signal(syscall.SIGTTOU)
	waitFor(t, 10*time.Second, count(2))
	s.cmd.Process.Signal(syscall.SIGTTOU)
	waitFor(t, 10*time.Second, count(1))
	// Never below one.
	s.cmd.Process.Signal(syscall.SIGTTOU)
	waitFor(t, 5*time.Second, func() error {
		if len(s.logs.find("scale down refused: at least one worker", nil)) == 0 {
			return fmt.Errorf("no refusal logged")
		}
		return nil
	})
	waitFor(t, 5*time.Second, count(1))
}

func TestTermDrainsInFlightRequest(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2")
	type result struct {
		status int
		body   string
		err    error
	}
	res := make(chan result, 1)
	go func() {
		resp, err := fresh.Get(s.url("/test/slow?ms=1500"))
		if err != nil {
			res <- result{err: err}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		res <- result{status: resp.StatusCode, body: string(b)}
	}()
	// The request is in flight once a worker reports it.
	waitFor(t, 5*time.Second, func() error {
		for _, pid := range s.workerPIDs() {
			if st, _ := procStat(pid); st.state == "" {
				continue
			}
		}
		if inFlight(t, s) == 0 {
			return fmt.Errorf("slow request not in flight yet")
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGTERM)
	r := <-res
	if r.err != nil || r.status != 200 || !strings.HasPrefix(r.body, "slow done") {
		t.Errorf("in-flight request during SIGTERM = %d %q %v, want 200 slow done", r.status, r.body, r.err)
	}
	if code := s.wait(15 * time.Second); code != 0 {
		t.Errorf("exit status = %d, want 0; log:\n%s", code, s.logs)
	}
	for _, p := range childrenOf(s.cmd.Process.Pid) {
		t.Errorf("child %d left after exit", p)
	}
}

// inFlight is the in-flight count the workers last reported in heartbeats,
// read from their health answers... the supervisor logs it on drain; here
// the simplest observable is the worker's own connection: a TCP connection
// established to the port with a request pending.
func inFlight(t *testing.T, s *server) int {
	t.Helper()
	n := 0
	for _, f := range []string{"/proc/net/tcp"} {
		b, _ := os.ReadFile(f)
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 4 || fs[3] != "01" {
				continue
			}
			if i := strings.LastIndexByte(fs[1], ':'); i >= 0 {
				if p, _ := strconv.ParseInt(fs[1][i+1:], 16, 32); int(p) == s.port {
					n++
				}
			}
		}
	}
	return n
}

func TestSecondTermForces(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "TIMEOUT_GRACEFUL_SHUTDOWN=60s")
	go fresh.Get(s.url("/test/slow?ms=30000"))
	waitFor(t, 5*time.Second, func() error {
		if inFlight(t, s) == 0 {
			return fmt.Errorf("slow request not in flight yet")
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, func() error {
		if len(s.logs.find("Shutting down", nil)) == 0 {
			return fmt.Errorf("no shutdown logged")
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGTERM)
	if code := s.wait(5 * time.Second); code != 0 {
		t.Errorf("exit status = %d, want 0", code)
	}
	if len(s.logs.find("worker killed", map[string]any{"reason": "forced"})) != 1 {
		t.Errorf("no forced kill logged; log:\n%s", s.logs)
	}
}

func TestQuitIsImmediate(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "TIMEOUT_GRACEFUL_SHUTDOWN=60s")
	go fresh.Get(s.url("/test/slow?ms=30000"))
	workers := s.workerPIDs()
	s.cmd.Process.Signal(syscall.SIGQUIT)
	if code := s.wait(5 * time.Second); code != 0 {
		t.Errorf("exit status = %d, want 0", code)
	}
	for _, p := range workers {
		if alive(p) {
			t.Errorf("worker %d alive after SIGQUIT of the master", p)
		}
	}
}

// TestMasterKilledTakesWorkersDown: a master killed with SIGKILL takes its
// workers down within the orphan's budget (1 s), also when they hold chats
// that a graceful drain would wait for, and also when the parent-death
// SIGTERM reached them first, while the master still looked alive (the
// kernel sends it when the thread that started them exits, which can be
// before the rest of the master): here the test sends that SIGTERM itself.
func TestMasterKilledTakesWorkersDown(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=3", "SIMULATED_LATENCY=60s")
	workers := s.workerPIDs()
	for range 6 {
		go s.chat(&http.Client{Timeout: 70 * time.Second}, "held", false)
	}
	var early int // a worker holding a chat
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.started")
		if err == nil && len(p.Activities) < 6 {
			err = fmt.Errorf("%d chats started, want 6", len(p.Activities))
		}
		if err == nil {
			early = p.Activities[0].PID
		}
		return err
	})
	if err := syscall.Kill(early, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, func() error {
		if len(s.logs.find("drain started", map[string]any{"pid": float64(early), "budget_ms": float64(10000)})) == 0 {
			return fmt.Errorf("worker %d has not started its graceful drain", early)
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGKILL)
	// Not s.done: it waits for the master's stderr, which the workers
	// hold open until they exit.
	waitFor(t, 4*time.Second, func() error {
		// The workers' log still reaches the test: they write it to the
		// stderr the master handed them.
		if len(s.logs.find("drain finished", map[string]any{"pid": float64(early)})) == 0 {
			return fmt.Errorf("worker %d, draining for 10 s when the master died, still drains", early)
		}
		for _, p := range workers {
			if alive(p) {
				return fmt.Errorf("worker %d alive after the master was killed", p)
			}
		}
		return nil
	})
}

func TestPanicIsAnswered500AndWorkerSurvives(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	pid := s.workerPIDs()[0]
	resp, err := fresh.Get(s.url("/test/panic"))
	if err != nil {
		t.Fatal(err)
	}
	var body struct {
		Error struct{ Code, Message string } `json:"error"`
	}
	json.NewDecoder(resp.Body).Decode(&body)
	resp.Body.Close()
	if resp.StatusCode != 500 || body.Error.Code != "internal" {
		t.Errorf("panic answered %d %+v, want 500 with code internal", resp.StatusCode, body)
	}
	h, err := s.health(fresh)
	if err != nil || h.PID != pid {
		t.Errorf("after a panic: health = %+v, %v; want the same worker %d", h, err, pid)
	}
	if len(s.logs.find("handler panicked", map[string]any{"panic": "test panic"})) != 1 {
		t.Errorf("panic not logged once; log:\n%s", s.logs)
	}
}

func TestMaxRequestsRecyclesWithoutFailures(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "LIMIT_MAX_REQUESTS=30")
	first := s.workerPIDs()[0]
	seen := map[int]bool{}
	waitFor(t, 20*time.Second, func() error {
		h, err := s.health(fresh)
		if err != nil {
			t.Fatalf("request failed during recycling: %v", err)
		}
		seen[h.PID] = true
		if h.PID == first {
			return fmt.Errorf("still served by the first worker")
		}
		return nil
	})
	if len(s.logs.find("recycling worker", map[string]any{"reason": "max_requests", "pid": first})) != 1 {
		t.Errorf("no recycle logged for %d", first)
	}
}

// TestLimitConcurrency: over the limit a request is answered 503 with
// Retry-After, but /health still answers 200: a busy worker is not an
// unhealthy one.
func TestLimitConcurrency(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "LIMIT_CONCURRENCY=1")
	// A slow request takes the one slot. If it ended, or lost the slot to a
	// poll that came first (and got 503 itself), another one takes it.
	slow := make(chan struct{}, 1)
	hold := func() {
		go func() {
			if resp, err := fresh.Get(s.url("/test/slow?ms=3000")); err == nil {
				resp.Body.Close()
			}
			slow <- struct{}{}
		}()
	}
	hold()
	waitFor(t, 10*time.Second, func() error {
		select {
		case <-slow:
			hold()
		default:
		}
		resp, err := fresh.Get(s.url("/api/agents"))
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 503 {
			return fmt.Errorf("GET /api/agents with one slow request in flight = %d, want 503", resp.StatusCode)
		}
		if resp.Header.Get("Retry-After") == "" {
			t.Errorf("503 without Retry-After")
		}
		return nil
	})
	if h, err := s.health(fresh); err != nil || h.Status != "ok" {
		t.Errorf("GET /health over the concurrency limit = %+v %v, want 200 ok", h, err)
	}
}

func TestBusyPort(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	s := launch(t, "PORT="+port, "WORKERS=2")
	if code, want := s.wait(10*time.Second), documentedExit(t, "address is in use"); code != want {
		t.Errorf("exit status with a busy port = %d, want %d", code, want)
	}
	if got, want := s.startFailure(t), "address 127.0.0.1:"+port+" already in use"; got != want {
		t.Errorf("start-up error = %q, want %q", got, want)
	}
	// A second copy of the server on the first one's port is refused the same way.
	first := startServer(t, "WORKERS=1")
	second := launch(t, "PORT="+strconv.Itoa(first.port), "WORKERS=1")
	if code, want := second.wait(10*time.Second), documentedExit(t, "address is in use"); code != want {
		t.Errorf("second server on a used port: exit %d, want %d", code, want)
	}
	if n := len(childrenOf(second.cmd.Process.Pid)); n != 0 {
		t.Errorf("second server left %d children", n)
	}
}

func TestBootFailureExits3(t *testing.T) {
	t.Parallel()
	s := launch(t, "WORKERS=2", envFailBoot+"=1")
	if code, want := s.wait(20*time.Second), documentedExit(t, "a worker of the first generation"); code != want {
		t.Errorf("exit status = %d, want %d; log:\n%s", code, want, s.logs)
	}
	if !strings.Contains(s.logs.String(), "test worker refuses to boot") {
		t.Errorf("the worker's error is not on stderr:\n%s", s.logs)
	}
	if n := len(s.logs.find("worker failed to boot, stopping", map[string]any{"status": "exit 3"})); n != 1 {
		t.Errorf("the master says %d times which worker failed, want once:\n%s", n, s.logs)
	}
}

func TestBadConfigurationExits2(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ env, want string }{
		{"WORKERS=abc", `invalid WORKERS "abc"`},
		{"PORT=99999", `invalid PORT "99999"`},
		{"SOCKET_MODE=mesh", `invalid SOCKET_MODE "mesh"`},
	} {
		s := launch(t, tc.env)
		if code, want := s.wait(10*time.Second), documentedExit(t, "a bad flag"); code != want {
			t.Errorf("%s: exit %d, want %d", tc.env, code, want)
		}
		if !strings.Contains(s.logs.String(), "server: "+tc.want) {
			t.Errorf("%s: stderr lacks %q:\n%s", tc.env, tc.want, s.logs)
		}
	}
}

// TestStoppedMasterKeepsItsWorkers: a master stopped for longer than the
// healthcheck timeout (SIGSTOP, a debugger) finds, once it runs again,
// heartbeats it could not read; it must not take every healthy worker for
// hung, and a chat in flight meanwhile completes.
func TestStoppedMasterKeepsItsWorkers(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServer(t, "WORKERS=2", "TIMEOUT_WORKER_HEALTHCHECK=1s", "SIMULATED_LATENCY=4s", "CONTROL_SOCKET="+sock)
	pids := s.workerPIDs()
	reply := make(chan chatReply, 1)
	go func() { reply <- s.chat(&http.Client{Timeout: 30 * time.Second}, "across the stop", false) }()
	master := s.cmd.Process.Pid
	syscall.Kill(master, syscall.SIGSTOP)
	t.Cleanup(func() { syscall.Kill(master, syscall.SIGCONT) })
	// The fault itself: the master stays stopped for longer than the
	// timeout, but not by much (the case a deadline-lateness check misses).
	time.Sleep(1500 * time.Millisecond)
	syscall.Kill(master, syscall.SIGCONT)
	// A control request is answered by the loop after it acted on the stop.
	if code, out, errOut := cli(t, "status", "--control-socket", sock); code != 0 {
		t.Fatalf("server status: exit %d %s %s", code, out, errOut)
	}
	if len(s.logs.find("the master did not run for a while (stopped or starved); that time does not count as the workers' silence", nil)) == 0 {
		t.Error("the master did not log its own stop")
	}
	if hung := s.logs.find("worker hung, sending SIGQUIT", nil); len(hung) > 0 {
		t.Errorf("after the master's stop: %v", hung)
	}
	if now := s.workerPIDs(); !sameSet(now, pids) {
		t.Errorf("workers %v after the master's stop, want %v", now, pids)
	}
	if r := <-reply; r.status != 200 {
		t.Errorf("chat in flight across the master's stop = %d %s %v", r.status, r.body, r.err)
	}
}

// TestShutdownRefusesNewConnections: once a stopping server's workers have
// stopped accepting, a new connection is refused at once, while a chat in
// flight still completes.
func TestShutdownRefusesNewConnections(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "SIMULATED_LATENCY=8s")
	reply := make(chan chatReply, 1)
	go func() { reply <- s.chat(&http.Client{Timeout: 30 * time.Second}, "in flight at shutdown", false) }()
	waitFor(t, 5*time.Second, func() error {
		if n := inFlight(t, s); n == 0 {
			return errors.New("chat not in flight yet")
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGTERM)
	addr := fmt.Sprintf("127.0.0.1:%d", s.port)
	// Until the chat is over (8 s) the master runs; new connections must be
	// refused well before that, not accepted by the kernel and left unserved.
	waitFor(t, 4*time.Second, func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				return nil
			}
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(500 * time.Millisecond))
		io.WriteString(c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
		b := make([]byte, 64)
		n, err := c.Read(b)
		return fmt.Errorf("connection accepted during shutdown: read %q, %v", b[:n], err)
	})
	if r := <-reply; r.status != 200 {
		t.Errorf("chat in flight at shutdown = %d %s %v", r.status, r.body, r.err)
	}
	if code := s.wait(20 * time.Second); code != 0 {
		t.Errorf("exit %d after SIGTERM, want 0", code)
	}
}

// TestExpectContinueTooLarge: a body announced over the limit with
// "Expect: 100-continue" (curl sends it for bodies over 1 KiB) is refused
// before the upload, with the same JSON error as without Expect.
func TestExpectContinueTooLarge(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1", "LIMIT_REQUEST_BODY=4096")
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{ExpectContinueTimeout: 5 * time.Second}}
	req, _ := http.NewRequest("POST", s.url("/api/chat"), strings.NewReader(strings.Repeat("x", 8192)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Expect", "100-continue")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 413 || resp.Header.Get("Content-Type") != "application/json" || !strings.Contains(string(body), `"code":"body_too_large"`) {
		t.Errorf("oversized body with Expect: %d %q %s, want 413 with the JSON error", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
}
