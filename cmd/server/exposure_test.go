package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	openAPIWarning     = "the API is open to other hosts without a token: anyone who reaches it can create agents with any system prompt, read every prompt and delete agents"
	openMetricsWarning = "the metrics address is open to other hosts without a token: anyone who reaches it reads the status, every worker's pid and the recent activities"
)

// TestOpenAPIWarns: an API on every address without API_TOKEN starts,
// says so once in the log and in systemd's status line; on loopback, or
// with a token, it says nothing; --require-token refuses to start without
// a token and starts with one.
func TestOpenAPIWarns(t *testing.T) {
	n := newNotifySocket(t)
	s := startServer(t, "HOST=0.0.0.0", "WORKERS=1", "NOTIFY_SOCKET="+n.path)
	if w := s.logs.find(openAPIWarning, map[string]any{"level": "warn"}); len(w) != 1 || !strings.HasPrefix(fmt.Sprint(w[0]["addr"]), "0.0.0.0:") ||
		!strings.Contains(fmt.Sprint(w[0]["fix"]), "API_TOKEN") {
		t.Errorf("open API warnings %v, want one naming the address and API_TOKEN; log:\n%s", w, s.logs)
	}
	n.waitFor(t, "STATUS=1/1 workers ready, 0 requests in flight; WARNING: API open to other hosts, no API_TOKEN", 1)
	s.stop()

	for _, env := range [][]string{{"HOST=127.0.0.1"}, {"HOST=localhost"}, {"HOST=0.0.0.0", "API_TOKEN=t1,t2"}, {"UDS=" + filepath.Join(t.TempDir(), "api.sock")}} {
		s := launch(t, append(env, "WORKERS=1")...)
		s.waitStarted(t)
		if w := s.logs.find(openAPIWarning, nil); len(w) != 0 {
			t.Errorf("%v: warned %v, want no warning", env, w)
		}
		s.stop()
	}

	s = launch(t, "HOST=0.0.0.0", "REQUIRE_TOKEN=true")
	if code := s.wait(20 * time.Second); code != exitUsage {
		t.Errorf("REQUIRE_TOKEN without API_TOKEN: exit %d, want %d", code, exitUsage)
	}
	if out := s.logs.String(); !strings.Contains(out, "invalid REQUIRE_TOKEN: want API_TOKEN set as well") {
		t.Errorf("REQUIRE_TOKEN without API_TOKEN: stderr %q does not name API_TOKEN", out)
	}
	s = startServerArgs(t, []string{"--require-token"}, "HOST=0.0.0.0", "WORKERS=1", "API_TOKEN=t1")
	if code, _ := get(t, s.url("/api/agents"), "t1"); code != 200 {
		t.Errorf("GET /api/agents with the token under --require-token = %d, want 200", code)
	}
}

// TestModelAllowList: agents may name only the models of LLM_MODELS (422
// naming them otherwise); a chat of an agent whose model left the list is
// refused, and the upstream never receives a model off the list.
func TestModelAllowList(t *testing.T) {
	base, seen := recordingLLM(t)
	db := "DATABASE_URL=sqlite:" + filepath.Join(t.TempDir(), "server.db")
	s := startServer(t, db, "WORKERS=1", "LLM_BASE_URL="+base+"/v1", "LLM_MODELS=fast, deep")
	var deep struct{ ID string }
	if _, err := s.postJSON("/api/agents", map[string]any{"name": "deep", "system_prompt": "p", "model": "deep"}, &deep); err != nil {
		t.Fatal(err)
	}
	code, body := postRaw(t, s.url("/api/agents"), `{"name":"x","system_prompt":"p","model":"gpt-5-pro"}`)
	if code != 422 || !strings.Contains(body, `"model_not_allowed"`) || !strings.Contains(body, "allowed: fast, deep") {
		t.Errorf("agent with model gpt-5-pro: %d %s, want 422 model_not_allowed naming fast, deep", code, body)
	}
	for _, agent := range []string{"default", deep.ID} {
		if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": agent, "message": "hi"}, &chatAnswer{}); err != nil {
			t.Fatal(err)
		}
	}
	if got := upstreamModels(seen()); !slices.Equal(got, []string{"fast", "deep"}) {
		t.Errorf("models sent upstream %q, want fast (the first, for the default agent) then deep", got)
	}
	s.stop()

	// The list shrinks: the deep agent's chats are refused, never sent.
	s = startServer(t, db, "WORKERS=1", "LLM_BASE_URL="+base+"/v1", "LLM_MODEL=fast")
	for _, bg := range []bool{false, true} {
		code, body := postRaw(t, s.url("/api/chat"), fmt.Sprintf(`{"agent_id":%q,"message":"hi","background":%v}`, deep.ID, bg))
		if code != 422 || !strings.Contains(body, `names model \"deep\", which is not allowed on this server; allowed: fast`) {
			t.Errorf("chat of the deep agent (background %v): %d %s, want 422 naming the model and the allowed one", bg, code, body)
		}
	}
	if got := upstreamModels(seen()); !slices.Equal(got, []string{"fast", "deep"}) {
		t.Errorf("models sent upstream %q, want nothing more after the list changed", got)
	}
}

// upstreamModels lists the model of each chat request the fake received.
func upstreamModels(reqs []seenUpstream) []string {
	var out []string
	for _, r := range reqs {
		out = append(out, r.model)
	}
	return out
}

// postRaw posts a JSON body on a new connection and returns the status and
// the body.
func postRaw(t *testing.T, url, body string) (int, string) {
	t.Helper()
	resp, err := fresh.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// hostStatus is the status of GET url sent with the Host header host and,
// if set, a bearer token.
func hostStatus(t *testing.T, url, host, token string) int {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Host = host
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode == 421 && strings.Contains(url, "/api/") {
		var e struct {
			Error struct{ Code, Message string }
		}
		if json.NewDecoder(resp.Body).Decode(&e); e.Error.Code != "misdirected_request" || !strings.Contains(e.Error.Message, "ALLOWED_HOSTS") {
			t.Errorf("GET %s with Host %s: 421 with %+v, want misdirected_request naming ALLOWED_HOSTS", url, host, e.Error)
		}
	}
	return resp.StatusCode
}

// TestAllowedHosts: without a token the API and the metrics address answer
// IP addresses and localhost only (421 to a rebinding domain); with a
// token any host; --allowed-hosts names the hosts answered. A metrics
// address other hosts reach without METRICS_TOKEN is warned about, and
// refused under --require-token.
func TestAllowedHosts(t *testing.T) {
	s := startServer(t, "WORKERS=1", "METRICS_ADDR=127.0.0.1:0")
	port := fmt.Sprint(s.port)
	metrics := s.metricsURL(t)
	for _, c := range []struct {
		url, host string
		want      int
	}{
		{s.url("/api/agents"), "rebind.attacker.example:" + port, 421},
		{s.url("/api/agents"), "127.0.0.1:" + port, 200},
		{s.url("/api/agents"), "localhost:" + port, 200},
		{s.url("/api/agents"), "[::1]:" + port, 200},
		{s.url("/api/agents"), "app.localhost", 200},
		{s.url("/health"), "rebind.attacker.example", 200},
		{metrics + "status.json", "rebind.attacker.example", 421},
		{metrics + "status.json", "127.0.0.1", 200},
	} {
		if got := hostStatus(t, c.url, c.host, ""); got != c.want {
			t.Errorf("no token: GET %s with Host %s = %d, want %d", c.url, c.host, got, c.want)
		}
	}
	if w := s.logs.find(openMetricsWarning, nil); len(w) != 0 {
		t.Errorf("warned about a loopback metrics address: %v", w)
	}
	s.stop()

	s = startServer(t, "WORKERS=1", "METRICS_ADDR=0.0.0.0:0", "API_TOKEN=a1", "METRICS_TOKEN=m1")
	metrics = s.metricsURL(t)
	if got := hostStatus(t, s.url("/api/agents"), "api.example.com", "a1"); got != 200 {
		t.Errorf("with API_TOKEN: GET /api/agents with Host api.example.com = %d, want 200", got)
	}
	if got := hostStatus(t, metrics+"status.json", "status.example.com", "m1"); got != 200 {
		t.Errorf("with METRICS_TOKEN: GET /status.json with Host status.example.com = %d, want 200", got)
	}
	s.stop()

	s = startServer(t, "WORKERS=1", "API_TOKEN=a1", "ALLOWED_HOSTS=api.example.com,.corp.example")
	for host, want := range map[string]int{"api.example.com": 200, "API.Example.com.:443": 200, "x.corp.example": 200, "corp.example": 200,
		"other.example.com": 421, "10.1.2.3:8000": 200} {
		if got := hostStatus(t, s.url("/api/agents"), host, "a1"); got != want {
			t.Errorf("ALLOWED_HOSTS: GET /api/agents with Host %s = %d, want %d", host, got, want)
		}
	}
	s.stop()

	n := newNotifySocket(t)
	s = startServer(t, "WORKERS=1", "METRICS_ADDR=0.0.0.0:0", "NOTIFY_SOCKET="+n.path)
	if w := s.logs.find(openMetricsWarning, map[string]any{"level": "warn", "addr": "0.0.0.0:0"}); len(w) != 1 {
		t.Errorf("open metrics warnings %v, want one; log:\n%s", w, s.logs)
	}
	n.waitFor(t, "STATUS=1/1 workers ready, 0 requests in flight; WARNING: metrics open to other hosts, no METRICS_TOKEN", 1)
	s.stop()
	s = launch(t, "METRICS_ADDR=0.0.0.0:0", "REQUIRE_TOKEN=yes", "API_TOKEN=a1")
	if code := s.wait(20 * time.Second); code != exitUsage {
		t.Errorf("REQUIRE_TOKEN with an open metrics address: exit %d, want %d", code, exitUsage)
	}
	if out := s.logs.String(); !strings.Contains(out, `invalid METRICS_ADDR "0.0.0.0:0": want a loopback address`) {
		t.Errorf("stderr %q does not name METRICS_ADDR", out)
	}
}
