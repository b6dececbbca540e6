package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/corralhq/corral/supervisor"
)

// TestAcceptFailingReported runs a worker out of file descriptors: its
// heartbeat says so, server status shows "accept failing", the master logs
// it once, and /health, asked on a connection the worker already holds,
// says "accept":"failing". Once descriptors are free again all of it
// clears.
func TestAcceptFailingReported(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startServer(t, "WORKERS=1", "CONTROL_SOCKET="+sock, "TIMEOUT_KEEP_ALIVE=120s")
	pid := s.workerPIDs()[0]
	// A keep-alive connection accepted before the descriptors run out.
	kept, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.port))
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	br := bufio.NewReader(kept)
	healthOnKept := func() string {
		t.Helper()
		kept.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(kept, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n"); err != nil {
			t.Fatalf("write on the kept connection: %v", err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("read on the kept connection: %v", err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("/health on the kept connection: %d %s, want 200", resp.StatusCode, b)
		}
		return string(b)
	}
	if h := healthOnKept(); strings.Contains(h, `"accept"`) {
		t.Fatalf("/health before: %s, want no accept field", h)
	}
	workerStatus := func() (supervisor.WorkerStatus, string) {
		t.Helper()
		code, out, errOut := cli(t, "status", "--json", "--control-socket", sock)
		var st supervisor.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil || len(st.Workers) != 1 {
			t.Fatalf("server status --json: exit %d, %q %q", code, out, errOut)
		}
		_, text, _ := cli(t, "status", "--control-socket", sock)
		return st.Workers[0], text
	}

	var lim unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &lim); err != nil {
		t.Fatal(err)
	}
	low := unix.Rlimit{Cur: uint64(procFDs(pid) + 4), Max: lim.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &low, nil); err != nil {
		t.Skipf("cannot lower the worker's descriptor limit: %v", err)
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range 12 {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.port))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	waitFor(t, 20*time.Second, func() error {
		w, text := workerStatus()
		if w.Accept != "failing" || !strings.Contains(text, "accept failing") {
			return fmt.Errorf("status accept %q, table:\n%s\nwant failing", w.Accept, text)
		}
		return nil
	})
	if h := healthOnKept(); !strings.Contains(h, `"accept":"failing"`) {
		t.Errorf(`/health while out of descriptors: %s, want "accept":"failing"`, h)
	}
	if n := len(s.logs.find("worker cannot accept connections (out of file descriptors or kernel memory); new ones wait in the backlog", map[string]any{"pid": pid})); n != 1 {
		t.Errorf("master logged the failing accept %d times, want once", n)
	}

	// Descriptors back: the waiting connections are accepted and the state
	// clears everywhere.
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		// A new connection makes the worker accept (and succeed) again.
		if _, err := s.health(fresh); err != nil {
			return err
		}
		if w, text := workerStatus(); w.Accept != "" || strings.Contains(text, "accept failing") {
			return fmt.Errorf("status accept %q after descriptors were freed, want none", w.Accept)
		}
		if len(s.logs.find("worker accepts connections again", map[string]any{"pid": pid})) != 1 {
			return errors.New("the master did not log that the worker accepts again")
		}
		return nil
	})
	if h := healthOnKept(); strings.Contains(h, `"accept"`) {
		t.Errorf("/health after: %s, want no accept field", h)
	}
	if now := s.workerPIDs(); len(now) != 1 || now[0] != pid {
		t.Errorf("workers %v, want the same worker %d throughout", now, pid)
	}
}
