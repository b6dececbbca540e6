package store

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Helper processes talk line by line: they print "ready" once the store is
// open, then act on each line read from stdin, and print results as JSON.

// writerResult is what one writer process reports.
type writerResult struct {
	Chats   [][2]int64      `json:"chats"` // activity ids of each chat's start and finish
	Elapsed float64         `json:"elapsed_s"`
	Calls   []time.Duration `json:"calls"` // latency of each StartChat and FinishChat call
}

// runWriter is a worker under load: on "go" it runs CHATS chats, each
// StartChat then FinishChat(completed), on GOROUTINES goroutines.
func runWriter() int {
	url := os.Getenv("STORE_URL")
	slot, _ := strconv.Atoi(os.Getenv("WORKER"))
	chats, _ := strconv.Atoi(os.Getenv("CHATS"))
	goroutines, _ := strconv.Atoi(os.Getenv("GOROUTINES"))
	ctx := context.Background()
	s, err := Open(ctx, url, Options{Host: "test-host"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fmt.Fprintln(os.Stderr, "read go:", err)
		return 1
	}

	by := Origin{Worker: slot, PID: os.Getpid()}
	res := writerResult{Chats: make([][2]int64, chats), Calls: make([]time.Duration, 2*chats)}
	next := make(chan int)
	errs := make(chan error, goroutines)
	var wg sync.WaitGroup
	t0 := time.Now()
	for range goroutines {
		wg.Go(func() {
			for i := range next {
				c0 := time.Now()
				st, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: fmt.Sprintf("chat %d of worker %d", i, slot), Origin: by})
				if err != nil {
					errs <- err
					return
				}
				c1 := time.Now()
				fin, err := s.FinishChat(ctx, st.ChatID, ChatCompleted, map[string]any{"i": i})
				if err != nil {
					errs <- err
					return
				}
				res.Chats[i] = [2]int64{st.ID, fin.ID}
				res.Calls[2*i], res.Calls[2*i+1] = c1.Sub(c0), time.Since(c1)
			}
		})
	}
	failed := false
feed:
	for i := range chats {
		select {
		case next <- i:
		case err := <-errs:
			fmt.Fprintln(os.Stderr, err)
			failed = true
			break feed
		}
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		fmt.Fprintln(os.Stderr, err)
		failed = true
	}
	if failed {
		return 1
	}
	res.Elapsed = time.Since(t0).Seconds()
	if err := json.NewEncoder(os.Stdout).Encode(res); err != nil {
		return 1
	}
	return 0
}

// runWaker writes one activity per line read and prints the wall-clock time
// (Unix nanoseconds) right after each commit returned.
func runWaker() int {
	ctx := context.Background()
	s, err := Open(ctx, os.Getenv("STORE_URL"), Options{Host: "waker-host"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer s.Close()
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if _, err := s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "wake", Origin: Origin{Worker: 9, PID: os.Getpid()}}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Println(time.Now().UnixNano())
	}
	return 0
}

// helper is a running helper process.
type helper struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	lines chan string // stdout, line by line; closed at EOF
}

// startHelper starts the test binary as a helper process in mode with env,
// waits for its "ready" line, and makes sure it is gone when the test ends.
func startHelper(t *testing.T, mode string, env ...string) *helper {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("os.Executable() = %v", err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), append([]string{helperEnv + "=" + mode}, env...)...)
	cmd.Stderr = &tWriter{t: t, prefix: mode}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s helper: %v", mode, err)
	}
	h := &helper{cmd: cmd, stdin: stdin, lines: make(chan string, 64)}
	go func() {
		defer close(h.lines)
		sc := bufio.NewScanner(stdout)
		sc.Buffer(nil, 16<<20)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		// Normally the helper has exited; this bounds a stuck one.
		stdin.Close()
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	})
	if line := h.line(t, 30*time.Second); line != "ready" {
		t.Fatalf("%s helper said %q, want ready", mode, line)
	}
	return h
}

// line returns the helper's next stdout line, failing after d.
func (h *helper) line(t *testing.T, d time.Duration) string {
	t.Helper()
	select {
	case l, ok := <-h.lines:
		if !ok {
			t.Fatalf("helper pid %d closed stdout (exited?) before the expected line", h.cmd.Process.Pid)
		}
		return l
	case <-time.After(d):
		t.Fatalf("helper pid %d printed nothing for %v", h.cmd.Process.Pid, d)
	}
	return ""
}

// wait reads the helper's stdout to its end, then reaps it and returns its
// exit error (exec.Cmd.Wait must not run while the pipe is being read).
func (h *helper) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case l, ok := <-h.lines:
			if !ok {
				return h.cmd.Wait()
			}
			t.Logf("helper pid %d: unexpected output %q", h.cmd.Process.Pid, l)
		case <-deadline:
			t.Fatalf("helper pid %d still running after %v", h.cmd.Process.Pid, d)
		}
	}
}

// tWriter forwards a helper's stderr to the test log.
type tWriter struct {
	t      *testing.T
	prefix string
	mu     sync.Mutex
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.t.Logf("%s helper: %s", w.prefix, p)
	return len(p), nil
}

// TestProcessesWriteConcurrently runs 4 writer processes x 200 chats, 25
// goroutines each, on one file, and checks nothing is lost or reordered.
func TestProcessesWriteConcurrently(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "server.db")
	testProcessesWriteConcurrently(t, "sqlite:"+path, openSQLiteTest(t, path, "test-host"))
}

// testProcessesWriteConcurrently runs the writers on url, which s has open.
func testProcessesWriteConcurrently(t *testing.T, url string, s *Store) {
	const procs, chats, goroutines = 4, 200, 25
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	base, _ := s.LastActivityID(t.Context())

	helpers := make([]*helper, procs)
	for i := range helpers {
		helpers[i] = startHelper(t, "writer", "STORE_URL="+url, fmt.Sprintf("WORKER=%d", i+1),
			fmt.Sprintf("CHATS=%d", chats), fmt.Sprintf("GOROUTINES=%d", goroutines))
	}
	t0 := time.Now()
	for _, h := range helpers {
		if _, err := io.WriteString(h.stdin, "go\n"); err != nil {
			t.Fatalf("tell writer to go: %v", err)
		}
	}
	var all []int64
	var calls []time.Duration
	for i, h := range helpers {
		var res writerResult
		if err := json.Unmarshal([]byte(h.line(t, 60*time.Second)), &res); err != nil {
			t.Fatalf("writer %d result: %v", i+1, err)
		}
		if len(res.Chats) != chats {
			t.Fatalf("writer %d reported %d chats, want %d", i+1, len(res.Chats), chats)
		}
		for _, c := range res.Chats {
			if c[0] <= base || c[1] <= c[0] {
				t.Fatalf("writer %d chat activity ids start %d finish %d, want base %d < start < finish", i+1, c[0], c[1], base)
			}
			all = append(all, c[0], c[1])
		}
		calls = append(calls, res.Calls...)
		t.Logf("writer %d: %d chats in %.2fs", i+1, chats, res.Elapsed)
	}
	elapsed := time.Since(t0)
	for i, h := range helpers {
		if err := h.wait(t, 10*time.Second); err != nil {
			t.Fatalf("writer %d exited: %v", i+1, err)
		}
	}
	t.Logf("%d processes x %d chats: %d write transactions in %v (%.0f/s)",
		procs, chats, 2*procs*chats, elapsed.Round(time.Millisecond), float64(2*procs*chats)/elapsed.Seconds())
	slices.Sort(calls)
	t.Logf("write call latency (queueing included): p50 %v, p99 %v, max %v",
		calls[len(calls)/2].Round(time.Microsecond), calls[len(calls)*99/100].Round(time.Microsecond), calls[len(calls)-1].Round(time.Microsecond))

	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	if len(slices.Compact(slices.Clone(all))) != len(all) {
		t.Fatalf("writers got duplicate activity ids")
	}

	ctx := t.Context()
	var nChats, nCompleted int
	if err := s.db.QueryRowContext(ctx, `SELECT count(*), count(*) FILTER (WHERE status = 'completed') FROM chats`).Scan(&nChats, &nCompleted); err != nil {
		t.Fatal(err)
	}
	if nChats != procs*chats || nCompleted != procs*chats {
		t.Fatalf("chats table: %d rows, %d completed, want %d and %d", nChats, nCompleted, procs*chats, procs*chats)
	}
	var stored []int64
	for after := base; ; {
		page, err := s.Activities(ctx, Filter{After: after, Limit: MaxLimit})
		if err != nil {
			t.Fatalf("Activities() = %v", err)
		}
		if len(page) == 0 {
			break
		}
		for _, a := range page {
			if a.ID <= after {
				t.Fatalf("Activities() id %d after %d, want strictly increasing", a.ID, after)
			}
			after = a.ID
			stored = append(stored, a.ID)
		}
	}
	if !slices.Equal(stored, all) {
		t.Fatalf("stored chat activities: %d, writers reported %d, want the same ids", len(stored), len(all))
	}
	if len(stored) != 2*procs*chats {
		t.Fatalf("%d chat activities, want %d", len(stored), 2*procs*chats)
	}
}

// TestWaitActivityWakesAcrossProcesses measures how long a waiter takes to
// see a commit made by another process.
func TestWaitActivityWakesAcrossProcesses(t *testing.T) {
	path := filepath.Join(t.TempDir(), "data", "server.db")
	testWaitActivityWakesAcrossProcesses(t, "sqlite:"+path, openSQLiteTest(t, path, "test-host"))
}

// testWaitActivityWakesAcrossProcesses runs the waker on url, which s has
// open.
func testWaitActivityWakesAcrossProcesses(t *testing.T, url string, s *Store) {
	const rounds = 10
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	h := startHelper(t, "waker", "STORE_URL="+url)

	var lat []time.Duration
	for range rounds {
		last, err := s.LastActivityID(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		woke := make(chan error, 1)
		var wokeAt time.Time
		go func() {
			err := s.WaitActivity(ctxTimeout(t, 5*time.Second), last)
			wokeAt = time.Now()
			woke <- err
		}()
		waitFor(t, 2*time.Second, func() error {
			if !s.feed.hasWaiters() {
				return errors.New("WaitActivity has not started waiting")
			}
			return nil
		})
		if _, err := io.WriteString(h.stdin, "write\n"); err != nil {
			t.Fatal(err)
		}
		ns, err := strconv.ParseInt(h.line(t, 10*time.Second), 10, 64)
		if err != nil {
			t.Fatalf("waker commit time: %v", err)
		}
		if err := <-woke; err != nil {
			t.Fatalf("WaitActivity(%d) with another process writing = %v", last, err)
		}
		d := wokeAt.Sub(time.Unix(0, ns))
		if d > 2*time.Second {
			t.Errorf("woke %v after the other process's commit, want well under 250ms", d)
		}
		lat = append(lat, d)
	}
	slices.Sort(lat)
	t.Logf("cross-process wake latency over %d rounds (%s): min %v, median %v, max %v",
		rounds, s.d.name, lat[0].Round(time.Microsecond), lat[rounds/2].Round(time.Microsecond), lat[rounds-1].Round(time.Microsecond))
}
