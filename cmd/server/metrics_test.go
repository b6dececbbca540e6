package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// metricsURL is the metrics address the server logged.
func (s *server) metricsURL(t *testing.T) string {
	t.Helper()
	l := s.logs.find("metrics and status page ready", nil)
	if len(l) == 0 {
		t.Fatalf("no metrics address logged:\n%s", s.logs)
	}
	return l[0]["url"].(string)
}

func get(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// sample returns the value of the metric line that starts with series.
func sample(text, series string) (float64, bool) {
	for _, l := range strings.Split(text, "\n") {
		if strings.HasPrefix(l, series+" ") {
			v, err := strconv.ParseFloat(l[len(series)+1:], 64)
			return v, err == nil
		}
	}
	return 0, false
}

func TestMetricsAggregateWorkers(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "METRICS_ADDR=127.0.0.1:0", "METRICS_TOKEN=s3cret", "SIMULATED_LATENCY=0")
	base := s.metricsURL(t)
	if code, _ := get(t, base+"metrics", ""); code != 401 {
		t.Errorf("GET /metrics without the token = %d, want 401", code)
	}
	// ?token= opens the status page in a browser, and nothing else.
	if code, _ := get(t, base+"?token=s3cret", ""); code != 200 {
		t.Errorf("GET /?token= = %d, want 200", code)
	}
	for _, path := range []string{"metrics?token=s3cret", "status.json?token=s3cret"} {
		if code, _ := get(t, base+path, ""); code != 401 {
			t.Errorf("GET /%s = %d, want 401: a token in the URL is for the page only", path, code)
		}
	}
	for range 20 {
		if _, err := s.health(fresh); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "count me"}, &chatAnswer{}); err != nil {
		t.Fatal(err)
	}
	var text string
	waitFor(t, 10*time.Second, func() error {
		_, text = get(t, base+"metrics", "s3cret")
		total := 0.0
		for _, w := range []string{"1", "2"} {
			v, _ := sample(text, `corral_http_requests_total{worker="`+w+`",route="/health",status="200"}`)
			total += v
		}
		// The workers' own probes are not counted: exactly our 20.
		if total != 20 {
			return fmt.Errorf("/health requests counted %v, want 20", total)
		}
		// The chat's series come with its worker's next heartbeat.
		if !strings.Contains(text, `corral_llm_call_duration_seconds_bucket{worker="`) || !strings.Contains(text, `le="120"`) {
			return fmt.Errorf("no LLM call histogram with a 120 s bucket")
		}
		if !strings.Contains(text, `corral_activities_written_total{worker="`) {
			return fmt.Errorf("no activities counter")
		}
		return nil
	})
	for _, series := range []string{
		`corral_workers{state="ready"}`,
		`process_resident_memory_bytes{worker="1"}`,
		`go_goroutines{worker="2"}`,
		`go_goroutines{worker="master"}`,
		`process_open_fds{worker="master"}`,
	} {
		if v, ok := sample(text, series); !ok || v <= 0 {
			t.Errorf("metric %s = %v, %v; want a positive value in:\n%s", series, v, ok, text)
		}
	}
	syscall.Kill(s.workerPIDs()[0], syscall.SIGKILL)
	waitFor(t, 10*time.Second, func() error {
		_, text = get(t, base+"metrics", "s3cret")
		if v, _ := sample(text, `corral_worker_restarts_total{reason="crash"}`); v != 1 {
			return fmt.Errorf("restarts by reason crash = %v, want 1", v)
		}
		return nil
	})
}

func TestStatusPageInChromium(t *testing.T) {
	t.Parallel()
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Skip("chromium not installed (Debian package chromium; .ci/run installs it)")
	}
	s := startServer(t, "WORKERS=2", "METRICS_ADDR=127.0.0.1:0", "SIMULATED_LATENCY=5s")
	page := s.metricsURL(t)
	pids := s.workerPIDs()
	// A cancelled chat: the activities table shows why. Another stays in
	// flight for the chats chart.
	go s.chat(&http.Client{Timeout: 30 * time.Second}, "to cancel", false)
	var chatID string
	waitFor(t, 10*time.Second, func() error {
		p, err := s.activities("type=chat.started")
		if err == nil && len(p.Activities) == 0 {
			err = fmt.Errorf("no chat started yet")
		}
		if err == nil {
			chatID = p.Activities[0].ChatID
		}
		return err
	})
	if resp, err := fresh.Post(s.url("/api/chats/"+chatID+"/cancel"), "application/json", nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("cancel chat %s: %v %v", chatID, resp, err)
	}
	go s.chat(&http.Client{Timeout: 30 * time.Second}, "in flight", false)
	for range 20 {
		s.health(fresh)
	}
	browse := func(extra ...string) string {
		t.Helper()
		args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
			"--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
			"--disable-quic", "--user-data-dir=" + t.TempDir(), "--virtual-time-budget=4000"}, extra...)
		cmd := exec.Command(chromium, append(args, page)...)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		if err := cmd.Run(); err != nil {
			t.Fatalf("chromium: %v\n%s", err, errOut.String())
		}
		return out.String()
	}
	name := "server" // the App's Name, whatever the file is called (here the test binary)
	// The page fills the worker table from /status.json: wait until it lists
	// the live worker pids.
	waitFor(t, 60*time.Second, func() error {
		dom := browse("--dump-dom")
		for _, pid := range pids {
			if !strings.Contains(dom, `data-pid="`+strconv.Itoa(pid)+`"`) {
				return fmt.Errorf("status page does not list worker %d:\n%.2000s", pid, dom)
			}
		}
		// The program's name, and the
		// server's own facts and panel, through the supervisor's neutral
		// hooks (Config.Info, Config.Panel).
		for _, want := range []string{`<h1 id="name">` + name + `</h1>`, `<title>` + name + ` status</title>`, `llm <b>simulated`, `store <b>sqlite:`, `<h2 id="panel-title">Recent activities</h2>`,
			`<th>reason</th>`, `<td>cancel_requested</td>`} {
			if !strings.Contains(dom, want) {
				return fmt.Errorf("status page lacks %s:\n%.4000s", want, dom)
			}
		}
		// The charts draw: each has a line through at least one point
		// (the master samples every 5 s; rates need two samples).
		for _, kind := range []string{"rate", "p99", "sum"} {
			m := regexp.MustCompile(`<div class="chart" data-kind="` + kind + `">.*?data-points="([0-9]+)".*?<path class="line" d="(M[^"]*)"`).FindStringSubmatch(dom)
			if m == nil || m[1] == "0" {
				return fmt.Errorf("chart %s draws no line:\n%.6000s", kind, dom)
			}
		}
		for _, title := range []string{"requests / s", "p99 latency, ms", "chats in flight"} {
			if !strings.Contains(dom, title) {
				return fmt.Errorf("no chart %q", title)
			}
		}
		return nil
	})
	shot := filepath.Join(artifactDir(t), "status-page.png")
	browse("--window-size=1280,800", "--screenshot="+shot)
	if fi, err := os.Stat(shot); err != nil || fi.Size() < 5000 {
		t.Fatalf("screenshot %s: %v", shot, err)
	}
	t.Logf("status page screenshot: %s", shot)
}

// artifactDir is where tests leave files for people to look at: the
// ARTIFACTS folder if set, else artifacts/ at the repository root.
func artifactDir(t *testing.T) string {
	t.Helper()
	dir := os.Getenv("ARTIFACTS")
	if dir == "" {
		dir = filepath.Join("..", "..", "artifacts")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	abs, _ := filepath.Abs(dir)
	return abs
}

// TestStatusPanelShowsWhyAChatFailed: the status panel's reason column of a
// chat.failed activity is the error code the client got and its message.
func TestStatusPanelShowsWhyAChatFailed(t *testing.T) {
	t.Parallel()
	fake := newFakeLLM(t)
	s := startServer(t, "WORKERS=1", "METRICS_ADDR=127.0.0.1:0", "LLM_BASE_URL="+fake.baseURL(), "LLM_TIMEOUT=30s")
	base := s.metricsURL(t)
	if r := s.chat(fresh, "503 please", false); r.err != nil || r.status != http.StatusBadGateway {
		t.Fatalf("chat against an LLM answering 503 = %d, %v; want 502", r.status, r.err)
	}
	var row []string
	waitFor(t, 10*time.Second, func() error {
		code, body := get(t, base+"status.json", "")
		var st struct {
			Panel struct {
				Columns []string   `json:"columns"`
				Rows    [][]string `json:"rows"`
			} `json:"panel"`
		}
		if err := json.Unmarshal([]byte(body), &st); err != nil || code != http.StatusOK {
			return fmt.Errorf("GET /status.json = %d %v: %s", code, err, body)
		}
		for _, r := range st.Panel.Rows {
			if len(r) == len(st.Panel.Columns) && r[2] == "chat.failed" {
				row = r
				return nil
			}
		}
		return fmt.Errorf("no chat.failed row in the panel: %v", st.Panel.Rows)
	})
	p, err := s.activities("type=chat.failed")
	if err != nil || len(p.Activities) != 1 {
		t.Fatalf("chat.failed activities = %+v, %v; want one", p.Activities, err)
	}
	d := p.Activities[0].Data
	if want := fmt.Sprintf("%v: %v", d["reason"], d["message"]); row[len(row)-1] != want || d["reason"] != "upstream_error" {
		t.Errorf("panel reason of the failed chat = %q, want %q (the activity's reason and message, upstream_error)", row[len(row)-1], want)
	}
}
