package main

// Hostile HTTP input: malformed requests (the corpus in testdata/hostile),
// oversized ones, slow clients, thousands of idle connections and
// pipelined floods, all over raw TCP, while another client checks that
// /health keeps answering quickly and the workers neither die nor grow.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
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

// hostileReadTimeout is TIMEOUT_READ_REQUEST in these tests; every hostile
// request must be answered or cut within it plus hostileSlack.
const (
	hostileReadTimeout = 2 * time.Second
	hostileSlack       = 2 * time.Second
)

// envInt reads a whole number from the environment, or def.
func envInt(name string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(name)); err == nil && n > 0 {
		return n
	}
	return def
}

// outcome is what a raw exchange produced: the status of the first
// response (0 if none), the final status after a 100 Continue, and how
// long it took.
type outcome struct {
	status, final int
	took          time.Duration
	err           error
}

func (o outcome) String() string {
	if o.status == 0 {
		return "close"
	}
	if o.status == 100 {
		return fmt.Sprintf("100 then %d", o.final)
	}
	return strconv.Itoa(o.status)
}

// matches reports whether o is one of the outcomes in want ("400|close").
func (o outcome) matches(want string) bool {
	for _, w := range strings.Split(want, "|") {
		switch {
		case w == "close" && o.status == 0:
			return true
		case w == "100" && o.status == 100 && o.final >= 400 && o.final < 500:
			return true
		case w == strconv.Itoa(o.status):
			return true
		}
	}
	return false
}

// rawExchange sends req on a new connection (a writer goroutine, so that a
// server that answers before reading the whole request is seen) and reads
// the first response.
func rawExchange(addr string, req []byte, limit time.Duration) outcome {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return outcome{err: err}
	}
	defer c.Close()
	go c.Write(req)
	c.SetReadDeadline(start.Add(limit))
	br := bufio.NewReader(c)
	o := outcome{}
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		o.took, o.err = time.Since(start), err
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			o.err = fmt.Errorf("no answer and no close within %s", limit)
		} else {
			o.err = nil // closed or reset: a valid outcome
		}
		return o
	}
	o.status = resp.StatusCode
	resp.Body.Close()
	if o.status == 100 {
		if resp, err := http.ReadResponse(br, nil); err == nil {
			o.final = resp.StatusCode
			resp.Body.Close()
		}
	}
	o.took = time.Since(start)
	return o
}

// healthProbe asks /health on a new connection every 10 ms until stop
// closes, and returns the latencies and failures.
func healthProbe(s *server, stop <-chan struct{}) func() ([]time.Duration, []string) {
	var lat []time.Duration
	var fails []string
	done := make(chan struct{})
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	go func() {
		defer close(done)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			t0 := time.Now()
			if _, err := s.health(c); err != nil {
				fails = append(fails, err.Error())
				continue
			}
			lat = append(lat, time.Since(t0))
		}
	}()
	return func() ([]time.Duration, []string) {
		<-done
		slices.Sort(lat)
		return lat, fails
	}
}

func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[min(len(sorted)-1, int(float64(len(sorted))*p))]
}

// rss returns each pid's resident memory in MiB.
func rss(pids []int) map[int]float64 {
	m := map[int]float64{}
	for _, p := range pids {
		m[p] = float64(procValue(p, "VmRSS")) / 1024
	}
	return m
}

// TestHostileInput runs every kind of hostile client against one server
// with a 2 s read timeout, one after another, under a /health probe.
func TestHostileInput(t *testing.T) {
	// The production hang timeout (10 s), not the tests' 2 s: under -race on
	// two busy cores, 2,500 connections arriving at a worker at once have
	// stalled its heartbeat past 2 s, and hang detection is not what this
	// test is about.
	s := startServer(t, "WORKERS=4", "TIMEOUT_READ_REQUEST="+hostileReadTimeout.String(), "SIMULATED_LATENCY=0", "ALLOWED_HOSTS=corral.test",
		"TIMEOUT_WORKER_HEALTHCHECK=10s")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	pids := s.workerPIDs()
	rssBefore := rss(pids)
	stop := make(chan struct{})
	probe := healthProbe(s, stop)
	limit := hostileReadTimeout + hostileSlack

	// Each phase runs alone; the workers' RSS is logged after each.
	phase := func(name string, f func(t *testing.T)) {
		t.Run(name, f)
		var mib []string
		for _, p := range pids {
			mib = append(mib, fmt.Sprintf("%.0f", float64(procValue(p, "VmRSS"))/1024))
		}
		t.Logf("after %-17s workers' RSS MiB: %s", name+":", strings.Join(mib, " "))
	}
	phase("corpus", func(t *testing.T) { replayCorpus(t, addr, limit) })
	phase("oversized", func(t *testing.T) { oversized(t, addr, limit) })
	phase("slowloris", func(t *testing.T) {
		n := envInt("CORRAL_HOSTILE_SLOW", 200)
		head := []byte("GET /health HTTP/1.1\r\nHost: corral.test\r\nX-Dribble: ")
		slowClients(t, addr, n, head, limit)
	})
	phase("slow body", func(t *testing.T) {
		n := envInt("CORRAL_HOSTILE_SLOW", 200)
		head := []byte("POST /api/chat HTTP/1.1\r\nHost: corral.test\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"message\":\"")
		slowClients(t, addr, n, head, limit)
	})
	// Twice: memory that grew for the first wave must be reused by the
	// second, not grow again.
	rssPre, rssWave1 := rss(pids), map[int]float64(nil)
	for _, wave := range []string{"idle wave 1", "idle wave 2"} {
		phase(wave, func(t *testing.T) {
			idleConnections(t, addr, envInt("CORRAL_HOSTILE_IDLE", 10000), limit)
		})
		if rssWave1 == nil {
			rssWave1 = rss(pids)
		}
	}
	rssIdle := rss(pids)
	// Bounded, not leaking: the second wave grows each worker less than
	// the first did.
	for _, p := range pids {
		if w1, w2 := rssWave1[p]-rssPre[p], rssIdle[p]-rssWave1[p]; w2 > w1 {
			t.Errorf("worker %d RSS grew %.1f MiB in the first idle wave and %.1f MiB in the second: not bounded", p, w1, w2)
		}
	}
	phase("pipelined flood", func(t *testing.T) { pipelined(t, addr) })

	close(stop)
	lat, fails := probe()
	rssAfter := rss(pids)
	p50, p99 := percentile(lat, 0.50), percentile(lat, 0.99)
	t.Logf("/health during the hostile clients: %d answered, %d failed, p50 %s, p99 %s, max %s",
		len(lat), len(fails), p50, p99, percentile(lat, 1))
	for _, p := range pids {
		t.Logf("worker %d RSS %.1f MiB -> %.1f MiB", p, rssBefore[p], rssAfter[p])
		if rssAfter[p] > rssIdle[p]+64 {
			t.Errorf("worker %d RSS grew from %.1f to %.1f MiB after the idle waves", p, rssIdle[p], rssAfter[p])
		}
		if rssAfter[p] > 512 {
			t.Errorf("worker %d RSS %.1f MiB after the hostile clients, want under 512 MiB", p, rssAfter[p])
		}
	}
	if len(fails) > 0 {
		t.Errorf("%d /health probes failed; first: %s", len(fails), fails[0])
	}
	// The goal is 50 ms; a shared 2-core machine running -race gets a
	// generous bound, and docs/reliability.md has the measured figure.
	if p99 > 500*time.Millisecond {
		t.Errorf("/health p99 %s during the hostile clients, want under 500ms", p99)
	}
	if now := s.workerPIDs(); !sameSet(now, pids) {
		var why []string
		for _, m := range []string{"worker hung, sending SIGQUIT", "worker exited", "worker killed"} {
			for _, l := range s.logs.find(m, nil) {
				why = append(why, fmt.Sprint(l))
			}
		}
		t.Errorf("workers %v after the hostile clients, want the same %v:\n%s", now, pids, strings.Join(why, "\n"))
	}
	if n := len(s.logs.find("handler panicked", nil)); n > 0 {
		t.Errorf("%d handler panics", n)
	}
}

// replayCorpus sends every request of testdata/hostile, all at once, and
// checks each outcome against cases.txt.
func replayCorpus(t *testing.T, addr string, limit time.Duration) {
	index, err := os.ReadFile(filepath.Join("testdata", "hostile", "cases.txt"))
	if err != nil {
		t.Fatal(err)
	}
	type hostileCase struct{ file, want string }
	var cases []hostileCase
	for _, l := range strings.Split(string(index), "\n") {
		f := strings.Fields(l)
		if len(f) < 2 || strings.HasPrefix(f[0], "#") {
			continue
		}
		cases = append(cases, hostileCase{f[0], f[1]})
	}
	files, _ := filepath.Glob(filepath.Join("testdata", "hostile", "*.http"))
	if len(files) != len(cases) {
		t.Errorf("%d request files but %d cases in cases.txt", len(files), len(cases))
	}
	got := make([]outcome, len(cases))
	var wg sync.WaitGroup
	for i, c := range cases {
		req, err := os.ReadFile(filepath.Join("testdata", "hostile", c.file))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i] = rawExchange(addr, req, limit)
		}()
	}
	wg.Wait()
	for i, c := range cases {
		o := got[i]
		if o.err != nil || !o.matches(c.want) {
			t.Errorf("%s: %v (%v) in %s, want %s", c.file, o, o.err, o.took, c.want)
		}
	}
}

// oversized sends requests too large in every part, and JSON bodies that
// are within the size limit but hostile to a decoder.
func oversized(t *testing.T, addr string, limit time.Duration) {
	const mib = 1 << 20
	post := func(body []byte, extra string) []byte {
		return append([]byte(fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: corral.test\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n", extra, len(body))), body...)
	}
	var chunked bytes.Buffer
	chunked.WriteString("POST /api/chat HTTP/1.1\r\nHost: corral.test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
	for range 40 {
		fmt.Fprintf(&chunked, "%x\r\n%s\r\n", 64<<10, bytes.Repeat([]byte(" "), 64<<10))
	}
	chunked.WriteString("0\r\n\r\n")
	manyKeys := []byte("{")
	for i := 0; len(manyKeys) < mib-100; i++ {
		manyKeys = fmt.Appendf(manyKeys, `"k%d":%d,`, i, i)
	}
	manyKeys = append(manyKeys, `"agent_id":"default","message":"hi"}`...)
	cases := []struct {
		name string
		req  []byte
		want string
	}{
		// fasthttp reports a request line or headers past its read buffer
		// with one error, so both get 431.
		{"64 KiB header", []byte("GET /health HTTP/1.1\r\nHost: corral.test\r\nX-Big: " + strings.Repeat("a", 64<<10) + "\r\n\r\n"), "431|close"},
		{"5000 headers", []byte("GET /health HTTP/1.1\r\nHost: corral.test\r\n" + strings.Repeat("X-H: v\r\n", 5000) + "\r\n"), "431|close"},
		{"64 KiB URL", []byte("GET /" + strings.Repeat("a", 64<<10) + " HTTP/1.1\r\nHost: corral.test\r\n\r\n"), "431|close"},
		{"2 MiB body", post(bytes.Repeat([]byte("a"), 2*mib), ""), "413"},
		{"2.5 MiB chunked body", chunked.Bytes(), "413|close"},
		{"1 MiB + 1 byte body", post(bytes.Repeat([]byte(" "), mib+1), ""), "413"},
		{"nesting 500k deep", post(bytes.Repeat([]byte("["), 500_000), ""), "400"},
		{"nesting in a field", post([]byte(`{"agent_id":"default","message":`+strings.Repeat("[", 400_000)+`}`), ""), "400"},
		{"900 KiB message", post([]byte(`{"agent_id":"default","message":"`+strings.Repeat("x", 900<<10)+`"}`), ""), "400"},
		// Unknown fields are ignored by design; what matters is that a
		// body this size decodes in bounded time and memory.
		{"50k unknown keys", post(manyKeys, ""), "200"},
		{"1 MiB invalid UTF-8", post(bytes.Repeat([]byte{0xff}, mib-10), ""), "400"},
		{"1 MiB of NULs", post(make([]byte, mib-10), ""), "400"},
	}
	for _, c := range cases {
		o := rawExchange(addr, c.req, limit)
		t.Logf("%-22s -> %v in %s", c.name, o, o.took.Round(time.Millisecond))
		if o.err != nil || !o.matches(c.want) {
			t.Errorf("%s: %v (%v) in %s, want %s", c.name, o, o.err, o.took, c.want)
		}
	}
}

// slowClients opens n connections that send head and then one more byte
// every 200 ms, and checks that the server answers 408 or closes each one
// within limit.
func slowClients(t *testing.T, addr string, n int, head []byte, limit time.Duration) {
	var wg sync.WaitGroup
	var late, failed atomic.Int64
	var worst atomic.Int64
	statuses := sync.Map{}
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			start := time.Now()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				failed.Add(1)
				return
			}
			defer c.Close()
			stopDrip := make(chan struct{})
			go func() {
				if _, err := c.Write(head); err != nil {
					return
				}
				tick := time.NewTicker(200 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-stopDrip:
						return
					case <-tick.C:
					}
					if _, err := c.Write([]byte("a")); err != nil {
						return
					}
				}
			}()
			defer close(stopDrip)
			c.SetReadDeadline(start.Add(limit + 2*time.Second))
			b, err := io.ReadAll(c)
			took := time.Since(start)
			for {
				w := worst.Load()
				if int64(took) <= w || worst.CompareAndSwap(w, int64(took)) {
					break
				}
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || took > limit {
				late.Add(1)
			}
			st := "close"
			if i := bytes.IndexByte(b, '\r'); bytes.HasPrefix(b, []byte("HTTP/1.1 ")) && i > 0 {
				st = string(b[9:min(i, 12)])
			}
			v, _ := statuses.LoadOrStore(st, new(atomic.Int64))
			v.(*atomic.Int64).Add(1)
		}()
	}
	wg.Wait()
	got := map[string]int64{}
	statuses.Range(func(k, v any) bool {
		got[k.(string)] = v.(*atomic.Int64).Load()
		return true
	})
	t.Logf("%d slow clients: outcomes %v, slowest cut after %s, %d late, %d could not connect", n, got, time.Duration(worst.Load()).Round(time.Millisecond), late.Load(), failed.Load())
	if late.Load() > 0 || failed.Load() > 0 {
		t.Errorf("%d of %d slow clients not cut within %s, %d could not connect", late.Load(), n, limit, failed.Load())
	}
	for k := range got {
		if k != "408" && k != "close" {
			t.Errorf("slow clients got %s, want 408 or a closed connection", k)
		}
	}
}

// idleAcceptSlack is how long after limit an idle connection may still be
// open, counted from the client's open.
const idleAcceptSlack = 6 * time.Second

// idleConnections opens n connections that send nothing and checks that
// the server closes every one within limit (and idleAcceptSlack) of its
// opening.
func idleConnections(t *testing.T, addr string, n int, limit time.Duration) {
	// Go raises the soft fd limit to the hard one at start; stay under it.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && uint64(n)+512 > lim.Cur {
		t.Logf("open-file limit %d: %d idle connections instead of %d", lim.Cur, lim.Cur-512, n)
		n = int(lim.Cur) - 512
	}
	conns := make([]net.Conn, n)
	opened := make([]time.Time, n)
	var dialErrs atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	const dialers = 32
	for d := range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := d; i < n; i += dialers {
				c, err := net.DialTimeout("tcp", addr, 10*time.Second)
				if err != nil {
					dialErrs.Add(1)
					continue
				}
				conns[i], opened[i] = c, time.Now()
			}
		}()
	}
	wg.Wait()
	dialTook := time.Since(start)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	// A few goroutines read each connection in turn: the race detector
	// caps a process at 8128 goroutines, so not one per connection.
	var late atomic.Int64
	var worst atomic.Int64
	for r := range dialers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 64)
			for i := r; i < n; i += dialers {
				c := conns[i]
				if c == nil {
					continue
				}
				// The server's read timeout runs from its accept, which may
				// lag the client's open by seconds while 10,000 wait in
				// the backlogs of busy workers.
				c.SetReadDeadline(opened[i].Add(limit + idleAcceptSlack))
				_, err := c.Read(buf)
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					late.Add(1)
					continue
				}
				d := time.Since(opened[i])
				for {
					w := worst.Load()
					if int64(d) <= w || worst.CompareAndSwap(w, int64(d)) {
						break
					}
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d idle connections opened in %s (%d dial errors); all closed by the server within %s of opening, %d not",
		n, dialTook.Round(time.Millisecond), dialErrs.Load(), time.Duration(worst.Load()).Round(time.Millisecond), late.Load())
	if dialErrs.Load() > 0 || late.Load() > 0 {
		t.Errorf("%d idle connections: %d dial errors, %d still open after %s", n, dialErrs.Load(), late.Load(), limit+idleAcceptSlack)
	}
}

// pipelined writes many requests in one go on each of several
// connections, and then a burst of valid requests ended by garbage.
func pipelined(t *testing.T, addr string) {
	const conns, depth = 20, 500
	one := "GET /health HTTP/1.1\r\nHost: corral.test\r\n\r\n"
	var wg sync.WaitGroup
	var ok, bad atomic.Int64
	start := time.Now()
	for range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				bad.Add(depth)
				return
			}
			defer c.Close()
			go c.Write([]byte(strings.Repeat(one, depth)))
			c.SetReadDeadline(time.Now().Add(30 * time.Second))
			br := bufio.NewReader(c)
			for range depth {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					bad.Add(1)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					ok.Add(1)
				} else {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	t.Logf("pipelined: %d connections x %d requests: %d answered 200, %d not, in %s", conns, depth, ok.Load(), bad.Load(), took.Round(time.Millisecond))
	if ok.Load() != conns*depth {
		t.Errorf("pipelined: %d of %d answered 200", ok.Load(), conns*depth)
	}
	// Valid requests then garbage: the valid ones are answered, then 400
	// and the connection closes.
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	go c.Write([]byte(strings.Repeat(one, 100) + "GARBAGE\r\n\r\n" + one))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	var codes []int
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Errorf("connection not closed after the garbage request")
			}
			break
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		codes = append(codes, resp.StatusCode)
	}
	if len(codes) != 101 || codes[99] != 200 || codes[100] != 400 {
		t.Errorf("100 requests, garbage, 1 request: got %d answers ending %v, want 100 x 200 then 400 and close", len(codes), codes[max(0, len(codes)-3):])
	}
}
