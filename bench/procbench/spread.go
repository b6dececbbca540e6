package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"
)

// spreadResult is how many of a burst of concurrent keep-alive connections
// each process ended up serving.
type spreadResult struct {
	Target   string
	Conns    int
	Failed   int
	PerPID   []int // sorted
	Min, Max int
}

// spread opens 2000 concurrent keep-alive connections to a 4-process
// target, one request each, and counts the connections per pid: the even
// spread SO_REUSEPORT gives, what the neighbour scheme keeps of it, and the
// shared socket's unevenness (docs/architecture.md, "No connection is stranded").
func (b *bench) spread() error {
	const workers, conns = 4, 2000
	cases := []struct {
		label string
		start func() (*target, error)
	}{
		{"baseline (own socket each)", func() (*target, error) { return b.startBaseline("spread-baseline", workers) }},
		{"server reuseport (+ neighbour)", func() (*target, error) {
			return b.startServer("spread-reuseport", serverOpts{workers: workers})
		}},
		{"server shared", func() (*target, error) {
			return b.startServer("spread-shared", serverOpts{workers: workers, socketMode: "shared"})
		}},
	}
	for _, c := range cases {
		t, err := c.start()
		if err != nil {
			return err
		}
		r := burst(t.addr, conns)
		r.Target = c.label
		t.stop()
		delete(b.live, t)
		b.res.Spread = append(b.res.Spread, r)
	}
	return nil
}

// burst opens n connections at once, sends one keep-alive GET /health on
// each, and closes them all only after every response has arrived, so each
// process's share is the share of live connections it accepted.
func burst(addr string, n int) spreadResult {
	var (
		mu     sync.Mutex
		perPID = map[int]int{}
		failed int
		wg     sync.WaitGroup
	)
	release := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			pid, c := keepAliveGet(addr, 10*time.Second)
			mu.Lock()
			if pid == 0 {
				failed++
			} else {
				perPID[pid]++
			}
			mu.Unlock()
			wg.Done()
			if c != nil {
				<-release
				c.Close()
			}
		}()
	}
	wg.Wait()
	close(release)
	r := spreadResult{Conns: n, Failed: failed}
	for _, v := range perPID {
		r.PerPID = append(r.PerPID, v)
	}
	slices.Sort(r.PerPID)
	if len(r.PerPID) > 0 {
		r.Min, r.Max = r.PerPID[0], r.PerPID[len(r.PerPID)-1]
	}
	return r
}

// keepAliveGet sends GET /health on a new connection and returns the pid
// of the answer and the still open connection; 0 and nil on failure.
func keepAliveGet(addr string, timeout time.Duration) (int, net.Conn) {
	c, err := net.DialTimeout("tcp4", addr, timeout)
	if err != nil {
		return 0, nil
	}
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := fmt.Fprint(c, "GET /health HTTP/1.1\r\nHost: bench\r\nUser-Agent: procbench\r\n\r\n"); err != nil {
		c.Close()
		return 0, nil
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		c.Close()
		return 0, nil
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 {
		c.Close()
		return 0, nil
	}
	_, pid := parseResponse(append([]byte("HTTP/1.1 200 \r\n\r\n"), body...))
	return pid, c
}
