package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Targets of the Agent API issue, at 10,000 chats in flight.
const (
	targetAPIHealthP99     = 5 * time.Millisecond
	targetAPIActivitiesP99 = 20 * time.Millisecond
	targetAPIBytesPerChat  = 40_000 // 40 KB of RSS per chat in flight
)

// apiLatency is how long each chat of the in-flight phases takes in the
// simulated LLM.
const apiLatency = 30 * time.Second

// apiPhase is one wave of long chats held in flight on a fresh 2-worker
// server, with sequential probes of /health and /api/activities before and
// during it.
type apiPhase struct {
	Chats int // chats sent at once
	// Started counts chat.started activities when the probes began; it is
	// what the server reports in flight (a chat is in its LLM call as soon
	// as its start is recorded).
	Started int
	// StatusInFlight is the sum of in_flight in `server status --json`
	// (values up to one heartbeat old), read once Started reached Chats.
	StatusInFlight int
	Sent           time.Duration // first dial -> last request written
	AllStarted     time.Duration // first dial -> Started reached Chats
	// AnsweredBefore and AnsweredAfter count chats answered (or failed) on
	// the client side when the probes began and ended: 0 and 0 means every
	// chat was in flight throughout.
	AnsweredBefore, AnsweredAfter int
	Idle, Loaded                  probeSet
	RSSBefore, RSSDuring          int   // KiB, master + workers
	RSSDuringProcs                []int // KiB, master first
	BytesPerChat                  float64
	Chat                          latencyStats // every chat, sent to answered
	// Activities counts the activities written from the phase's first chat
	// on, by type, once every chat has ended.
	Activities map[string]int
}

// probeSet is one run of sequential probes.
type probeSet struct {
	Health, Activities latencyStats
}

// chatRateRound is one closed-loop run of chats with SIMULATED_LATENCY=0.
type chatRateRound struct {
	Chats, Clients int
	Elapsed        time.Duration
	PerSecond      float64 // chats answered 200 per second
	Latency        latencyStats
	Activities     map[string]int
	PerChat        float64 // activities written per chat answered 200
}

// apiResult is the Agent API scenario.
type apiResult struct {
	Workers     int
	Probes      int
	Phases      []apiPhase
	Rate        []chatRateRound
	MedianRate  float64
	RateClients int
	FdLimit     string // the driver's RLIMIT_NOFILE, soft/hard
}

// api runs the Agent API scenario: b.chatWaves of 30 s chats in flight on
// 2 workers, then the chat rate with an instant simulated LLM.
func (b *bench) api() error {
	res := &apiResult{Workers: 2, Probes: b.probes, RateClients: b.rateClients, FdLimit: fdLimit()}
	b.res.API = res
	for _, n := range b.chatWaves {
		ph, err := b.apiWave(n)
		res.Phases = append(res.Phases, ph)
		if err != nil {
			return err
		}
	}
	t, err := b.startServer("api-rate", serverOpts{workers: 2, env: []string{"SIMULATED_LATENCY=0", "TIMEOUT_GRACEFUL_SHUTDOWN=5s"}})
	if err != nil {
		return err
	}
	defer func() { t.stop(); delete(b.live, t) }()
	cl := apiClient(b.rateClients)
	chatRate(cl, t.addr, 100, b.rateClients) // warm-up: pools, page cache, statements
	var rates []float64
	for range b.rateRounds {
		last, err := lastActivityID(cl, t.addr)
		if err != nil {
			return err
		}
		r := chatRate(cl, t.addr, b.rateChats, b.rateClients)
		if r.Activities, err = activitiesByType(cl, t.addr, last); err != nil {
			return err
		}
		total := 0
		for _, v := range r.Activities {
			total += v
		}
		if ok := r.Latency.Count - r.Latency.Failed; ok > 0 {
			r.PerChat = float64(total) / float64(ok)
		}
		fmt.Fprintf(os.Stderr, "  chat rate: %.0f chats/s, %d failed, %.2f activities per chat\n", r.PerSecond, r.Latency.Failed, r.PerChat)
		res.Rate = append(res.Rate, r)
		rates = append(rates, r.PerSecond)
	}
	res.MedianRate = median(rates)
	return nil
}

// apiWave holds n chats in flight on a fresh server and probes it.
func (b *bench) apiWave(n int) (apiPhase, error) {
	ph := apiPhase{Chats: n}
	label := fmt.Sprintf("api-%d", n)
	t, err := b.startServer(label, serverOpts{workers: 2, env: []string{
		"SIMULATED_LATENCY=" + apiLatency.String(),
		// Chats still running at the end are cut, not awaited for 75 s.
		"TIMEOUT_GRACEFUL_SHUTDOWN=5s",
	}})
	if err != nil {
		return ph, err
	}
	defer func() { t.stop(); delete(b.live, t) }()
	cl := apiClient(4)
	ph.Idle = probe(t.addr, b.probes)
	if ph.RSSBefore, _, err = treeRSS(t.pid()); err != nil {
		return ph, err
	}
	first, err := lastActivityID(cl, t.addr)
	if err != nil {
		return ph, err
	}

	wave := startChats(t.addr, n, 256, apiLatency+60*time.Second)
	// Wait until the server has recorded every chat's start; give up when
	// the first chats end (the window has closed) or after the chats'
	// latency.
	cursor := first
	deadline := time.Now().Add(apiLatency)
	for ph.Started < n && wave.answered.Load() == 0 && time.Now().Before(deadline) {
		k, next, err := countActivities(cl, t.addr, "chat.started", cursor)
		if err != nil {
			break
		}
		ph.Started += k
		cursor = next
		if ph.Started < n {
			time.Sleep(100 * time.Millisecond)
		}
	}
	ph.AllStarted = time.Since(wave.begun)
	ph.Sent = time.Duration(wave.sentAt.Load() - wave.begun.UnixNano())
	fmt.Fprintf(os.Stderr, "  %d chats: written in %v, %d started after %v\n", n, ph.Sent.Round(time.Millisecond), ph.Started, ph.AllStarted.Round(time.Millisecond))
	ph.StatusInFlight = b.statusInFlight(filepath.Join(b.tmp, label+".sock"), ph.Started, 5*time.Second)

	ph.AnsweredBefore = int(wave.answered.Load())
	ph.RSSDuring, ph.RSSDuringProcs, _ = treeRSS(t.pid())
	ph.Loaded = probe(t.addr, b.probes)
	ph.AnsweredAfter = int(wave.answered.Load())
	if k, _, err := treeRSS(t.pid()); err == nil && k > ph.RSSDuring {
		ph.RSSDuring = k // the larger of the two samples
	}
	if inFlight := ph.Started - ph.AnsweredBefore; inFlight > 0 {
		ph.BytesPerChat = float64(ph.RSSDuring-ph.RSSBefore) * 1024 / float64(inFlight)
	}
	fmt.Fprintf(os.Stderr, "  %d in flight: /health p99 %v, /api/activities p99 %v, RSS %s -> %s\n", n,
		ph.Loaded.Health.P99, ph.Loaded.Activities.P99, mib(ph.RSSBefore), mib(ph.RSSDuring))

	reqs := wave.wait()
	writeRequests(filepath.Join(b.out, label+"-chats.csv"), reqs)
	ph.Chat = statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
	ph.Activities, err = activitiesByType(cl, t.addr, first)
	return ph, err
}

// probe sends count GET /health, then count GET /api/activities, one at a
// time, each on a new connection.
func probe(addr string, count int) probeSet {
	var ps probeSet
	for i, req := range [][]byte{healthRequest, activitiesRequest} {
		reqs := make([]request, 0, count)
		for range count {
			reqs = append(reqs, send(addr, req, 5*time.Second))
		}
		s := statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
		if i == 0 {
			ps.Health = s
		} else {
			ps.Activities = s
		}
	}
	return ps
}

var activitiesRequest = []byte("GET /api/activities HTTP/1.1\r\nHost: localhost\r\nUser-Agent: procbench\r\nConnection: close\r\n\r\n")

// chatWave is n chats sent at once, each on its own connection, whose
// answers are collected as they arrive.
type chatWave struct {
	begun    time.Time
	sentAt   atomic.Int64 // unix ns of the last request written
	answered atomic.Int64 // chats that got an answer or failed
	mu       sync.Mutex
	reqs     []request
	wg       sync.WaitGroup
}

// startChats sends n chats, with at most dialers connections being opened
// at a time so that the listen queues do not overflow, and returns at once.
// Each chat has timeout from its start to its answer.
func startChats(addr string, n, dialers int, timeout time.Duration) *chatWave {
	w := &chatWave{begun: time.Now()}
	sem := make(chan struct{}, dialers)
	w.wg.Add(n)
	go func() {
		for i := range n {
			sem <- struct{}{}
			go func() {
				defer w.wg.Done()
				r := w.chat(addr, chatRequest(i), timeout, func() { <-sem })
				w.answered.Add(1)
				w.mu.Lock()
				w.reqs = append(w.reqs, r)
				w.mu.Unlock()
			}()
		}
	}()
	return w
}

// wait waits for every chat's end and returns them sorted by start.
func (w *chatWave) wait() []request {
	w.wg.Wait()
	w.mu.Lock()
	defer w.mu.Unlock()
	slices.SortFunc(w.reqs, func(a, b request) int { return a.Start.Compare(b.Start) })
	return w.reqs
}

// chat sends one chat on a new connection and reads the answer to EOF;
// written runs once, when the request is written or has failed.
func (w *chatWave) chat(addr string, req []byte, timeout time.Duration, written func()) request {
	r := request{Start: time.Now()}
	once := sync.OnceFunc(written)
	defer once()
	fail := func(kind string, err error) request {
		r.Latency = time.Since(r.Start)
		r.Err = kind
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			r.Err = "timeout"
		}
		return r
	}
	c, err := net.DialTimeout("tcp4", addr, 10*time.Second)
	if err != nil {
		return fail("connect", err)
	}
	defer c.Close()
	c.SetDeadline(r.Start.Add(timeout))
	if _, err := c.Write(req); err != nil {
		return fail("write", err)
	}
	w.sentAt.Store(time.Now().UnixNano())
	once()
	body, err := io.ReadAll(io.LimitReader(c, 1<<20))
	r.Status, _ = parseResponse(body)
	if err != nil {
		return fail("read", err)
	}
	r.Latency = time.Since(r.Start)
	if r.Status == 0 {
		r.Err = "bad response"
	}
	return r
}

// chatRequest is a non-streamed POST /api/chat to the default agent, on a
// connection closed after the answer.
func chatRequest(i int) []byte {
	body := `{"agent_id":"default","message":"procbench chat ` + strconv.Itoa(i) + `: how long is a piece of string?"}`
	return []byte("POST /api/chat HTTP/1.1\r\nHost: localhost\r\nUser-Agent: procbench\r\nContent-Type: application/json\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\nConnection: close\r\n\r\n" + body)
}

// chatRate sends total chats from clients keep-alive connections, each
// client sending its next chat when the last is answered.
func chatRate(cl *http.Client, addr string, total, clients int) chatRateRound {
	r := chatRateRound{Chats: total, Clients: clients}
	var (
		next atomic.Int64
		mu   sync.Mutex
		reqs = make([]request, 0, total)
		wg   sync.WaitGroup
	)
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := next.Add(1)
				if i > int64(total) {
					return
				}
				q := postChat(cl, addr, int(i))
				mu.Lock()
				reqs = append(reqs, q)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	r.Elapsed = time.Since(start)
	r.Latency = statsBetween(reqs, time.Time{}, time.Now().Add(time.Hour))
	r.PerSecond = float64(r.Latency.Count-r.Latency.Failed) / r.Elapsed.Seconds()
	return r
}

func postChat(cl *http.Client, addr string, i int) request {
	body := `{"agent_id":"default","message":"procbench chat ` + strconv.Itoa(i) + `: how long is a piece of string?"}`
	q := request{Start: time.Now()}
	resp, err := cl.Post("http://"+addr+"/api/chat", "application/json", strings.NewReader(body))
	if err != nil {
		q.Latency, q.Err = time.Since(q.Start), "connect"
		return q
	}
	_, err = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	q.Latency, q.Status = time.Since(q.Start), resp.StatusCode
	if err != nil {
		q.Err = "read"
	}
	return q
}

// apiClient is a keep-alive HTTP client for up to conns connections.
func apiClient(conns int) *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		MaxIdleConns: conns, MaxIdleConnsPerHost: conns, MaxConnsPerHost: 0,
		DialContext: (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
	}}
}

// activityPage is the part of GET /api/activities the driver reads.
type activityPage struct {
	Activities []struct {
		ID   int64  `json:"id"`
		Type string `json:"type"`
	} `json:"activities"`
	NextAfter int64 `json:"next_after"`
}

func activities(cl *http.Client, addr, query string) (activityPage, error) {
	var p activityPage
	resp, err := cl.Get("http://" + addr + "/api/activities?" + query)
	if err != nil {
		return p, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return p, err
	}
	if resp.StatusCode != http.StatusOK {
		return p, fmt.Errorf("GET /api/activities?%s: status %d: %s", query, resp.StatusCode, bytes.TrimSpace(body))
	}
	return p, json.Unmarshal(body, &p)
}

// countActivities counts the activities of type typ after the id after,
// page by page, and returns the count and the cursor to continue from.
func countActivities(cl *http.Client, addr, typ string, after int64) (int, int64, error) {
	n := 0
	for {
		p, err := activities(cl, addr, "limit=500&type="+typ+"&after="+strconv.FormatInt(after, 10))
		if err != nil {
			return n, after, err
		}
		n += len(p.Activities)
		after = p.NextAfter
		if len(p.Activities) < 500 {
			return n, after, nil
		}
	}
}

// activitiesByType counts every activity after the id after, by type.
func activitiesByType(cl *http.Client, addr string, after int64) (map[string]int, error) {
	out := map[string]int{}
	for {
		p, err := activities(cl, addr, "limit=500&after="+strconv.FormatInt(after, 10))
		if err != nil {
			return out, err
		}
		for _, a := range p.Activities {
			out[a.Type]++
		}
		after = p.NextAfter
		if len(p.Activities) < 500 {
			return out, nil
		}
	}
}

// lastActivityID returns the newest activity's id.
func lastActivityID(cl *http.Client, addr string) (int64, error) {
	after := int64(0)
	for {
		p, err := activities(cl, addr, "limit=500&after="+strconv.FormatInt(after, 10))
		if err != nil {
			return after, err
		}
		after = p.NextAfter
		if len(p.Activities) < 500 {
			return after, nil
		}
	}
}

// statusInFlight polls `server status --json` until its workers' in_flight
// sum reaches want (heartbeats refresh it) or timeout passes, and returns
// the last sum; -1 if the command failed.
func (b *bench) statusInFlight(sock string, want int, timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	sum := -1
	for {
		out, err := exec.Command(b.server, "status", "--json", "--control-socket", sock).Output()
		if err != nil {
			return sum
		}
		var st struct {
			Workers []struct {
				InFlight int `json:"in_flight"`
			} `json:"workers"`
		}
		if json.Unmarshal(out, &st) != nil {
			return sum
		}
		sum = 0
		for _, w := range st.Workers {
			sum += w.InFlight
		}
		if sum >= want || time.Now().After(deadline) {
			return sum
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// treeRSS sums VmRSS of pid and its children; it also returns each, pid's
// first.
func treeRSS(pid int) (int, []int, error) {
	k, err := rssKiB(pid)
	if err != nil {
		return 0, nil, err
	}
	total, each := k, []int{k}
	for _, c := range children(pid) {
		if k, err := rssKiB(c); err == nil {
			total += k
			each = append(each, k)
		}
	}
	return total, each, nil
}

// fdLimit reports this process's RLIMIT_NOFILE as "soft/hard".
func fdLimit() string {
	b, err := os.ReadFile("/proc/self/limits")
	if err != nil {
		return "?"
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Max open files"); ok {
			f := strings.Fields(rest)
			if len(f) >= 2 {
				return f[0] + "/" + f[1]
			}
		}
	}
	return "?"
}

// markdown writes the scenario's tables.
func (a *apiResult) markdown(p func(string, ...any)) {
	p("## h. Agent API: long chats in flight, %d workers, SIMULATED_LATENCY=%s\n\n", a.Workers, apiLatency)
	p("Sequential probes: %d GET /health, then %d GET /api/activities, one at a time, each on a new connection. Driver fd limit %s.\n\n", a.Probes, a.Probes, a.FdLimit)
	p("| chats sent | written in | all started after | in flight at the probes: chat.started / status in_flight / answered before, after | RSS before | RSS while in flight (master, workers) | RSS per chat in flight | target < 40 KB |\n")
	p("|---|---|---|---|---|---|---|---|\n")
	for _, ph := range a.Phases {
		each := make([]string, len(ph.RSSDuringProcs))
		for i, k := range ph.RSSDuringProcs {
			each[i] = mib(k)
		}
		target := ""
		if ph.Started > 0 {
			target = passFail(ph.BytesPerChat < targetAPIBytesPerChat && ph.Started >= ph.Chats && ph.AnsweredAfter == 0)
		}
		p("| %d | %s | %s | %d / %d / %d, %d | %s | %s (%s) | %.1f KB | %s |\n", ph.Chats, fms(ph.Sent), fms(ph.AllStarted),
			ph.Started, ph.StatusInFlight, ph.AnsweredBefore, ph.AnsweredAfter, mib(ph.RSSBefore), mib(ph.RSSDuring),
			strings.Join(each, ", "), ph.BytesPerChat/1000, target)
	}
	p("\n| chats in flight | route | requests | p50 | p99 | max | failed | target p99 |\n|---|---|---|---|---|---|---|---|\n")
	row := func(label, route string, s latencyStats, target time.Duration, judge bool) {
		t := ""
		if judge {
			t = fmt.Sprintf("< %s: %s", fms(target), passFail(s.P99 < target && s.Failed == 0))
		}
		p("| %s | %s | %d | %s | %s | %s | %d%s | %s |\n", label, route, s.Count, fms(s.P50), fms(s.P99), fms(s.Max), s.Failed, errText(s.Errors), t)
	}
	for _, ph := range a.Phases {
		label := fmt.Sprintf("0 (before the %d)", ph.Chats)
		row(label, "GET /health", ph.Idle.Health, 0, false)
		row(label, "GET /api/activities", ph.Idle.Activities, 0, false)
		big := ph.Chats >= 10000
		row(strconv.Itoa(ph.Started), "GET /health", ph.Loaded.Health, targetAPIHealthP99, big)
		row(strconv.Itoa(ph.Started), "GET /api/activities", ph.Loaded.Activities, targetAPIActivitiesP99, big)
	}
	p("\nHow the long chats ended (client side, sent to answered) and the activities written from the first chat on:\n\n")
	p("| chats sent | answered 200 | failed | chat time p50 | p99 | max | activities by type | activities per chat |\n|---|---|---|---|---|---|---|---|\n")
	for _, ph := range a.Phases {
		total := 0
		for _, v := range ph.Activities {
			total += v
		}
		per := 0.0
		if ph.Chats > 0 {
			per = float64(total) / float64(ph.Chats)
		}
		p("| %d | %d | %d%s | %s | %s | %s | %s | %.2f |\n", ph.Chats, ph.Chat.Count-ph.Chat.Failed, ph.Chat.Failed, errText(ph.Chat.Errors),
			fms(ph.Chat.P50), fms(ph.Chat.P99), fms(ph.Chat.Max), typeList(ph.Activities), per)
	}
	if len(a.Rate) > 0 {
		p("\nChat rate with SIMULATED_LATENCY=0, %d workers, %d keep-alive clients each sending its next chat when answered:\n\n", a.Workers, a.RateClients)
		p("| round | chats | elapsed | chats/s (200 only) | p50 | p99 | max | failed | activities by type | activities per chat |\n|---|---|---|---|---|---|---|---|---|---|\n")
		for i, r := range a.Rate {
			p("| %d | %d | %s | %.0f | %s | %s | %s | %d%s | %s | %.2f |\n", i+1, r.Chats, fms(r.Elapsed), r.PerSecond,
				fms(r.Latency.P50), fms(r.Latency.P99), fms(r.Latency.Max), r.Latency.Failed, errText(r.Latency.Errors), typeList(r.Activities), r.PerChat)
		}
		p("| **median** | | | **%.0f** | | | | | | |\n", a.MedianRate)
	}
	p("\n")
}

// typeList formats counts by type, types sorted: "chat.completed 1000, ...".
func typeList(m map[string]int) string {
	if len(m) == 0 {
		return "none"
	}
	return strings.Trim(errList(m), "()")
}
