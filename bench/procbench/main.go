// Command procbench measures Corral's process model against a plain
// prefork fasthttp server (bench/baseline) on this machine: throughput with
// and without the access log, a worker crash, a hung worker, a rolling
// restart under load, startup time, idle memory and how evenly a burst of
// connections spreads over the processes. It also measures the server alone
// for three issues: the Agent API with thousands of long chats in flight
// (api), development reloads (reload) and the cost of the metrics (metrics).
//
// Usage (bench/run.sh builds everything and runs this):
//
//	procbench -server ./server -baseline bench/out/bin/baseline -out bench/out
//	procbench ... -run crash,hang      # only some scenarios
//
// Every load is loopback only and bounded in time and count. Raw results
// (wrk reports, per-request CSVs, server logs, results.json) go under -out;
// the summary tables are printed and written to summary.md there.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// bench holds the run's settings, its live processes and its results.
type bench struct {
	server, baseline string
	out, tmp         string
	rounds           int
	wrkDur           time.Duration
	kills, starts    int
	rate             int

	// api, reload, metrics (apibench.go, reloadbench.go, metricsbench.go)
	chatWaves     []int
	probes        int
	rateChats     int
	rateClients   int
	rateRounds    int
	src           string
	reloads       int
	metricsRounds int

	seq  int
	live map[*target]bool
	res  results
}

func main() {
	b := &bench{live: map[*target]bool{}}
	flag.StringVar(&b.server, "server", "./server", "Corral server binary")
	flag.StringVar(&b.baseline, "baseline", "bench/out/bin/baseline", "baseline binary (bench/baseline)")
	flag.StringVar(&b.out, "out", "bench/out", "directory for raw results")
	flag.IntVar(&b.rounds, "rounds", 3, "throughput: wrk runs per variant (alternated)")
	flag.DurationVar(&b.wrkDur, "duration", 10*time.Second, "throughput: length of one wrk run")
	flag.IntVar(&b.kills, "kills", 5, "crash: number of SIGKILLs (one fresh server each)")
	flag.IntVar(&b.starts, "starts", 10, "startup: number of starts")
	flag.IntVar(&b.rate, "rate", 200, "crash, hang, hup: open-loop requests per second")
	waves := flag.String("chats", "1000,10000", "api: chats held in flight, one fresh server per wave")
	flag.IntVar(&b.probes, "probes", 300, "api: sequential GET /health and GET /api/activities per measurement")
	flag.IntVar(&b.rateChats, "rate-chats", 3000, "api: chats per round with SIMULATED_LATENCY=0")
	flag.IntVar(&b.rateClients, "rate-clients", 32, "api: concurrent clients with SIMULATED_LATENCY=0")
	flag.IntVar(&b.rateRounds, "rate-rounds", 3, "api: rounds with SIMULATED_LATENCY=0")
	flag.StringVar(&b.src, "src", ".", "reload: repository whose Go sources are copied and rebuilt")
	flag.IntVar(&b.reloads, "reloads", 5, "reload: timed reloads of each kind")
	flag.IntVar(&b.metricsRounds, "metrics-rounds", 5, "metrics: wrk runs per variant (alternated)")
	run := flag.String("run", "throughput,crash,hang,hup,startup,rss,spread,api,reload,metrics", "comma-separated scenarios to run")
	flag.Parse()
	for _, w := range strings.Split(*waves, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(w))
		if err != nil || n < 1 {
			fmt.Fprintf(os.Stderr, "procbench: invalid -chats %q: want whole numbers from 1, comma-separated\n", *waves)
			os.Exit(2)
		}
		b.chatWaves = append(b.chatWaves, n)
	}

	if err := b.setup(); err != nil {
		fmt.Fprintln(os.Stderr, "procbench:", err)
		os.Exit(1)
	}
	// Ctrl+C stops the processes under test before the driver exits.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-sigs
		fmt.Fprintln(os.Stderr, "procbench: interrupted, stopping the servers")
		b.stopAll()
		os.Exit(130)
	}()

	scenarios := map[string]func() error{
		"throughput": b.throughput,
		"crash":      b.crash,
		"hang":       b.hang,
		"hup":        b.hup,
		"startup":    b.startup,
		"rss":        b.rss,
		"spread":     b.spread,
		"api":        b.api,
		"reload":     b.reload,
		"metrics":    b.metrics,
	}
	failed := false
	for _, name := range strings.Split(*run, ",") {
		name = strings.TrimSpace(name)
		f, ok := scenarios[name]
		if !ok {
			fmt.Fprintf(os.Stderr, "procbench: unknown scenario %q\n", name)
			os.Exit(2)
		}
		t0 := time.Now()
		fmt.Fprintf(os.Stderr, "procbench: %s ...\n", name)
		if err := f(); err != nil {
			fmt.Fprintf(os.Stderr, "procbench: %s: %v\n", name, err)
			b.res.Errors = append(b.res.Errors, name+": "+err.Error())
			failed = true
		}
		b.stopAll()
		fmt.Fprintf(os.Stderr, "procbench: %s done in %s\n", name, time.Since(t0).Round(time.Second))
	}
	b.res.Finished = time.Now().UTC().Format(time.RFC3339)
	b.res.MixedLogLines = mixedLines.Load()
	if err := b.write(); err != nil {
		fmt.Fprintln(os.Stderr, "procbench:", err)
		os.Exit(1)
	}
	if failed {
		os.Exit(1)
	}
}

func (b *bench) setup() error {
	for _, p := range []*string{&b.server, &b.baseline, &b.src} {
		abs, err := filepath.Abs(*p)
		if err != nil {
			return err
		}
		if _, err := os.Stat(abs); err != nil {
			return fmt.Errorf("binary: %w", err)
		}
		*p = abs
	}
	if _, err := exec.LookPath("wrk"); err != nil {
		return fmt.Errorf("wrk not found: apt-get install -y wrk")
	}
	if err := os.MkdirAll(filepath.Join(b.out, "logs"), 0o755); err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "procbench-")
	if err != nil {
		return err
	}
	b.tmp = tmp
	b.res.Machine = machineInfo()
	if out, err := exec.Command(b.server, "--version").Output(); err == nil {
		b.res.Machine.Server = strings.TrimSpace(string(out))
	}
	b.res.Rate = b.rate
	b.res.Started = time.Now().UTC().Format(time.RFC3339)
	return nil
}

func (b *bench) stopAll() {
	for t := range b.live {
		t.stop()
		delete(b.live, t)
	}
}

// write saves results.json and summary.md and prints the summary.
func (b *bench) write() error {
	os.RemoveAll(b.tmp)
	js, err := json.MarshalIndent(b.res, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.out, "results.json"), js, 0o644); err != nil {
		return err
	}
	md := b.res.markdown()
	if err := os.WriteFile(filepath.Join(b.out, "summary.md"), []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Print(md)
	return nil
}

// machine describes where the figures were measured.
type machine struct {
	CPUs          int
	CPUModel      string
	MemTotal      string
	Kernel        string
	Go            string
	Wrk           string
	MigrateReq    string
	LoadAvgBefore string
	Server        string // ./server --version
}

func machineInfo() machine {
	read := func(path string) string {
		b, _ := os.ReadFile(path)
		return strings.TrimSpace(string(b))
	}
	m := machine{
		CPUs:          runtime.NumCPU(),
		Kernel:        read("/proc/sys/kernel/osrelease"),
		Go:            runtime.Version(),
		Wrk:           wrkVersion(),
		MigrateReq:    read("/proc/sys/net/ipv4/tcp_migrate_req"),
		LoadAvgBefore: read("/proc/loadavg"),
	}
	for _, line := range strings.Split(read("/proc/cpuinfo"), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			m.CPUModel = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
			break
		}
	}
	for _, line := range strings.Split(read("/proc/meminfo"), "\n") {
		if v, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			m.MemTotal = strings.TrimSpace(v)
			break
		}
	}
	return m
}
