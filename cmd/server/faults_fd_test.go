package main

// Fault tests, descriptor exhaustion: a worker out of file descriptors.

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestWorkerOutOfDescriptors: a worker that runs out of file descriptors
// keeps the connections it holds, leaves new ones in the backlog, and
// accepts them once descriptors are freed, without being replaced.
func TestWorkerOutOfDescriptors(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	pid := s.workerPIDs()[0]
	if _, err := s.health(fresh); err != nil {
		t.Fatal(err)
	}
	// Leave the worker a few descriptors more than it has open.
	const spare = 8
	var lim unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &lim); err != nil {
		t.Fatal(err)
	}
	open := procFDs(pid)
	low := unix.Rlimit{Cur: uint64(open + spare), Max: lim.Max}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &low, nil); err != nil {
		t.Skipf("cannot lower the worker's descriptor limit: %v", err)
	}
	t.Logf("worker %d: %d descriptors open, limit lowered to %d", pid, open, low.Cur)

	// Three times as many clients as spare descriptors, each holding its
	// connection open after its answer until released.
	type result struct {
		pid int
		err error
	}
	const n = 3 * spare
	results := make(chan result, n)
	release := make(chan struct{})
	var wg sync.WaitGroup
	var conns []net.Conn
	defer func() {
		// On every path out, unblock and end the clients.
		select {
		case <-release:
		default:
			close(release)
		}
		for _, c := range conns {
			c.Close()
		}
		wg.Wait()
	}()
	for range n {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", s.port))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		wg.Go(func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			var h health
			_, err := io.WriteString(c, "GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
			if err == nil {
				var resp *http.Response
				if resp, err = http.ReadResponse(bufio.NewReader(c), nil); err == nil {
					err = json.NewDecoder(resp.Body).Decode(&h)
				}
			}
			results <- result{h.PID, err}
			<-release
		})
	}
	waitFor(t, 20*time.Second, func() error {
		if len(s.logs.find("accept failed; new connections wait in the backlog, retrying", nil)) == 0 {
			return errors.New("no accept failure logged")
		}
		return nil
	})
	answered := len(results)
	if now := s.workerPIDs(); len(now) != 1 || now[0] != pid {
		t.Errorf("workers %v while out of descriptors, want the same worker %d", now, pid)
	}
	// Free the descriptors: every waiting client is then served by the same worker.
	close(release)
	for i := range n {
		select {
		case r := <-results:
			if r.err != nil || r.pid != pid {
				t.Errorf("client %d: answered by pid %d, %v; want pid %d", i, r.pid, r.err, pid)
			}
		case <-time.After(30 * time.Second):
			t.Fatalf("%d of %d clients answered", i, n)
		}
	}
	t.Logf("%d of %d clients answered while out of descriptors, the rest after the first ones left", answered, n)
	waitFor(t, 10*time.Second, func() error {
		if len(s.logs.find("accepting again", nil)) == 0 {
			return errors.New(`no "accepting again" logged`)
		}
		return nil
	})
	failed := s.logs.find("accept failed; new connections wait in the backlog, retrying", nil)[0]
	again := s.logs.find("accepting again", nil)[0]
	t.Logf("logged: %q, then accepting again after %v ms", failed["error"], again["after_ms"])
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		t.Error(err)
	}
	if h, err := s.health(fresh); err != nil || h.PID != pid {
		t.Errorf("health after = %+v %v, want worker %d", h, err, pid)
	}
}
