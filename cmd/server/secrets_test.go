package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMalformedRequestLogsNoToken sends requests fasthttp cannot read, each
// carrying a bearer token and a ?token= query parameter, to a server
// logging at debug level with the access log on, and checks that neither
// secret reaches any log line: fasthttp quotes a malformed request's raw
// bytes in its errors unless told not to.
func TestMalformedRequestLogsNoToken(t *testing.T) {
	t.Parallel()
	s := startServer(t, "LOG_LEVEL=debug", "ACCESS_LOG=true", "LIMIT_REQUEST_HEADERS=4KiB")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	const bearer, query = "bearer-SECRET-7f3a9c", "query-SECRET-41d2e8"
	head := "GET /api/agents?token=" + query + " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + bearer + "\r\n"
	malformed := map[string]string{
		"a header line without a colon": head + "this line has no colon\r\n\r\n",
		"a bad Content-Length":          head + "Content-Length: 12x\r\n\r\n",
		"headers over the limit":        head + "X-Pad: " + strings.Repeat("a", 5000) + "\r\n\r\n",
		"a bad request line":            "GET /api/agents?token=" + query + " HTTP/1.1 extra\r\nAuthorization: Bearer " + bearer + "\r\n\r\n",
		"a body shorter than announced": strings.Replace(head, "GET", "POST", 1) + "Content-Length: 10\r\nTransfer-Encoding: bogus\r\n\r\nabc",
	}
	for name, req := range malformed {
		o := rawExchange(addr, []byte(req), 5*time.Second)
		if o.err != nil || o.status != 0 && o.status < 400 {
			t.Errorf("%s: got %v (%v), want a 4xx or a close", name, o, o.err)
		}
	}
	// A request after them all is logged once the malformed ones were.
	if _, err := s.health(fresh); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if len(s.logs.find("fasthttp", nil)) == 0 && !strings.Contains(s.logs.String(), `"status":400`) {
			return fmt.Errorf("no trace of the malformed requests in the log:\n%s", s.logs)
		}
		return nil
	})
	s.stop()
	for _, line := range strings.Split(s.logs.String(), "\n") {
		if strings.Contains(line, "SECRET") {
			t.Errorf("a secret in a log line: %s", line)
		}
	}
}

// TestDatabaseURLPasswordNotPrinted: a PostgreSQL URL whose password holds
// an unescaped @ used to split after the first @, and the connection
// error printed the rest of the password as part of the host name. It is
// refused before anything starts, with a message that says to
// percent-encode and shows no part of the password.
func TestDatabaseURLPasswordNotPrinted(t *testing.T) {
	t.Parallel()
	for _, password := range []string{"hunter@2secret", "hunter/2@secret", "hunter?2@secret"} {
		s := launch(t, "DATABASE_URL=postgres://corral:"+password+"@127.0.0.1:1/corral")
		if code := s.wait(20 * time.Second); code != exitUsage {
			t.Errorf("password %q: exit %d, want %d", password, code, exitUsage)
		}
		out := s.logs.String()
		if !strings.Contains(out, `invalid DATABASE_URL "postgres://xxxxx@127.0.0.1:1/corral": want a postgres:// URL whose user name and password are percent-encoded (@ is %40`) {
			t.Errorf("password %q: stderr %q does not ask to percent-encode", password, out)
		}
		for _, piece := range []string{"hunter", "secret"} {
			if strings.Contains(out, piece) {
				t.Errorf("password %q: stderr shows %q: %s", password, piece, out)
			}
		}
	}
}

// TestWorkersGetWhatTheyUse: a worker's environment and CORRAL_ARGS hold
// no setting only the master uses: not the metrics token, nor where to
// bind, nor how many workers. The settings workers use still reach them.
func TestWorkersGetWhatTheyUse(t *testing.T) {
	t.Parallel()
	const token = "metrics-SECRET-5be01c"
	control := filepath.Join(t.TempDir(), "c.sock")
	s := startServerArgs(t, []string{"--workers", "2", "--metrics-addr=127.0.0.1:0", "--control-socket", control, "--timeout-keep-alive", "7", "--no-access-log"},
		"METRICS_TOKEN="+token, "LIMIT_MAX_REQUESTS=100000", "CORS_ORIGINS=https://app.example.com")
	pids := s.workerPIDs()
	if len(pids) != 2 {
		t.Fatalf("workers %v, want 2", pids)
	}
	for _, pid := range pids {
		raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil {
			t.Fatal(err)
		}
		env := map[string]string{}
		for _, kv := range strings.Split(string(raw), "\x00") {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
		for _, k := range []string{"METRICS_TOKEN", "HOST", "PORT", "TIMEOUT_WORKER_HEALTHCHECK", "LIMIT_MAX_REQUESTS"} {
			if v, ok := env[k]; ok {
				t.Errorf("worker %d has %s=%q in its environment", pid, k, v)
			}
		}
		for _, k := range []string{"CORS_ORIGINS", "DATABASE_URL", "LOG_FORMAT"} {
			if _, ok := env[k]; !ok {
				t.Errorf("worker %d lacks %s, a setting it uses", pid, k)
			}
		}
		var args []string
		if err := json.Unmarshal([]byte(env["CORRAL_ARGS"]), &args); err != nil {
			t.Fatalf("worker %d: CORRAL_ARGS %q: %v", pid, env["CORRAL_ARGS"], err)
		}
		if want := []string{"--timeout-keep-alive=7", "--no-access-log=true"}; !slices.Equal(args, want) {
			t.Errorf("worker %d: CORRAL_ARGS = %q, want %q", pid, args, want)
		}
	}
	// The master still uses what the workers were not given.
	if code, _ := get(t, s.metricsURL(t)+"metrics", token); code != 200 {
		t.Errorf("GET /metrics with the token = %d, want 200", code)
	}
	req, _ := http.NewRequest("OPTIONS", s.url("/api/agents"), nil)
	req.Header.Set("Origin", "https://app.example.com")
	req.Header.Set("Access-Control-Request-Method", "POST")
	resp, err := fresh.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if got := resp.Header.Get("Access-Control-Allow-Origin"); got != "https://app.example.com" {
		t.Errorf("CORS preflight: Access-Control-Allow-Origin %q, want the origin: the workers lost CORS_ORIGINS", got)
	}
}
