// Command pgbench measures Corral's store backends end to end, through the
// HTTP API of real servers: chats per second (SIMULATED_LATENCY=0, so the
// store is what is measured) and how long an activity long-poll takes to
// answer after a write, on SQLite and on PostgreSQL with one host, and on
// PostgreSQL with two hosts sharing the database.
//
// Usage (from the repository root, after make build):
//
//	go run ./bench/pgbench
//	go run ./bench/pgbench -chats 2000 -clients 32 -wakes 200 -postgres postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable
//
// It starts ./server itself (PORT=0, LOG_FORMAT=json), reads the port from
// the "Corral running" log line and waits for "Application startup
// complete". Each PostgreSQL scenario runs on a fresh database, created
// from -postgres and dropped afterwards. Results are printed as a table and
// written as JSON under -out.
package main

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
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

	"github.com/jackc/pgx/v5"
)

type config struct {
	server   string
	postgres string
	out      string
	chats    int
	clients  int
	wakes    int
	workers  int
}

// result is one scenario's figures.
type result struct {
	Scenario    string          `json:"scenario"`
	Hosts       int             `json:"hosts"`
	Workers     int             `json:"workers_per_host"`
	Chats       int             `json:"chats"`
	Clients     int             `json:"clients"`
	ChatsFailed int             `json:"chats_failed"`
	Seconds     float64         `json:"seconds"`
	ChatsPerSec float64         `json:"chats_per_second"`
	ChatP50     time.Duration   `json:"chat_p50_ns"`
	ChatP99     time.Duration   `json:"chat_p99_ns"`
	Wakes       []time.Duration `json:"wake_ns"`
	WakeP50     time.Duration   `json:"wake_p50_ns"`
	WakeP99     time.Duration   `json:"wake_p99_ns"`
	WakeMax     time.Duration   `json:"wake_max_ns"`
}

func main() {
	var c config
	flag.StringVar(&c.server, "server", "./server", "server binary (make build)")
	flag.StringVar(&c.postgres, "postgres", cmp.Or(os.Getenv("CORRAL_TEST_POSTGRES"), "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"),
		"PostgreSQL URL of a database to CREATE DATABASE from")
	flag.StringVar(&c.out, "out", "bench/out", "folder for raw results")
	flag.IntVar(&c.chats, "chats", 2000, "chats per scenario")
	flag.IntVar(&c.clients, "clients", 32, "concurrent chat clients")
	flag.IntVar(&c.wakes, "wakes", 200, "long-poll wake-ups measured per scenario")
	flag.IntVar(&c.workers, "workers", 2, "WORKERS per server")
	only := flag.String("run", "sqlite,postgres,postgres-2hosts", "comma-separated scenarios")
	flag.Parse()

	tmp, err := os.MkdirTemp("", "pgbench-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(tmp)

	var results []result
	for _, name := range strings.Split(*only, ",") {
		var r result
		var err error
		switch name {
		case "sqlite":
			// The server creates only its default data/ folder.
			if err = os.MkdirAll(filepath.Join(tmp, "sqlite"), 0o755); err == nil {
				r, err = c.run(name, tmp, 1, "sqlite:"+filepath.Join(tmp, "sqlite", "server.db"))
			}
		case "postgres", "postgres-2hosts":
			hosts := 1
			if name == "postgres-2hosts" {
				hosts = 2
			}
			var dbURL string
			var drop func()
			if dbURL, drop, err = createDatabase(c.postgres); err == nil {
				r, err = c.run(name, tmp, hosts, dbURL)
				drop()
			}
		default:
			err = fmt.Errorf("unknown scenario %q", name)
		}
		if err != nil {
			fatal(fmt.Errorf("%s: %w", name, err))
		}
		results = append(results, r)
	}
	printTable(os.Stdout, c, results)
	if err := writeResults(c.out, results); err != nil {
		fatal(err)
	}
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "pgbench:", err)
	os.Exit(1)
}

// run measures one scenario on hosts servers sharing dbURL.
func (c config) run(name, tmp string, hosts int, dbURL string) (result, error) {
	r := result{Scenario: name, Hosts: hosts, Workers: c.workers, Chats: c.chats, Clients: c.clients}
	var servers []*server
	defer func() {
		for _, s := range servers {
			s.stop()
		}
	}()
	for i := range hosts {
		dir := filepath.Join(tmp, fmt.Sprintf("%s-%d", name, i))
		s, err := startServer(c.server, dir, "DATABASE_URL="+dbURL, "WORKERS="+strconv.Itoa(c.workers),
			"CONTROL_SOCKET="+filepath.Join(dir, "server.sock"))
		if err != nil {
			return r, err
		}
		servers = append(servers, s)
	}
	fmt.Fprintf(os.Stderr, "%s: %d host(s) up, running %d chats on %d clients\n", name, hosts, c.chats, c.clients)
	if err := c.chatLoad(&r, servers); err != nil {
		return r, err
	}
	fmt.Fprintf(os.Stderr, "%s: %.0f chats/s; measuring %d wake-ups\n", name, r.ChatsPerSec, c.wakes)
	// One host: poll and write on it (its two workers: the kernel picks one
	// per connection). Two hosts: poll on the first, write on the second.
	poller, writer := servers[0], servers[len(servers)-1]
	if err := c.wakeLatency(&r, poller, writer); err != nil {
		return r, err
	}
	return r, nil
}

// chatLoad runs c.chats chats on c.clients keep-alive clients spread over
// the servers.
func (c config) chatLoad(r *result, servers []*server) error {
	var next atomic.Int64
	var failed atomic.Int64
	lat := make([]time.Duration, c.chats)
	var firstErr error
	var once sync.Once
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range c.clients {
		s := servers[i%len(servers)]
		client := &http.Client{Timeout: 30 * time.Second}
		wg.Go(func() {
			for {
				n := int(next.Add(1)) - 1
				if n >= c.chats {
					return
				}
				c0 := time.Now()
				err := chat(client, s.url("/api/chat"), n)
				lat[n] = time.Since(c0)
				if err != nil {
					failed.Add(1)
					once.Do(func() { firstErr = err })
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(t0)
	r.Seconds = elapsed.Seconds()
	r.ChatsFailed = int(failed.Load())
	r.ChatsPerSec = float64(c.chats-r.ChatsFailed) / elapsed.Seconds()
	slices.Sort(lat)
	r.ChatP50, r.ChatP99 = lat[len(lat)/2], lat[len(lat)*99/100]
	if r.ChatsFailed > c.chats/100 {
		return fmt.Errorf("%d of %d chats failed, first: %w", r.ChatsFailed, c.chats, firstErr)
	}
	return nil
}

func chat(client *http.Client, u string, n int) error {
	body := fmt.Sprintf(`{"agent_id":"default","message":"bench chat %d"}`, n)
	resp, err := client.Post(u, "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("POST /api/chat = %d %s", resp.StatusCode, b)
	}
	return nil
}

// wakeLatency measures c.wakes times: a long-poll waits on poller, an agent
// is created through writer, and the time from sending that write to the
// poll's answer is recorded.
func (c config) wakeLatency(r *result, poller, writer *server) error {
	pollClient := &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	writeClient := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	after, err := lastID(pollClient, poller)
	if err != nil {
		return err
	}
	for i := range c.wakes {
		type answer struct {
			at   time.Time
			next int64
			err  error
		}
		got := make(chan answer, 1)
		wrote := make(chan struct{})
		go func() {
			next, err := longPoll(pollClient, poller, after, wrote)
			got <- answer{time.Now(), next, err}
		}()
		// The poll must be waiting when the write lands: a late poll
		// answers at once and would flatter the figure. Its request is on
		// the wire here; the 20 ms are for the server to reach its wait,
		// which takes one indexed query.
		select {
		case <-wrote:
		case a := <-got:
			return fmt.Errorf("long-poll ended before it was sent: %v", a.err)
		}
		time.Sleep(20 * time.Millisecond)
		sent := time.Now()
		if err := createAgent(writeClient, writer, i); err != nil {
			return err
		}
		a := <-got
		if a.err != nil {
			return a.err
		}
		r.Wakes = append(r.Wakes, a.at.Sub(sent))
		after = a.next
	}
	sorted := slices.Clone(r.Wakes)
	slices.Sort(sorted)
	r.WakeP50, r.WakeP99, r.WakeMax = sorted[len(sorted)/2], sorted[len(sorted)*99/100], sorted[len(sorted)-1]
	return nil
}

type feedPage struct {
	Activities []json.RawMessage `json:"activities"`
	NextAfter  int64             `json:"next_after"`
}

func getFeed(client *http.Client, u string) (feedPage, error) {
	var p feedPage
	resp, err := client.Get(u)
	if err != nil {
		return p, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return p, fmt.Errorf("GET %s = %d %s", u, resp.StatusCode, b)
	}
	return p, json.NewDecoder(resp.Body).Decode(&p)
}

func lastID(client *http.Client, s *server) (int64, error) {
	var after int64
	for {
		p, err := getFeed(client, s.url(fmt.Sprintf("/api/activities?after=%d&limit=500", after)))
		if err != nil || len(p.Activities) == 0 {
			return after, err
		}
		after = p.NextAfter
	}
}

// longPoll waits for an activity after after; wrote closes once the
// request has been written to the connection.
func longPoll(client *http.Client, s *server, after int64, wrote chan<- struct{}) (int64, error) {
	var once sync.Once
	trace := &httptrace.ClientTrace{WroteRequest: func(httptrace.WroteRequestInfo) { once.Do(func() { close(wrote) }) }}
	req, err := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
		"GET", s.url(fmt.Sprintf("/api/activities?after=%d&wait=30", after)), nil)
	if err != nil {
		return 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var p feedPage
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return 0, fmt.Errorf("long-poll = %d %s", resp.StatusCode, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&p); err != nil {
		return 0, err
	}
	if len(p.Activities) == 0 {
		return p.NextAfter, errors.New("long-poll answered empty after 30s")
	}
	return p.NextAfter, nil
}

func createAgent(client *http.Client, s *server, i int) error {
	body := fmt.Sprintf(`{"name":"wake %d","system_prompt":"Wake."}`, i)
	resp, err := client.Post(s.url("/api/agents"), "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, resp.Body)
	if resp.StatusCode != 201 && resp.StatusCode != 200 {
		return fmt.Errorf("POST /api/agents = %d", resp.StatusCode)
	}
	return nil
}

// server is a running ./server.
type server struct {
	cmd  *exec.Cmd
	port int
	done chan struct{}
	log  *os.File
}

func (s *server) url(path string) string { return "http://127.0.0.1:" + strconv.Itoa(s.port) + path }

// startServer starts bin in dir with env and waits until it is ready.
func startServer(bin, dir string, env ...string) (*server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(abs)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "HOST=127.0.0.1", "PORT=0", "LOG_FORMAT=json", "LOG_LEVEL=info",
		"ACCESS_LOG=false", "SIMULATED_LATENCY=0")
	cmd.Env = append(cmd.Env, env...)
	logf, err := os.Create(filepath.Join(dir, "server.log"))
	if err != nil {
		return nil, err
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = logf
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w (run make build first)", bin, err)
	}
	s := &server{cmd: cmd, done: make(chan struct{}), log: logf}
	ports := make(chan int, 1)
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(nil, 1<<20)
		readySeen := false
		for sc.Scan() {
			line := sc.Bytes()
			logf.Write(append(line, '\n'))
			var m struct {
				Message string `json:"message"`
				URL     string `json:"url"`
			}
			if json.Unmarshal(line, &m) != nil {
				continue
			}
			switch m.Message {
			case "Corral running, press CTRL+C to quit":
				if u, err := url.Parse(m.URL); err == nil {
					if _, p, err := net.SplitHostPort(u.Host); err == nil {
						n, _ := strconv.Atoi(p)
						ports <- n
					}
				}
			case "Application startup complete":
				if !readySeen {
					readySeen = true
					close(ready)
				}
			}
		}
		cmd.Wait()
		logf.Close()
		close(s.done)
	}()
	deadline := time.After(30 * time.Second)
	for s.port == 0 {
		select {
		case s.port = <-ports:
		case <-s.done:
			return nil, fmt.Errorf("server exited before it was ready; see %s", logf.Name())
		case <-deadline:
			s.stop()
			return nil, errors.New("no \"Corral running\" line within 30s")
		}
	}
	select {
	case <-ready:
	case <-s.done:
		return nil, fmt.Errorf("server exited before it was ready; see %s", logf.Name())
	case <-deadline:
		s.stop()
		return nil, errors.New("no \"Application startup complete\" within 30s")
	}
	return s, nil
}

// stop sends SIGTERM, waits up to 30 s, then kills.
func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
	}
}

// createDatabase creates a fresh database next to base and returns its URL
// and a function that drops it.
func createDatabase(base string) (string, func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	admin, err := pgx.Connect(ctx, base)
	if err != nil {
		return "", nil, fmt.Errorf("connect to PostgreSQL: %w", err)
	}
	name := fmt.Sprintf("corral_bench_%d", time.Now().UnixNano())
	if _, err := admin.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		admin.Close(ctx)
		return "", nil, fmt.Errorf("create database: %w", err)
	}
	u, err := url.Parse(base)
	if err != nil {
		admin.Close(ctx)
		return "", nil, err
	}
	u.Path = "/" + name
	drop := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := admin.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			fmt.Fprintln(os.Stderr, "pgbench: drop database:", err)
		}
		admin.Close(ctx)
	}
	return u.String(), drop, nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d)/float64(time.Millisecond)) }

func printTable(w io.Writer, c config, rs []result) {
	fmt.Fprintf(w, "\n%d chats on %d clients per scenario, SIMULATED_LATENCY=0, WORKERS=%d per host; %d long-poll wake-ups\n\n",
		c.chats, c.clients, c.workers, c.wakes)
	fmt.Fprintln(w, "| scenario | hosts | chats/s | chat p50 ms | chat p99 ms | failed | wake p50 ms | wake p99 ms | wake max ms |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|---|")
	for _, r := range rs {
		fmt.Fprintf(w, "| %s | %d | %.0f | %s | %s | %d | %s | %s | %s |\n", r.Scenario, r.Hosts, r.ChatsPerSec,
			ms(r.ChatP50), ms(r.ChatP99), r.ChatsFailed, ms(r.WakeP50), ms(r.WakeP99), ms(r.WakeMax))
	}
}

func writeResults(dir string, rs []result) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	path := filepath.Join(dir, fmt.Sprintf("pgbench-%s.json", time.Now().UTC().Format("20060102T150405Z")))
	b, err := json.MarshalIndent(rs, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return err
	}
	fmt.Fprintln(os.Stderr, "raw results:", path)
	return nil
}
