package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"time"
)

// request is the outcome of one request of the open-loop client.
type request struct {
	Start   time.Time
	Latency time.Duration // until the whole response, or until the failure
	Status  int           // 0 when no response was read
	PID     int           // the pid in the /health body, 0 if none
	Err     string        // "connect", "write", "read", "timeout", "bad response"; "" on success
}

// End is when the request finished or failed.
func (r request) End() time.Time { return r.Start.Add(r.Latency) }

// ok reports whether the request got a 200.
func (r request) ok() bool { return r.Err == "" && r.Status == 200 }

// openLoop is a constant-rate client: it sends GET /health at rate per
// second, each on a new connection ("Connection: close"), whether or not
// earlier requests have finished, so a stalled server shows as latency and
// timeouts instead of slowing the client down. New connections are what the
// kernel balances over SO_REUSEPORT sockets, so they are what a stranded
// socket hurts.
type openLoop struct {
	addr    string
	rate    int
	timeout time.Duration

	mu   sync.Mutex
	reqs []request
	wg   sync.WaitGroup
	stop context.CancelFunc
	done chan struct{}
}

// startLoad begins sending; it stops by itself after max, or on halt.
func startLoad(addr string, rate int, timeout, maxDur time.Duration) *openLoop {
	ctx, cancel := context.WithTimeout(context.Background(), maxDur)
	l := &openLoop{addr: addr, rate: rate, timeout: timeout, stop: cancel, done: make(chan struct{})}
	go l.run(ctx)
	return l
}

func (l *openLoop) run(ctx context.Context) {
	defer close(l.done)
	interval := time.Second / time.Duration(l.rate)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			l.wg.Wait()
			return
		case <-tick.C:
			l.wg.Add(1)
			go func() {
				defer l.wg.Done()
				r := get(l.addr, l.timeout)
				l.mu.Lock()
				l.reqs = append(l.reqs, r)
				l.mu.Unlock()
			}()
		}
	}
}

// halt stops sending and waits for the requests outstanding (at most the
// request timeout), then returns every request sorted by start.
func (l *openLoop) halt() []request {
	l.stop()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	out := slices.Clone(l.reqs)
	slices.SortFunc(out, func(a, b request) int { return a.Start.Compare(b.Start) })
	return out
}

var healthRequest = []byte("GET /health HTTP/1.1\r\nHost: bench\r\nUser-Agent: procbench\r\nConnection: close\r\n\r\n")

// get sends one GET /health on a new connection and reads the response to
// EOF, within timeout overall.
func get(addr string, timeout time.Duration) request {
	return send(addr, healthRequest, timeout)
}

// send writes the raw request req, which must ask "Connection: close", on
// a new connection and reads the response to EOF, within timeout overall.
func send(addr string, req []byte, timeout time.Duration) request {
	r := request{Start: time.Now()}
	deadline := r.Start.Add(timeout)
	fail := func(kind string, err error) request {
		r.Latency = time.Since(r.Start)
		r.Err = kind
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, os.ErrDeadlineExceeded) {
			r.Err = "timeout"
		}
		return r
	}
	c, err := net.DialTimeout("tcp4", addr, timeout)
	if err != nil {
		return fail("connect", err)
	}
	defer c.Close()
	c.SetDeadline(deadline)
	if _, err := c.Write(req); err != nil {
		return fail("write", err)
	}
	body, err := io.ReadAll(io.LimitReader(c, 64<<10))
	if err != nil {
		// A reset after part of a response is still a failed request.
		r = fail("read", err)
		r.Status, r.PID = parseResponse(body)
		return r
	}
	r.Latency = time.Since(r.Start)
	r.Status, r.PID = parseResponse(body)
	if r.Status == 0 {
		r.Err = "bad response"
	}
	return r
}

// parseResponse returns the status code of a raw HTTP/1.1 response and the
// "pid" of its JSON body, 0 for what it cannot find.
func parseResponse(b []byte) (status, pid int) {
	if len(b) < 12 || !bytes.HasPrefix(b, []byte("HTTP/1.")) {
		return 0, 0
	}
	status, _ = strconv.Atoi(string(b[9:12]))
	if i := bytes.Index(b, []byte(`"pid":`)); i >= 0 {
		rest := b[i+len(`"pid":`):]
		j := 0
		for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
			j++
		}
		pid, _ = strconv.Atoi(string(rest[:j]))
	}
	return status, pid
}

// latencyStats summarises the requests that started within [from, to).
type latencyStats struct {
	Count, Failed, Slow int // Slow: over 1 s or failed with a timeout
	Over100ms           int
	P50, P99, Max       time.Duration
	Errors              map[string]int
}

func statsBetween(reqs []request, from, to time.Time) latencyStats {
	s := latencyStats{Errors: map[string]int{}}
	var lat []time.Duration
	for _, r := range reqs {
		if r.Start.Before(from) || !r.Start.Before(to) {
			continue
		}
		s.Count++
		lat = append(lat, r.Latency)
		switch {
		case r.Err != "":
			s.Failed++
			s.Errors[r.Err]++
		case r.Status != 200:
			s.Failed++
			s.Errors["status "+strconv.Itoa(r.Status)]++
		}
		if r.Latency > time.Second || r.Err == "timeout" {
			s.Slow++
		}
		if r.Latency > 100*time.Millisecond {
			s.Over100ms++
		}
	}
	if len(lat) == 0 {
		return s
	}
	slices.Sort(lat)
	s.P50 = percentile(lat, 50)
	s.P99 = percentile(lat, 99)
	s.Max = lat[len(lat)-1]
	return s
}

// percentile returns the p-th percentile of sorted values (nearest rank).
func percentile[T any](sorted []T, p float64) T {
	i := int(float64(len(sorted))*p/100+0.5) - 1
	i = min(max(i, 0), len(sorted)-1)
	return sorted[i]
}
