// Command jobbench measures background chats against running servers it
// starts itself: chats accepted per second (SQLite and PostgreSQL), the
// /health and /api/activities p99 while 10,000 chats are queued and 1,000
// run, the time from a worker's death to its chat running again, and the
// latency (sync) and throughput (syncrate) of synchronous chats on this
// build against another build, and what streaming background chats cost
// in stored rows and CPU (deltas), in alternated rounds (-rounds).
//
//	go run ./bench/jobbench -server ./server [-base ./server-before] [-pg postgres://...]
//
// Every server listens on loopback; every loop is bounded.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

var client = &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: 512}}

func main() {
	server := flag.String("server", "./server", "the server binary to measure")
	base := flag.String("base", "", "a baseline build for the synchronous chat latency (A/B)")
	pg := flag.String("pg", "", "a PostgreSQL database URL (emptied first) for the PostgreSQL runs")
	run := flag.String("run", "accept,load,death,sync,syncrate,deltas", "scenarios")
	rounds := flag.Int("rounds", 3, "alternated rounds of the A/B scenarios (sync, syncrate)")
	flag.Parse()
	want := func(s string) bool { return slices.Contains(strings.Split(*run, ","), s) }
	if want("accept") {
		accept(*server, "")
		if *pg != "" {
			accept(*server, *pg)
		}
	}
	if want("load") {
		load(*server)
	}
	if want("death") {
		death(*server)
	}
	if want("sync") && *base != "" {
		syncAB(*server, *base, *rounds)
	}
	if want("syncrate") && *base != "" {
		syncRateAB(*server, *base, *rounds)
	}
	if want("deltas") && *base != "" {
		deltasAB(*server, *base, *rounds)
	}
}

type proc struct {
	cmd  *exec.Cmd
	port int
	dir  string
}

// start runs bin with env on a free loopback port and waits for /health.
func start(bin string, env ...string) *proc {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir, err := os.MkdirTemp("", "jobbench")
	check(err)
	cmd := exec.Command(bin)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HOST=127.0.0.1", "PORT="+strconv.Itoa(port), "LOG_FORMAT=json", "LOG_LEVEL=warning",
		"ACCESS_LOG=false", "DATABASE_URL=sqlite:"+filepath.Join(dir, "server.db"))
	cmd.Env = append(cmd.Env, env...)
	logf, err := os.Create(filepath.Join(dir, "server.log"))
	check(err)
	cmd.Stdout, cmd.Stderr = logf, logf
	check(cmd.Start())
	p := &proc{cmd: cmd, port: port, dir: dir}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := client.Get(p.url("/health")); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return p
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	p.stop()
	panic("server did not start; see " + logf.Name())
}

func (p *proc) url(path string) string { return "http://127.0.0.1:" + strconv.Itoa(p.port) + path }

func (p *proc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
	os.RemoveAll(p.dir)
}

func post(u, body string) (int, []byte, error) {
	resp, err := client.Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b, nil
}

// postMany posts n background chats from c clients and returns the rate
// of 202s and the count of other answers.
func postMany(p *proc, n, c int) (float64, int) {
	return postChats(p, n, c, true)
}

// syncMany posts n synchronous chats from c clients and returns the rate
// and the count of answers other than 200.
func syncMany(p *proc, n, c int) (float64, int) {
	return postChats(p, n, c, false)
}

// postChats posts n chats from c clients, background or synchronous.
func postChats(p *proc, n, c int, background bool) (float64, int) {
	body, want := `{"agent_id":"default","message":"sync %d"}`, 200
	if background {
		body, want = `{"agent_id":"default","message":"job %d","background":true}`, 202
	}
	var next, failed atomic.Int64
	var wg sync.WaitGroup
	t0 := time.Now()
	for range c {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(n) {
					return
				}
				code, _, err := post(p.url("/api/chat"), fmt.Sprintf(body, i))
				if err != nil || code != want {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	return float64(n) / time.Since(t0).Seconds(), int(failed.Load())
}

// accept: background chats accepted per second, 4 workers, 64 clients;
// the chats take 10 minutes each so the queue only grows.
func accept(bin, pg string) {
	env := []string{"WORKERS=4", "SIMULATED_LATENCY=600s", "CHAT_QUEUE_MAX=0", "CHAT_CONCURRENCY=16"}
	name := "sqlite"
	if pg != "" {
		env = append(env, "DATABASE_URL="+pg)
		name = "postgres"
	}
	p := start(bin, env...)
	postMany(p, 500, 64) // warm up
	for i := range 3 {
		rate, failed := postMany(p, 3000, 64)
		fmt.Printf("accept %s run %d: %.0f background chats/s accepted (3000 posts, 64 clients, %d failed)\n", name, i+1, rate, failed)
	}
	p.stop()
	// The same clients posting synchronous chats that answer at once: the
	// store's write path without the job.
	env = append(env, "SIMULATED_LATENCY=0")
	p = start(bin, env...)
	defer p.stop()
	for i := range 2 {
		rate, failed := syncMany(p, 3000, 64)
		fmt.Printf("accept %s sync run %d: %.0f synchronous chats/s answered (same clients, no LLM latency, %d failed)\n", name, i+1, rate, failed)
	}
}

// probe measures GET path every interval for d and returns p50 and p99.
func probe(u string, d, every time.Duration) (time.Duration, time.Duration, int) {
	var lat []time.Duration
	errs := 0
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		t0 := time.Now()
		resp, err := client.Get(u)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 {
				errs++
			}
		} else {
			errs++
		}
		lat = append(lat, time.Since(t0))
		time.Sleep(every)
	}
	slices.Sort(lat)
	return lat[len(lat)/2], lat[len(lat)*99/100], errs
}

// load: /health and /api/activities while idle, then while 10,000 chats
// are queued and 1,000 run (4 workers x 250), the running ones streaming
// deltas that the workers write in batches.
func load(bin string) {
	p := start(bin, "WORKERS=4", "CHAT_CONCURRENCY=250", "CHAT_QUEUE_MAX=0", "SIMULATED_LATENCY=60s")
	defer p.stop()
	report := func(label string) {
		h50, h99, he := probe(p.url("/health"), 10*time.Second, 20*time.Millisecond)
		a50, a99, ae := probe(p.url("/api/activities?limit=50"), 10*time.Second, 20*time.Millisecond)
		fmt.Printf("load %s: /health p50 %v p99 %v (%d errors); /api/activities p50 %v p99 %v (%d errors)\n",
			label, h50.Round(10*time.Microsecond), h99.Round(10*time.Microsecond), he, a50.Round(10*time.Microsecond), a99.Round(10*time.Microsecond), ae)
	}
	report("idle")
	rate, failed := postMany(p, 11000, 64)
	fmt.Printf("load: 11000 background chats posted at %.0f/s (%d failed)\n", rate, failed)
	deadline := time.Now().Add(60 * time.Second)
	var q map[string]string
	for time.Now().Before(deadline) {
		q = queueState(p)
		if q["running"] == "1000" {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	fmt.Printf("load: queue %v\n", q)
	report("10000 queued + 1000 running")
	fmt.Printf("load: queue after %v\n", queueState(p))
	out, _ := exec.Command("sqlite3", filepath.Join(p.dir, "server.db"),
		"SELECT count(*), sum(length(text)) FROM chat_events").Output()
	fmt.Printf("load: stored delta batches (rows, bytes): %s", out)
}

// queueState counts chats by status straight from the database file.
func queueState(p *proc) map[string]string {
	out, err := exec.Command("sqlite3", filepath.Join(p.dir, "server.db"),
		"SELECT status, count(*) FROM chats GROUP BY status").Output()
	m := map[string]string{}
	if err != nil {
		m["error"] = err.Error()
		return m
	}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if k, v, ok := strings.Cut(l, "|"); ok {
			m[k] = v
		}
	}
	return m
}

type chat struct {
	ID       string `json:"id"`
	Status   string `json:"status"`
	PID      int    `json:"pid"`
	Attempts int    `json:"attempts"`
}

func getChat(p *proc, id string) chat {
	var c chat
	resp, err := client.Get(p.url("/api/chats/" + id))
	if err == nil {
		json.NewDecoder(resp.Body).Decode(&c)
		resp.Body.Close()
	}
	return c
}

// death: kill -9 the worker running a chat; time until it runs again.
func death(bin string) {
	p := start(bin, "WORKERS=4", "SIMULATED_LATENCY=30s")
	defer p.stop()
	var times []time.Duration
	for i := range 10 {
		_, b, err := post(p.url("/api/chat"), fmt.Sprintf(`{"agent_id":"default","message":"death %d","background":true}`, i))
		check(err)
		var c chat
		json.Unmarshal(b, &c)
		var first chat
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
			if first = getChat(p, c.ID); first.Status == "running" {
				break
			}
		}
		t0 := time.Now()
		syscall.Kill(first.PID, syscall.SIGKILL)
		for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(2 * time.Millisecond) {
			if again := getChat(p, c.ID); again.Status == "running" && again.PID != first.PID {
				times = append(times, time.Since(t0))
				break
			}
		}
		// let the killed slot come back before the next round
		time.Sleep(time.Second)
	}
	slices.Sort(times)
	fmt.Printf("death: kill -9 to running again, %d runs: min %v median %v max %v\n", len(times),
		times[0].Round(time.Millisecond), times[len(times)/2].Round(time.Millisecond), times[len(times)-1].Round(time.Millisecond))
}

// syncAB: sequential synchronous chats (simulated provider, no latency)
// on this build and a baseline build, alternated in rounds.
func syncAB(bin, base string, rounds int) {
	measure := func(b string) []time.Duration {
		p := start(b, "WORKERS=4", "SIMULATED_LATENCY=0")
		defer p.stop()
		var lat []time.Duration
		for i := range 1100 {
			t0 := time.Now()
			code, _, err := post(p.url("/api/chat"), fmt.Sprintf(`{"agent_id":"default","message":"sync %d"}`, i))
			if err != nil || code != 200 {
				panic(fmt.Sprint("sync chat: ", code, err))
			}
			if i >= 100 {
				lat = append(lat, time.Since(t0))
			}
		}
		slices.Sort(lat)
		return lat
	}
	for round := range rounds {
		for _, b := range []struct{ name, bin string }{{"before", base}, {"after", bin}} {
			lat := measure(b.bin)
			fmt.Printf("sync round %d %s: median %v p99 %v (1000 sequential chats)\n", round+1, b.name,
				lat[len(lat)/2].Round(time.Microsecond), lat[len(lat)*99/100].Round(time.Microsecond))
		}
	}
}

// syncRateAB: synchronous chats answered per second by this build and by
// base, alternated, each round on a fresh server (2 workers, 16 clients,
// 3,000 chats after 300 warm-up, no LLM latency); prints each round's
// rates, their ratio and the medians.
func syncRateAB(bin, base string, rounds int) {
	measure := func(b string) float64 {
		p := start(b, "WORKERS=2", "SIMULATED_LATENCY=0")
		defer p.stop()
		syncMany(p, 300, 16)
		rate, failed := syncMany(p, 3000, 16)
		if failed > 0 {
			panic(fmt.Sprintf("%d synchronous chats failed", failed))
		}
		return rate
	}
	var before, after, ratios []float64
	for round := range rounds {
		b := measure(base)
		a := measure(bin)
		before, after, ratios = append(before, b), append(after, a), append(ratios, a/b)
		fmt.Printf("syncrate round %d: before %.0f/s after %.0f/s ratio %.2f\n", round+1, b, a, a/b)
	}
	med := func(v []float64) float64 { v = slices.Clone(v); slices.Sort(v); return v[len(v)/2] }
	fmt.Printf("syncrate medians: before %.0f/s after %.0f/s ratio %.2f (%d rounds)\n", med(before), med(after), med(ratios), rounds)
}

// deltasAB: 200 background chats at once on 2 workers, each streaming 200
// tokens from an OpenAI-style endpoint, one every 20 ms (4 s a chat), on
// this build and on base, alternated: rows stored in chat_events per chat,
// CPU of the server (master and workers) per chat, and /health p99 while
// they stream.
func deltasAB(bin, base string, rounds int) {
	const chats, tokens, every = 200, 200, 20 * time.Millisecond
	llm := streamingLLM(tokens, every)
	defer llm.Close()
	measure := func(b string) (rows float64, cpu time.Duration, p99 time.Duration) {
		p := start(b, "WORKERS=2", "LLM_BASE_URL="+llm.URL+"/v1", "LLM_API_KEY=bench")
		defer p.stop()
		cpu0 := serverCPU(p.cmd.Process.Pid)
		ids := make([]string, chats)
		for i := range ids {
			code, body, err := post(p.url("/api/chat"), fmt.Sprintf(`{"agent_id":"default","message":"stream %d","background":true}`, i))
			if err != nil || code != http.StatusAccepted {
				panic(fmt.Sprint("background chat: ", code, err, string(body)))
			}
			var c chat
			json.Unmarshal(body, &c)
			ids[i] = c.ID
		}
		probed := make(chan time.Duration, 1)
		go func() {
			_, p99, _ := probe(p.url("/health"), 3*time.Second, 20*time.Millisecond)
			probed <- p99
		}()
		for _, id := range ids {
			resp, err := client.Get(p.url("/api/chats/" + id + "?wait=60"))
			check(err)
			var c chat
			json.NewDecoder(resp.Body).Decode(&c)
			resp.Body.Close()
			if c.Status != "completed" {
				panic(fmt.Sprintf("chat %s: %s", id, c.Status))
			}
		}
		cpu = serverCPU(p.cmd.Process.Pid) - cpu0
		out, err := exec.Command("sqlite3", filepath.Join(p.dir, "server.db"), "SELECT count(*) FROM chat_events").Output()
		check(err)
		n, err := strconv.Atoi(strings.TrimSpace(string(out)))
		check(err)
		return float64(n) / chats, cpu / chats, <-probed
	}
	for round := range rounds {
		for _, b := range []struct{ name, bin string }{{"base", base}, {"this", bin}} {
			rows, cpu, p99 := measure(b.bin)
			fmt.Printf("deltas round %d %s: %.1f rows per chat (%d tokens), CPU %v per chat, /health p99 %v\n",
				round+1, b.name, rows, tokens, cpu.Round(10*time.Microsecond), p99.Round(10*time.Microsecond))
		}
	}
}

// streamingLLM serves POST /v1/chat/completions as OpenAI does with
// "stream": true: tokens content deltas, one every every, then the finish
// and usage chunks.
func streamingLLM(tokens int, every time.Duration) *httptest.Server {
	chunk := func(delta string, finish any, usage any) string {
		choices := []any{map[string]any{"index": 0, "delta": map[string]any{"content": delta}, "finish_reason": finish}}
		if usage != nil {
			choices = []any{}
		}
		b, _ := json.Marshal(map[string]any{"id": "bench", "object": "chat.completion.chunk", "model": "bench-1", "choices": choices, "usage": usage})
		return "data: " + string(b) + "\n\n"
	}
	return httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/event-stream")
		f := w.(http.Flusher)
		t := time.NewTicker(every)
		defer t.Stop()
		for i := range tokens {
			io.WriteString(w, chunk(fmt.Sprintf("token%d ", i), nil, nil))
			f.Flush()
			select {
			case <-t.C:
			case <-r.Context().Done():
				return
			}
		}
		io.WriteString(w, chunk("", "stop", nil))
		io.WriteString(w, chunk("", nil, map[string]int{"prompt_tokens": 5, "completion_tokens": tokens}))
		io.WriteString(w, "data: [DONE]\n\n")
	}))
}

// serverCPU is the user and system CPU time so far of process pid and its
// children (the master and its workers).
func serverCPU(pid int) time.Duration {
	var ticks int64
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, f := range stats {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		// Fields after the command, which is in parentheses and may hold spaces.
		i := strings.LastIndexByte(string(b), ')')
		fields := strings.Fields(string(b[i+2:]))
		self, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(f, "/proc/"), "/stat"))
		ppid, _ := strconv.Atoi(fields[1])
		if self != pid && ppid != pid {
			continue
		}
		u, _ := strconv.ParseInt(fields[11], 10, 64)
		s, _ := strconv.ParseInt(fields[12], 10, 64)
		ticks += u + s
	}
	return time.Duration(ticks) * 10 * time.Millisecond // USER_HZ is 100 on Linux
}

func check(err error) {
	if err != nil {
		panic(err)
	}
}
