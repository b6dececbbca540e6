package main

// The chaos run: four workers under a bounded mixed load while workers are
// killed, one is stopped, the master rolls them, scales up and down; then
// nothing may be lost. `make test` runs it for 15 s; `make chaos` for 60 s
// with CORRAL_CHAOS_DURATION=60s and writes the summary table to the file
// named by CORRAL_CHAOS_REPORT.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/corralhq/corral/handlers"
)

// chaosReq is one request of the load and how it ended.
type chaosReq struct {
	kind       string // health, poll, chat, stream
	msg        string // chats: the unique message
	start, end time.Time
	status     int
	last       string // streams: the last event (done, error; "" if cut)
	err        error
}

func (r chaosReq) failed() bool {
	return r.err != nil || r.status != 200 || r.kind == "stream" && r.last != "done"
}

// connLost reports whether err is what a client sees when the process
// holding its connection dies: a reset, or the connection closed early.
func connLost(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		err != nil && (strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "EOF"))
}

// kill is one worker death the run caused: from the signal until the master
// logged the exit.
type kill struct {
	pid      int
	how      string // SIGKILL, or SIGSTOP (then killed by the master as hung)
	from, to time.Time
}

// logTime is the time of a log line.
func logTime(l map[string]any) time.Time {
	s, _ := l["time"].(string)
	t, _ := time.Parse(time.RFC3339Nano, s)
	return t
}

// closing is a time span during which a scaled-down slot's socket may
// have closed.
type closing struct{ from, to time.Time }

// scaleDownClosings returns when scaled-down slots' sockets may have
// closed. The master closes its copy at "scaling down", but a socket lives
// on until the last worker holding it closes its listeners: the
// scaled-down worker, and the neighbour that also served it, which is
// rewired; each closes them when it starts draining and is gone when it
// exits. So: from each such worker's "worker draining" (or the "scaling
// down" itself) to its "worker exited".
func scaleDownClosings(s *server) []closing {
	var out []closing
	for _, l := range s.logs.find("scaling down", nil) {
		out = append(out, closing{logTime(l), logTime(l)})
	}
	for _, why := range []string{"scale_down", "rewire"} {
		for _, l := range s.logs.find("worker draining", map[string]any{"reason": why}) {
			c := closing{logTime(l), logTime(l).Add(2 * time.Second)}
			if e := s.logs.find("worker exited", map[string]any{"pid": l["pid"]}); len(e) > 0 {
				c.to = logTime(e[0])
			}
			out = append(out, c)
		}
		// A worker scaled away before it was ready never drains.
		for _, l := range s.logs.find("worker exited", map[string]any{"reason": why}) {
			out = append(out, closing{logTime(l), logTime(l)})
		}
	}
	return out
}

// inScaleDown reports whether r was cut while a scaled-down slot's socket
// was closing. With net.ipv4.tcp_migrate_req at 0 the kernel resets the
// connections still queued on it (docs/architecture.md). Log times have
// millisecond precision and are written after the fact, hence the margins.
func inScaleDown(r chaosReq, cs []closing) bool {
	for _, c := range cs {
		if r.start.Before(c.to.Add(50*time.Millisecond)) && r.end.After(c.from.Add(-100*time.Millisecond)) {
			return true
		}
	}
	return false
}

// tcpMigrateReq is net.ipv4.tcp_migrate_req ("0", "1", or "" if unknown).
func tcpMigrateReq() string {
	b, _ := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	return strings.TrimSpace(string(b))
}

func TestChaos(t *testing.T) {
	duration := 15 * time.Second
	if d, err := time.ParseDuration(os.Getenv("CORRAL_CHAOS_DURATION")); err == nil && d > 0 {
		duration = d
	}
	const workers = 4
	db := filepath.Join(t.TempDir(), "server.db")
	s := startServer(t, fmt.Sprintf("WORKERS=%d", workers), "SIMULATED_LATENCY=1s", "METRICS_ADDR=127.0.0.1:0", "TIMEOUT_WORKER_HEALTHCHECK=2s",
		"DATABASE_URL=sqlite:"+db, "CONTROL_SOCKET="+filepath.Join(t.TempDir(), "server.sock"))
	master := s.cmd.Process.Pid

	// The master's fds, threads and goroutines (from its own
	// go_goroutines{worker="master"} on /metrics) once it has settled: two
	// equal readings.
	goroutines := func() int {
		_, text := get(t, s.metricsURL(t)+"metrics", "")
		v, _ := sample(text, `go_goroutines{worker="master"}`)
		return int(v)
	}
	var fds0, threads0, goroutines0 int
	waitFor(t, 10*time.Second, func() error {
		a, b, g := procFDsButSQLite(master), procValue(master, "Threads"), goroutines()
		time.Sleep(300 * time.Millisecond) // two readings apart in time
		if c, d, h := procFDsButSQLite(master), procValue(master, "Threads"), goroutines(); a != c || b != d || g != h {
			return fmt.Errorf("master fds %d -> %d, threads %d -> %d, goroutines %d -> %d: still moving", a, c, b, d, g, h)
		}
		fds0, threads0, goroutines0 = a, b, g
		return nil
	})

	// ---- the load: bounded in time and count ----
	deadline := time.Now().Add(duration)
	var mu sync.Mutex
	var reqs []chaosReq
	record := func(r chaosReq) {
		r.end = time.Now()
		mu.Lock()
		reqs = append(reqs, r)
		mu.Unlock()
	}
	var load sync.WaitGroup
	keep := &http.Client{Timeout: 15 * time.Second}
	short := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	maxPer := int(duration/(10*time.Millisecond)) + 1 // a hard cap per goroutine
	for i := range 4 {                                // health checks, two on kept-alive connections
		c := short
		if i%2 == 0 {
			c = keep
		}
		load.Go(func() {
			for range maxPer {
				if time.Now().After(deadline) {
					return
				}
				r := chaosReq{kind: "health", start: time.Now()}
				if _, err := s.health(c); err != nil {
					r.err = err
				} else {
					r.status = 200
				}
				record(r)
				time.Sleep(10 * time.Millisecond) // pacing, not synchronization
			}
		})
	}
	for range 2 { // activity long-polls, 2 s each
		load.Go(func() {
			after := int64(0)
			for range maxPer {
				if time.Now().After(deadline) {
					return
				}
				r := chaosReq{kind: "poll", start: time.Now()}
				p, err := s.activities(fmt.Sprintf("after=%d&wait=2", after))
				if err != nil {
					r.err = err
				} else {
					r.status = 200
					after = max(after, p.NextAfter)
				}
				record(r)
			}
		})
	}
	var chatN sync.Mutex
	next := 0
	for range 6 { // chats of 1 s; every third one streamed
		load.Go(func() {
			for range maxPer {
				if time.Now().After(deadline) {
					return
				}
				chatN.Lock()
				n := next
				next++
				chatN.Unlock()
				stream := n%3 == 0
				r := chaosReq{kind: "chat", msg: fmt.Sprintf("chaos chat %d", n), start: time.Now()}
				if stream {
					r.kind = "stream"
				}
				rep := s.chat(short, r.msg, stream)
				r.status, r.last, r.err = rep.status, rep.event, rep.err
				record(r)
			}
		})
	}

	// Background chats, one every 200 ms: they must all end completed (or
	// failed after --chat-max-attempts), whatever dies under them.
	var bgMu sync.Mutex
	var background []string
	load.Go(func() {
		for i := range maxPer {
			if time.Now().After(deadline) {
				return
			}
			body := fmt.Sprintf(`{"agent_id":"default","message":"chaos background %d","background":true}`, i)
			if resp, err := short.Post(s.url("/api/chat"), "application/json", strings.NewReader(body)); err == nil {
				var c struct{ ID string }
				json.NewDecoder(resp.Body).Decode(&c)
				resp.Body.Close()
				if resp.StatusCode == 202 && c.ID != "" {
					bgMu.Lock()
					background = append(background, c.ID)
					bgMu.Unlock()
				}
			}
			time.Sleep(200 * time.Millisecond) // pacing, not synchronization
		}
	})

	// runningBackground is the pid of the worker running the latest
	// background chat, or 0.
	base := strings.TrimSuffix(s.url(""), "/")
	runningBackground := func() int {
		bgMu.Lock()
		var id string
		if n := len(background); n > 0 {
			id = background[n-1]
		}
		bgMu.Unlock()
		if id == "" {
			return 0
		}
		if c, err := getChat(base, id, 0); err == nil && c.Status == "running" {
			return c.PID
		}
		return 0
	}
	bgVictim := 0

	// ---- the chaos ----
	var kills []kill
	hups, ttin, ttou := 0, 0, 0
	var stopped int
	start := time.Now()
	rng := rand.New(rand.NewPCG(uint64(start.UnixNano()), 7))
	killTick := time.NewTicker(2 * time.Second)
	defer killTick.Stop()
	for now := range killTick.C {
		if now.After(deadline) {
			break
		}
		el := now.Sub(start)
		pids := s.workerPIDs()
		if len(pids) == 0 {
			continue
		}
		switch {
		case stopped == 0 && el >= duration/3:
			// Once: stop a worker; the master must find it hung and kill it.
			stopped = pids[rng.IntN(len(pids))]
			syscall.Kill(stopped, syscall.SIGSTOP)
			kills = append(kills, kill{pid: stopped, how: "SIGSTOP", from: time.Now()})
		default:
			victim := pids[rng.IntN(len(pids))]
			// The first kill that can takes the worker of a running
			// background chat, so that a retry is always seen.
			if bgVictim == 0 {
				if pid := runningBackground(); slices.Contains(pids, pid) {
					victim, bgVictim = pid, pid
				}
			}
			syscall.Kill(victim, syscall.SIGKILL)
			kills = append(kills, kill{pid: victim, how: "SIGKILL", from: time.Now()})
		}
		if el%(10*time.Second) < 2*time.Second && el >= 4*time.Second {
			s.cmd.Process.Signal(syscall.SIGHUP)
			hups++
		}
		if ttin == 0 && el >= duration*2/5 {
			s.cmd.Process.Signal(syscall.SIGTTIN)
			ttin++
		}
		if ttou == 0 && el >= duration*7/10 {
			s.cmd.Process.Signal(syscall.SIGTTOU)
			ttou++
		}
	}
	if stopped != 0 {
		t.Cleanup(func() { syscall.Kill(stopped, syscall.SIGKILL) })
	}
	load.Wait()
	loadEnd := time.Now()

	// ---- afterwards: the server settles back ----
	var settledIn time.Duration
	waitFor(t, 60*time.Second, func() error {
		if n := len(s.workerPIDs()); n != workers {
			return fmt.Errorf("%d workers, want %d", n, workers)
		}
		code, body := get(t, s.metricsURL(t)+"status.json", "")
		if code != 200 || strings.Count(body, `"state":"ready"`) != workers || !strings.Contains(body, `"state":"running"`) {
			return fmt.Errorf("status.json %d, want %d ready workers and running: %.600s", code, workers, body)
		}
		if z := zombiesOf(master); len(z) > 0 {
			return fmt.Errorf("zombies %v", z)
		}
		if f := procFDsButSQLite(master); f != fds0 {
			return fmt.Errorf("master has %d fds besides SQLite's, %d before the run", f, fds0)
		}
		if g := goroutines(); g != goroutines0 {
			return fmt.Errorf("master has %d goroutines, %d before the run", g, goroutines0)
		}
		settledIn = time.Since(loadEnd)
		return nil
	})
	fds1, threads1, goroutines1, workersAfter := procFDsButSQLite(master), procValue(master, "Threads"), goroutines(), len(s.workerPIDs())
	// The Go runtime keeps the OS threads it once needed (blocking
	// syscalls: fork, wait4), so threads are reported, and only checked
	// against a sanity bound.
	if threads1 > 64 {
		t.Errorf("master threads %d -> %d, want a few dozen at most", threads0, threads1)
	}
	// Every background chat ends: none stays queued or running, none is
	// lost.
	bgEnds := map[string]int{}
	for _, id := range background {
		var c chatState
		waitFor(t, 60*time.Second, func() error {
			var err error
			if c, err = getChat(base, id, 10); err != nil || (c.Status != "completed" && c.Status != "failed") {
				return fmt.Errorf("background chat %s = %+v, %v, want completed or failed", id, c, err)
			}
			return nil
		})
		if c.Status == "failed" && c.Attempts < handlers.DefaultChatMaxAttempts {
			t.Errorf("background chat %s failed after %d attempts (%+v), want completed or %d attempts", id, c.Attempts, c.Error, handlers.DefaultChatMaxAttempts)
		}
		bgEnds[c.Status]++
		if c.Attempts > 1 {
			bgEnds["retried"]++
		}
	}
	if len(background) == 0 {
		t.Errorf("no background chat was accepted")
	}
	if bgVictim != 0 && bgEnds["retried"] == 0 {
		t.Errorf("worker %d was killed under a background chat, yet no background chat ran more than once: %v", bgVictim, bgEnds)
	}
	t.Logf("background chats: %d accepted, ends %v (retried: ran more than once); worker killed under one: %d", len(background), bgEnds, bgVictim)
	feed := s.allActivities(t)
	s.stop()

	// The deaths: when each ended, from the master's log.
	for i := range kills {
		k := &kills[i]
		k.to = k.from.Add(time.Second)
		if l := s.logs.find("worker exited", map[string]any{"pid": k.pid}); len(l) > 0 {
			k.to = logTime(l[0])
		}
	}
	dead := map[int]bool{}
	for _, k := range kills {
		dead[k.pid] = true
	}

	// ---- the database after the stop ----
	integrity := integrityCheck(t, db)
	if integrity != "ok" {
		t.Errorf("PRAGMA integrity_check = %q, want ok", integrity)
	}
	chats, ids := readChats(t, db)
	seen := map[int64]bool{}
	dupIDs := 0
	for _, id := range ids {
		if seen[id] {
			dupIDs++
		}
		seen[id] = true
	}
	feedSeen := map[int64]bool{}
	for _, a := range feed {
		if feedSeen[a.ID] {
			dupIDs++
		}
		feedSeen[a.ID] = true
	}

	// ---- attribution of every failed request ----
	scaleDowns := scaleDownClosings(s)
	type tally struct{ total, ok, killed, scaledDown, lostAfterDone, other int }
	by := map[string]*tally{}
	var unexplained []string
	inKillWindow := func(r chaosReq) bool {
		for _, k := range kills {
			// In flight while the worker died: started before it was gone,
			// ended (failed) after the signal.
			if r.start.Before(k.to.Add(100*time.Millisecond)) && !r.end.Before(k.from) {
				return true
			}
		}
		return false
	}
	chatsOK, chatsOKComplete, diedFailed, diedWrong := 0, 0, 0, 0
	for _, r := range reqs {
		tl := by[r.kind]
		if tl == nil {
			tl = &tally{}
			by[r.kind] = tl
		}
		tl.total++
		c := chats[r.msg]
		if !r.failed() {
			tl.ok++
			if r.kind == "chat" || r.kind == "stream" {
				chatsOK++
				if c != nil && slices.Equal(c.types(), []string{"chat.started", "chat.completed"}) {
					chatsOKComplete++
				} else {
					t.Errorf("%s got 200 but its activities are %v", r.msg, c.types())
				}
			}
			continue
		}
		// A failed chat the worker had started: the database says which
		// process ran it.
		if c != nil {
			if dead[c.PID] && (r.err == nil && r.kind == "stream" || connLost(r.err)) {
				tl.killed++
				if last, _ := c.terminal(); last.Type == "chat.completed" {
					tl.lostAfterDone++ // the worker died between the commit and the answer
				}
				continue
			}
			tl.other++
			unexplained = append(unexplained, fmt.Sprintf("%s on live pid %d: %d %q %v", r.msg, c.PID, r.status, r.last, r.err))
			continue
		}
		// Not started in the database (or not a chat): lost at the
		// connection while a worker died.
		if inKillWindow(r) && connLost(r.err) {
			tl.killed++
			continue
		}
		if inScaleDown(r, scaleDowns) && connLost(r.err) {
			tl.scaledDown++
			continue
		}
		tl.other++
		unexplained = append(unexplained, fmt.Sprintf("%s %s [%s, %s]: %d %q %v", r.kind, r.msg,
			r.start.Sub(start).Round(time.Millisecond), r.end.Sub(start).Round(time.Millisecond), r.status, r.last, r.err))
	}
	// Every chat of a dead worker that did not complete is failed with
	// worker_died; every chat has exactly one end.
	notTerminal := 0
	for _, c := range chats {
		last, n := c.terminal()
		if n != 1 {
			notTerminal++
			t.Errorf("chat %q (pid %d) has activities %v, want exactly one end", c.Message, c.PID, c.types())
			continue
		}
		if dead[c.PID] && last.Type != "chat.completed" {
			if last.Type == "chat.failed" && last.Data["reason"] == "worker_died" {
				diedFailed++
			} else {
				diedWrong++
				t.Errorf("chat %q of dead worker %d ended %s %v, want chat.failed worker_died", c.Message, c.PID, last.Type, last.Data)
			}
		}
	}
	if migrate := tcpMigrateReq(); migrate == "1" {
		for _, tl := range by {
			if tl.scaledDown > 0 {
				t.Errorf("%d requests reset at scale-down although net.ipv4.tcp_migrate_req is 1", tl.scaledDown)
			}
		}
	}
	if len(unexplained) > 0 {
		t.Errorf("%d failed requests not in flight on a killed worker:\n%s\nkills: %+v", len(unexplained), strings.Join(unexplained, "\n"), kills)
		if path := os.Getenv("CORRAL_CHAOS_LOG"); path != "" {
			os.WriteFile(path, []byte(s.logs.String()), 0o644)
		}
	}
	if dupIDs > 0 {
		t.Errorf("%d activity ids seen twice", dupIDs)
	}

	// ---- the summary ----
	var b strings.Builder
	fmt.Fprintf(&b, "| Chaos run, %s, %d workers (measured %s on this machine: %d cores, shared, `-race` %v) | |\n|---|---|\n",
		duration, workers, time.Now().UTC().Format("2006-01-02"), runtime.NumCPU(), raceEnabled)
	row := func(k string, v any) { fmt.Fprintf(&b, "| %s | %v |\n", k, v) }
	sigkills := 0
	for _, k := range kills {
		if k.how == "SIGKILL" {
			sigkills++
		}
	}
	row("faults injected", fmt.Sprintf("%d SIGKILL of a random worker (every 2 s), 1 SIGSTOP (killed by the master as hung), %d SIGHUP, %d SIGTTIN, %d SIGTTOU", sigkills, hups, ttin, ttou))
	for _, kind := range []string{"health", "poll", "chat", "stream"} {
		tl := by[kind]
		if tl == nil {
			tl = &tally{}
		}
		v := fmt.Sprintf("%d sent, %d ok, %d failed in flight on a killed worker, %d reset by the scale-down socket close, %d failed otherwise",
			tl.total, tl.ok, tl.killed, tl.scaledDown, tl.other)
		if kind == "chat" || kind == "stream" {
			v += fmt.Sprintf(" (of the killed: %d had completed in the database before the worker died, answer lost)", tl.lostAfterDone)
		}
		row("requests: "+kind, v)
	}
	row("chats answered 200 with chat.started and chat.completed", fmt.Sprintf("%d of %d", chatsOKComplete, chatsOK))
	row("chats of killed workers recorded chat.failed worker_died", fmt.Sprintf("%d (wrong: %d)", diedFailed, diedWrong))
	row("chats without exactly one end", notTerminal)
	row("activity ids seen twice (database and feed)", dupIDs)
	row("`PRAGMA integrity_check`", integrity)
	row("workers afterwards", fmt.Sprintf("%d, all ready, no zombies, settled %s after the load", workersAfter, settledIn.Round(time.Millisecond)))
	row("master fds besides SQLite's (from /proc)", fmt.Sprintf("%d -> %d", fds0, fds1))
	row("master threads (from /proc)", fmt.Sprintf("%d -> %d", threads0, threads1))
	row("master goroutines (go_goroutines{worker=\"master\"})", fmt.Sprintf("%d -> %d", goroutines0, goroutines1))
	row("data lost (chats without their end or wrongly ended, duplicate ids)", diedWrong+notTerminal+dupIDs)
	row("failed requests not explained by a kill or the scale-down", len(unexplained))
	t.Logf("chaos summary:\n%s", b.String())
	if path := os.Getenv("CORRAL_CHAOS_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
			t.Errorf("write %s: %v", path, err)
		}
	}
}
