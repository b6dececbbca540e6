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
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tries is how many times each client sends its oversized body.
const tries = 20

// rawPost writes a whole request with a body of n bytes, without Expect,
// ignoring write errors as a client that writes before it reads does, then
// reads the answer.
func rawPost(addr string, n int) (int, string, http.Header, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, "", nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	head := fmt.Sprintf("POST /api/chat HTTP/1.1\r\nHost: corral.test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", n)
	c.Write([]byte(head))
	c.Write(bytes.Repeat([]byte("a"), n))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return 0, "", nil, err
	}
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), resp.Header, err
}

// isErrorJSON reports whether body is the API's JSON error with code.
func isErrorJSON(body, code string) bool {
	var e struct {
		Error struct{ Code, Message string }
	}
	return json.Unmarshal([]byte(body), &e) == nil && e.Error.Code == code && e.Error.Message != ""
}

// TestOversizeBodyReachesClientAs413 sends a 2 MiB body, whole and without
// Expect, from a raw socket, Python's http.client and Node's fetch: every
// try must read the 413 JSON, not a reset connection; and from Python with
// a Content-Length that is not a number, the 400 JSON.
func TestOversizeBodyReachesClientAs413(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	const size = 2 << 20

	for i := range tries {
		status, body, _, err := rawPost(addr, size)
		if err != nil || status != 413 || !isErrorJSON(body, "body_too_large") || !strings.Contains(body, "the limit is 1 MiB") {
			t.Errorf("raw socket try %d: status %d body %q err %v, want 413 JSON naming the limit", i+1, status, body, err)
		}
	}

	// python sends the body with send (Python statements on connection c),
	// tries times, and prints how many got status and the error code.
	python := func(send string, status int, code string) string {
		return fmt.Sprintf(`
import http.client, json, sys
ok = 0
for i in range(%d):
    c = http.client.HTTPConnection("127.0.0.1", %d, timeout=20)
    try:
        %s
        r = c.getresponse()
        body = json.loads(r.read())
        if r.status == %d and body["error"]["code"] == %q:
            ok += 1
        else:
            print("try", i, r.status, body, file=sys.stderr)
    except Exception as e:
        print("try", i, repr(e), file=sys.stderr)
    finally:
        c.close()
print(ok)
`, tries, s.port, send, status, code)
	}
	python413 := python(fmt.Sprintf(`c.request("POST", "/api/chat", body=b"a" * %d, headers={"Content-Type": "application/json"})`, size),
		413, "body_too_large")
	// A Content-Length the server cannot read: the same lingering close
	// brings its 400 past the body the client still sends.
	pythonBadLength := python(fmt.Sprintf(`c.putrequest("POST", "/api/chat"); c.putheader("Content-Type", "application/json"); `+
		`c.putheader("Content-Length", "2MiB"); c.endheaders(); c.send(b"a" * %d)`, size), 400, "bad_request")
	node := fmt.Sprintf(`
let ok = 0;
(async () => {
  for (let i = 0; i < %d; i++) {
    try {
      const r = await fetch("http://127.0.0.1:%d/api/chat", {method: "POST", headers: {"Content-Type": "application/json"}, body: "a".repeat(%d)});
      const body = await r.json();
      if (r.status === 413 && body.error.code === "body_too_large") ok++;
      else console.error("try", i, r.status, body);
    } catch (e) { console.error("try", i, String(e), e.cause ? String(e.cause) : ""); }
  }
  console.log(ok);
})();
`, tries, s.port, size)
	for _, c := range []struct{ name, prog, arg string }{{"python3", python413, "-c"}, {"node", node, "-e"}, {"python3", pythonBadLength, "-c"}} {
		if _, err := exec.LookPath(c.name); err != nil {
			t.Logf("%s not installed: skipped", c.name)
			continue
		}
		var stderr bytes.Buffer
		cmd := exec.Command(c.name, c.arg, c.prog)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if got := strings.TrimSpace(string(out)); err != nil || got != strconv.Itoa(tries) {
			t.Errorf("%s: %s of %d tries got the error JSON (err %v); stderr:\n%s", c.name, got, tries, err, stderr.String())
		}
	}
}

// TestNormalCloseDoesNotLinger checks that a response the client asked to
// close, and a keep-alive connection, are not held by the lingering close
// meant for refused bodies.
func TestNormalCloseDoesNotLinger(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(s.port))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i, conn := range []string{"keep-alive", "keep-alive", "close"} {
		fmt.Fprintf(c, "GET /health HTTP/1.1\r\nHost: corral.test\r\nConnection: %s\r\n\r\n", conn)
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i+1, err)
		}
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: status %d, want 200", i+1, resp.StatusCode)
		}
	}
	// The server closes at once: well before the 5 s a lingering close
	// could take.
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(4 * time.Second))
	if n, err := br.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("after Connection: close read %d bytes, %v; want EOF", n, err)
	}
	if took := time.Since(start); took > time.Second {
		t.Errorf("server closed %s after the response, want at once", took)
	}
}

// TestRequestHeaderLimit checks the 16 KiB default for the request line
// and headers, the 431 JSON past it, and LIMIT_REQUEST_HEADERS raising it.
func TestRequestHeaderLimit(t *testing.T) {
	t.Parallel()
	get := func(port int, header int) (int, string) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://127.0.0.1:"+strconv.Itoa(port)+"/health", nil)
		req.Header.Set("Authorization", "Bearer "+strings.Repeat("j", header))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("GET /health with a %d-byte header: %v", header, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	s := startServer(t, "WORKERS=1")
	// A bearer JWT plus cookies: past fasthttp's 4 KiB, within 16 KiB.
	if st, body := get(s.port, 15000); st != 200 {
		t.Errorf("15000-byte header: %d %s, want 200", st, body)
	}
	if st, body := get(s.port, 17000); st != 431 || !isErrorJSON(body, "headers_too_large") || !strings.Contains(body, "the limit is 16 KiB") {
		t.Errorf("17000-byte header: %d %s, want 431 JSON naming the limit", st, body)
	}
	s.stop()
	big := startServer(t, "WORKERS=1", "LIMIT_REQUEST_HEADERS=32KiB")
	if st, body := get(big.port, 30000); st != 200 {
		t.Errorf("LIMIT_REQUEST_HEADERS=32KiB, 30000-byte header: %d %s, want 200", st, body)
	}
}

// TestRequestIDEndToEnd follows one request id from the client through the
// response, the access log, the chat's activities and the upstream LLM
// request, with the upstream configured by OpenAI's variable names plus
// Azure's query and api-key header; the key never reaches the log.
func TestRequestIDEndToEnd(t *testing.T) {
	t.Parallel()
	const key, azureKey = "sk-never-logged-4711", "azure-never-logged-0815"
	base, seen := recordingLLM(t)
	s := startServer(t, "WORKERS=1", "ACCESS_LOG=true",
		"OPENAI_BASE_URL="+base+"/openai/deployments/d?api-version=2024-10-21", "OPENAI_API_KEY="+key,
		"LLM_HEADERS=api-key: "+azureKey)

	req, _ := http.NewRequest("POST", s.url("/api/chat?trace=1"), strings.NewReader(`{"agent_id":"default","message":"hi"}`))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "edge-test/1.0")
	req.Header.Set("X-Request-ID", "client-id-42")
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Request-ID") != "client-id-42" {
		t.Fatalf("POST /api/chat = %d %s, X-Request-ID %q; want 200 and the client's id", resp.StatusCode, body, resp.Header.Get("X-Request-ID"))
	}
	var chat chatAnswer
	json.Unmarshal(body, &chat)

	ups := seen()
	if len(ups) != 1 {
		t.Fatalf("upstream saw %d requests, want 1", len(ups))
	}
	u := ups[0]
	for k, want := range map[string]string{"X-Request-Id": "client-id-42", "Authorization": "Bearer " + key, "Api-Key": azureKey} {
		if got := u.header.Get(k); got != want {
			t.Errorf("upstream %s = %q, want %q", k, got, want)
		}
	}
	if u.path != "/openai/deployments/d/chat/completions" || u.query != "api-version=2024-10-21" {
		t.Errorf("upstream URL = %s?%s, want /openai/deployments/d/chat/completions?api-version=2024-10-21", u.path, u.query)
	}

	types := map[string]bool{}
	for _, a := range s.allActivities(t) {
		if a.ChatID != chat.ID {
			continue
		}
		types[a.Type] = true
		if a.Data["request_id"] != "client-id-42" {
			t.Errorf("activity %s data = %v, want request_id client-id-42", a.Type, a.Data)
		}
	}
	if !types["chat.started"] || !types["chat.completed"] {
		t.Errorf("activities of chat %s: %v, want chat.started and chat.completed", chat.ID, types)
	}

	// A background chat runs later, in whichever worker takes its job: the
	// id of the request that queued it still goes upstream and into its
	// activities.
	bg := startBackgroundWith(t, s.url(""), "hi later", "X-Request-ID", "client-bg-7")
	if c, err := getChat(s.url(""), bg, 30); err != nil || c.Status != "completed" {
		t.Fatalf("background chat %s = %+v, %v; want completed", bg, c, err)
	}
	if ups := seen(); len(ups) != 2 || ups[1].header.Get("X-Request-Id") != "client-bg-7" {
		t.Errorf("upstream requests %d, the background one's X-Request-Id %q; want 2 and client-bg-7", len(ups), ups[len(ups)-1].header.Get("X-Request-Id"))
	}
	bgTypes := map[string]bool{}
	for _, a := range s.allActivities(t) {
		if a.ChatID != bg {
			continue
		}
		bgTypes[a.Type] = true
		if a.Type != "chat.started" && a.Data["request_id"] != "client-bg-7" {
			t.Errorf("background activity %s data = %v, want request_id client-bg-7", a.Type, a.Data)
		}
	}
	if !bgTypes["chat.queued"] || !bgTypes["chat.completed"] {
		t.Errorf("activities of background chat %s: %v, want chat.queued and chat.completed", bg, bgTypes)
	}

	var line map[string]any
	waitFor(t, 5*time.Second, func() error {
		lines := s.logs.find("request", map[string]any{"path": "/api/chat"})
		if len(lines) == 0 {
			return errors.New("no access log line for /api/chat")
		}
		line = lines[0]
		return nil
	})
	for k, want := range map[string]string{"method": "POST", "query": "trace=1", "http_version": "1.1", "status": "200",
		"user_agent": "edge-test/1.0", "request_id": "client-id-42", "remote": "127.0.0.1"} {
		if got := fmt.Sprint(line[k]); got != want {
			t.Errorf("access log %s = %q, want %q (line %v)", k, got, want, line)
		}
	}

	// No id, or one that cannot be passed on, gets a new one.
	for _, sent := range []string{"", strings.Repeat("x", 129), "bad\x01id"} {
		req, _ := http.NewRequest("GET", s.url("/health"), nil)
		if sent != "" {
			req.Header["X-Request-Id"] = []string{sent}
		}
		resp, err := fresh.Do(req)
		if err != nil {
			// Go's client refuses to send a control byte; nothing to check.
			continue
		}
		resp.Body.Close()
		if got := resp.Header.Get("X-Request-ID"); len(got) != 32 || strings.Trim(got, "0123456789abcdef") != "" {
			t.Errorf("sent X-Request-ID %q, got %q, want a new 32-hex-digit id", sent, got)
		}
	}
	// Refused requests carry one too.
	status, _, h, err := rawPost("127.0.0.1:"+strconv.Itoa(s.port), 2<<20)
	if err != nil || status != 413 || len(h.Get("X-Request-ID")) != 32 {
		t.Errorf("oversized POST: %d, X-Request-ID %q, %v; want 413 with a new id", status, h.Get("X-Request-ID"), err)
	}

	if logs := s.logs.String(); strings.Contains(logs, key) || strings.Contains(logs, azureKey) {
		t.Errorf("the log shows the API key or the LLM_HEADERS value:\n%s", logs)
	}
}

// chatModel runs a chat and returns the model the reply names.
func (s *server) chatModel(t *testing.T) string {
	t.Helper()
	var out struct{ Model string }
	if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "hi"}, &out); err != nil {
		t.Fatalf("chat: %v", err)
	}
	return out.Model
}

// headerStatus is the status of GET /health with an n-byte header.
func (s *server) headerStatus(t *testing.T, n int) int {
	t.Helper()
	req, _ := http.NewRequest("GET", s.url("/health"), nil)
	req.Header.Set("Cookie", "s="+strings.Repeat("c", n))
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatalf("GET /health with a %d-byte header: %v", n, err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// TestEnvFile reads settings from --env-file: the file's values apply, the
// process environment wins over them and a flag over both; a line that
// cannot be read exits 2 naming the file and the line.
func TestEnvFile(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "corral.env")
	os.WriteFile(path, []byte("# Corral\nexport LLM_MODEL=\"file-model\"\nWORKERS=3\nLIMIT_REQUEST_HEADERS='32KiB' # headers\n"), 0o600)
	s := startServerArgs(t, []string{"--env-file", path, "--limit-request-headers", "20KiB"}, "WORKERS=1", "SIMULATED_LATENCY=0")
	if got := s.chatModel(t); got != "file-model" {
		t.Errorf("chat model = %q, want file-model from the env file", got)
	}
	if n := len(s.workerPIDs()); n != 1 {
		t.Errorf("%d workers, want 1: WORKERS in the environment beats the file's 3", n)
	}
	if st := s.headerStatus(t, 18000); st != 200 {
		t.Errorf("18000-byte header: %d, want 200", st)
	}
	if st := s.headerStatus(t, 25000); st != 431 {
		t.Errorf("25000-byte header: %d, want 431: --limit-request-headers 20KiB beats the file's 32KiB", st)
	}
	s.stop()

	os.WriteFile(path, []byte("A=1\nLLM_API_KEY sk-not-shown\n"), 0o600)
	bad := launchArgs(t, []string{"--env-file=" + path})
	if code := bad.wait(20 * time.Second); code != exitUsage {
		t.Errorf("bad env file: exit %d, want %d", code, exitUsage)
	}
	if out := bad.logs.String(); !strings.Contains(out, path+" line 2: want NAME=VALUE") || strings.Contains(out, "sk-not-shown") {
		t.Errorf("bad env file: stderr %q, want the file and line 2 named and the value not shown", out)
	}
}

// TestEnvFileReload changes the env file under a server in reload mode:
// the worker restarts with the new values.
func TestEnvFileReload(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, ".env")
	os.WriteFile(path, []byte("LLM_MODEL=model-1\n"), 0o600)
	s := startServer(t, "RELOAD=true", "RELOAD_DIRS="+dir, "RELOAD_BUILD=", "ENV_FILE="+path, "SIMULATED_LATENCY=0")
	if got := s.chatModel(t); got != "model-1" {
		t.Fatalf("chat model = %q, want model-1", got)
	}
	os.WriteFile(path, []byte("LLM_MODEL=model-2\n"), 0o600)
	waitFor(t, 30*time.Second, func() error {
		if got := s.chatModel(t); got != "model-2" {
			return fmt.Errorf("chat model = %q, want model-2 after the env file changed", got)
		}
		return nil
	})
}

// TestJournaldPriorities runs the server with its stderr as the journal's
// stream (JOURNAL_STREAM names it, as systemd sets it): every line, the
// master's and the workers', starts with its syslog priority.
func TestJournaldPriorities(t *testing.T) {
	t.Parallel()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var st syscall.Stat_t
	syscall.Fstat(int(w.Fd()), &st)
	exe, _ := os.Executable()
	cmd := exec.Command(exe)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), envAsServer+"=1", "HOST=127.0.0.1", "PORT=0", "LOG_LEVEL=debug", "WORKERS=1",
		"DATABASE_URL=sqlite:"+filepath.Join(cmd.Dir, "server.db"), fmt.Sprintf("JOURNAL_STREAM=%d:%d", st.Dev, st.Ino))
	cmd.Stderr = w
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	done := make(chan struct{})
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(15 * time.Second):
			cmd.Process.Kill()
			<-done
		}
	}()
	lines := make(chan string, 1024)
	go func() {
		defer close(done)
		defer close(lines)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		cmd.Wait()
	}()

	// seen[priority][message], for the master ("m") and the worker ("w").
	seen := map[string]bool{}
	var port int
	deadline := time.After(20 * time.Second)
	next := func() string {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("server exited")
			}
			return l
		case <-deadline:
			t.Fatalf("timed out; seen %v", seen)
		}
		return ""
	}
	for !seen["<3> w handler panicked"] {
		l := next()
		if len(l) < 4 || l[0] != '<' || l[2] != '>' || !strings.ContainsRune("0234567", rune(l[1])) {
			t.Errorf("line without a priority: %q", l)
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(l[3:]), &m); err != nil {
			t.Errorf("line is not <N> and JSON: %q", l)
			continue
		}
		who := "m"
		if _, ok := m["worker"]; ok {
			who = "w"
		}
		msg, _ := m["message"].(string)
		seen[l[:3]+" "+who+" "+msg] = true
		if msg == "Corral running, press CTRL+C to quit" {
			u, _ := m["url"].(string)
			_, p, _ := net.SplitHostPort(strings.TrimPrefix(u, "http://"))
			port, _ = strconv.Atoi(p)
			if l[:3] != "<6>" {
				t.Errorf("info line with priority %s: %q", l[:3], l)
			}
		}
		if msg == "Application startup complete" && port != 0 {
			resp, err := fresh.Get("http://127.0.0.1:" + strconv.Itoa(port) + "/test/panic")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
		}
	}
	for _, want := range []string{"<6> m Corral running, press CTRL+C to quit", "<3> w handler panicked"} {
		if !seen[want] {
			t.Errorf("no line %q; seen %v", want, seen)
		}
	}
	debug := false
	for k := range seen {
		debug = debug || strings.HasPrefix(k, "<7> ")
	}
	if !debug {
		t.Errorf("no debug line with <7>; seen %v", seen)
	}
}

// TestMetricsPromtool checks /metrics with Prometheus's own linter: one
// # HELP and one # TYPE line per family (the master's aggregation keeps
// them), names by Prometheus's conventions, and corral_build_info. It
// runs where promtool is installed (Debian package prometheus).
func TestMetricsPromtool(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=2", "METRICS_ADDR=127.0.0.1:0", "SIMULATED_LATENCY=0")
	base := s.metricsURL(t)
	for range 4 {
		if _, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "count me"}, &chatAnswer{}); err != nil {
			t.Fatal(err)
		}
		s.postJSON("/api/agents/nobody", nil, nil)
	}
	var text string
	waitFor(t, 10*time.Second, func() error {
		_, text = get(t, base+"metrics", "")
		if !strings.Contains(text, "corral_llm_call_duration_seconds_bucket") {
			return errors.New("no LLM call histogram yet")
		}
		return nil
	})
	if v, ok := sample(text, `corral_build_info{version="dev",goversion="`+runtime.Version()+`"}`); !ok || v != 1 {
		t.Errorf("corral_build_info = %v, %v; want 1 with version and goversion labels", v, ok)
	}
	help, typ := map[string]int{}, map[string]int{}
	for _, l := range strings.Split(text, "\n") {
		if f := strings.Fields(l); len(f) >= 4 && f[0] == "#" {
			switch f[1] {
			case "HELP":
				help[f[2]]++
			case "TYPE":
				typ[f[2]]++
			}
		}
	}
	for name, n := range typ {
		if n != 1 || help[name] != 1 {
			t.Errorf("family %s: %d # TYPE and %d # HELP lines, want one each", name, n, help[name])
		}
	}
	for _, fam := range []string{"corral_http_requests_total", "corral_http_request_duration_seconds", "corral_workers", "go_goroutines", "process_resident_memory_bytes"} {
		if typ[fam] != 1 {
			t.Errorf("family %s has no # TYPE line", fam)
		}
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Log("promtool not installed (Debian package prometheus): the lint is skipped")
		return
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	out, err := cmd.CombinedOutput()
	if err != nil || len(out) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

// TestJournaldPriorityOfStartErrors: the plain-text error a bad setting
// gets before any logger exists starts with the error priority on the
// journal's stream, and with nothing elsewhere.
func TestJournaldPriorityOfStartErrors(t *testing.T) {
	t.Parallel()
	exe, _ := os.Executable()
	f, err := os.Create(filepath.Join(t.TempDir(), "journal"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &st)
	for _, journal := range []string{fmt.Sprintf("%d:%d", st.Dev, st.Ino), ""} {
		f.Truncate(0)
		f.Seek(0, 0)
		cmd := exec.Command(exe)
		cmd.Env = append(os.Environ(), envAsServer+"=1", "WORKERS=many", "JOURNAL_STREAM="+journal)
		cmd.Stderr = f
		if err := cmd.Run(); err == nil {
			t.Fatal("WORKERS=many: the server started")
		}
		out, _ := os.ReadFile(f.Name())
		lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
		want := "<3>"
		if journal == "" {
			want = ""
		}
		if !strings.HasPrefix(lines[0], want+`server: invalid WORKERS "many"`) {
			t.Errorf("JOURNAL_STREAM=%q: stderr\n%s\nwant its first line to start with %q", journal, out, want+"server: invalid WORKERS")
		}
		for _, l := range lines {
			if strings.HasPrefix(l, "<") != (want != "") {
				t.Errorf("JOURNAL_STREAM=%q: line %q", journal, l)
			}
		}
	}
}
