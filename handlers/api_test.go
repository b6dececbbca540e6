package handlers

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestHealth(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	r := a.get("/health")
	wantStatus(t, "GET /health", r, http.StatusOK)
	h := decodeBody[map[string]any](t, "GET /health", r)
	if h["status"] != "ok" || h["worker"] != float64(testWorkerSlot) || h["pid"] != float64(4242) || h["generation"] != float64(1) || h["uptime_s"] == nil {
		t.Errorf("GET /health = %v, want status ok, worker %d, pid 4242, generation 1 and uptime_s", h, testWorkerSlot)
	}
	if r := a.do(http.MethodHead, "/health", nil); r.status != http.StatusOK || len(r.body) != 0 {
		t.Errorf("HEAD /health = %d %q, want 200 and no body", r.status, r.body)
	}
}

func TestMethodNotAllowed(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	for _, tc := range []struct{ method, path, allow string }{
		{http.MethodPost, "/health", "GET, HEAD"},
		{http.MethodGet, "/api/chat", "POST"},
		{http.MethodDelete, "/api/chat", "POST"},
		{http.MethodPut, "/api/agents", "GET, HEAD, POST"},
		{http.MethodDelete, "/api/agents", "GET, HEAD, POST"},
		{http.MethodPost, "/api/agents/default", "GET, HEAD, DELETE"},
		{http.MethodPatch, "/api/agents/default", "GET, HEAD, DELETE"},
		{http.MethodPost, "/api/activities", "GET, HEAD"},
		{http.MethodPost, "/api/activities/stream", "GET"},
		{http.MethodOptions, "/api/agents", "GET, HEAD, POST"},
	} {
		what := tc.method + " " + tc.path
		r := a.do(tc.method, tc.path, nil)
		wantError(t, what, r, http.StatusMethodNotAllowed, "method_not_allowed")
		if got := r.header.Get("Allow"); got != tc.allow {
			t.Errorf("%s: Allow = %q, want %q", what, got, tc.allow)
		}
	}
	// The default agent survived the DELETE-less tries above.
	wantStatus(t, "GET /api/agents/default", a.get("/api/agents/default"), http.StatusOK)
}

func TestNoRoute(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	for _, path := range []string{"/", "/nope", "/api", "/api/", "/api/nope", "/api/chat/x", "/api/activities/x", "/healthz"} {
		wantError(t, "GET "+path, a.get(path), http.StatusNotFound, "not_found", "no such route")
	}
}

func TestUnsupportedMediaType(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	body := []byte(`{"agent_id": "default", "message": "hi"}`)
	for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded", "application/jsonx", "multipart/form-data; boundary=x"} {
		for _, path := range []string{"/api/chat", "/api/agents"} {
			what := "POST " + path + " with Content-Type " + ct
			r := a.do(http.MethodPost, path, body, "Content-Type", ct)
			wantError(t, what, r, http.StatusUnsupportedMediaType, "unsupported_media_type", "application/json")
		}
	}
	for _, ct := range []string{"application/json; charset=utf-8", "Application/JSON", " application/json "} {
		r := a.do(http.MethodPost, "/api/chat", body, "Content-Type", ct)
		wantStatus(t, "POST /api/chat with Content-Type "+ct, r, http.StatusOK)
	}
}

// TestContentEncoding: the API takes identity bodies only. A compressed
// body, or a plain one labelled compressed, is a 415 naming the header,
// never decoded as if plain.
func TestContentEncoding(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	bodies := map[string]string{
		"/api/chat":   `{"agent_id": "default", "message": "hi"}`,
		"/api/agents": `{"name": "n", "system_prompt": "p"}`,
	}
	for path, plain := range bodies {
		var gz bytes.Buffer
		zw := gzip.NewWriter(&gz)
		zw.Write([]byte(plain))
		zw.Close()
		for _, tc := range []struct {
			name string
			body []byte
			enc  string
		}{
			{"gzip body", gz.Bytes(), "gzip"},
			{"plain body said gzip", []byte(plain), "gzip"},
			{"plain body said GZIP", []byte(plain), "GZIP"},
			{"plain body said br", []byte(plain), "br"},
			{"plain body said deflate", []byte(plain), "deflate"},
			{"plain body said identity, gzip", []byte(plain), "identity, gzip"},
		} {
			what := "POST " + path + " " + tc.name
			r := a.do(http.MethodPost, path, tc.body, "Content-Encoding", tc.enc)
			wantError(t, what, r, http.StatusUnsupportedMediaType, "unsupported_media_type", "Content-Encoding", "identity")
			if got := r.header.Get("Accept-Encoding"); got != "identity" {
				t.Errorf("%s: Accept-Encoding = %q, want identity", what, got)
			}
		}
	}
	if acts := activitiesAfter(t, a.st, cursor); len(acts) != 0 {
		t.Errorf("encoded bodies wrote %+v, want nothing", acts)
	}
	for _, enc := range []string{"identity", "Identity", ""} {
		wantStatus(t, "POST /api/chat with Content-Encoding "+enc,
			a.do(http.MethodPost, "/api/chat", []byte(bodies["/api/chat"]), "Content-Encoding", enc), http.StatusOK)
		wantStatus(t, "POST /api/agents with Content-Encoding "+enc,
			a.do(http.MethodPost, "/api/agents", []byte(bodies["/api/agents"]), "Content-Encoding", enc), http.StatusCreated)
	}
}

func TestMalformedBodies(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	cursor := lastActivity(t, a.st)
	deep := strings.Repeat(`{"a":`, 20000) + `1` + strings.Repeat(`}`, 20000)
	deepArray := `{"agent_id": "default", "message": "hi", "extra": ` + strings.Repeat("[", 100000) + strings.Repeat("]", 100000) + `}`
	for _, tc := range []struct {
		name string
		body []byte
		want string
	}{
		{"empty", []byte(""), "empty"},
		{"blank", []byte(" \r\n\t"), "empty"},
		{"truncated", []byte(`{"agent_id": "default", "message": "hi"`), "invalid JSON"},
		{"syntax", []byte(`{"agent_id": "default", message: "hi"}`), "invalid JSON at byte"},
		{"trailing comma", []byte(`{"agent_id": "default", "message": "hi",}`), "invalid JSON"},
		{"two values", []byte(`{"agent_id": "default", "message": "hi"} {}`), "more than one value"},
		{"stray brace", []byte(`{"agent_id": "default", "message": "hi"}}`), "more than one value"},
		{"stray bracket", []byte(`{"agent_id": "default", "message": "hi"}]`), "more than one value"},
		{"deeply nested object", []byte(deep), "invalid JSON"},
		{"deeply nested unknown field", []byte(deepArray), "invalid JSON"},
		{"invalid UTF-8", []byte("{\"agent_id\": \"default\", \"message\": \"h\xffi\"}"), "UTF-8"},
		{"overlong UTF-8", []byte("{\"agent_id\": \"default\", \"message\": \"\xc0\xaf\"}"), "UTF-8"},
		// Every JSON value that is not an object gets the same answer.
		{"number body", []byte(`42`), "request body must be a JSON object"},
		{"null body", []byte(`null`), "request body must be a JSON object"},
		{"null body with spaces", []byte(" \n null \t"), "request body must be a JSON object"},
		{"empty array body", []byte(`[]`), "request body must be a JSON object"},
		{"string body", []byte(`"x"`), "request body must be a JSON object"},
		{"true body", []byte(`true`), "request body must be a JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := a.on(t)
			for _, path := range []string{"/api/chat", "/api/agents"} {
				r := a.do(http.MethodPost, path, tc.body)
				e := wantError(t, "POST "+path+" "+tc.name, r, http.StatusBadRequest, "bad_request", tc.want)
				if bytes.Contains(r.body, []byte("\xff")) || !strings.HasPrefix(e.Error.Message, strings.ToLower(e.Error.Message[:1])) {
					t.Errorf("POST %s %s: message %q, want lowercase valid text", path, tc.name, e.Error.Message)
				}
			}
		})
	}
	if acts := activitiesAfter(t, a.st, cursor); len(acts) != 0 {
		t.Errorf("malformed requests wrote %+v, want nothing", acts)
	}
}

// TestBodyTooLarge: the worker package answers 413 through WriteError (the
// test server wires it the same way); the answer has the one error shape
// and does not echo fasthttp's error. Only the headers are sent: a server
// that refuses a body closes the connection, and a client still writing
// it would get a reset instead of the answer.
func TestBodyTooLarge(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	c, err := net.Dial("tcp", a.addr)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", 2<<20)
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("read answer to a 2 MiB body: %v", err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("read body: %v", err)
	}
	r := response{status: res.StatusCode, header: res.Header, body: body}
	wantError(t, "POST /api/chat of 2 MiB", r, http.StatusRequestEntityTooLarge, "body_too_large", "too large")
	if bytes.Contains(body, []byte("body size exceeds")) {
		t.Errorf("413 answer %s quotes fasthttp's error", body)
	}
}

// TestMalformedRequests sends requests fasthttp cannot read over raw TCP:
// each gets the one error shape with a message naming the part at fault
// (WriteError's requestFaults), and none quotes the request. Every bad
// value holds the marker "zqmark" to catch an echo.
func TestMalformedRequests(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{})
	const post = "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
	const chunked = post + "Transfer-Encoding: chunked\r\n\r\n"
	for _, tc := range []struct {
		name, req string
		status    int
		code, msg string
	}{
		{"missing Host", "POST /api/chat HTTP/1.1\r\nX-Zqmark: 1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", 400, "bad_request", "missing Host header"},
		{"two Host headers", "GET /health HTTP/1.1\r\nHost: x\r\nHost: zqmark\r\n\r\n", 400, "bad_request", "more than one Host header"},
		{"Content-Length not a number", post + "Content-Length: zqmark\r\n\r\n{}", 400, "bad_request", "invalid Content-Length header"},
		{"negative Content-Length", post + "Content-Length: -1\r\nX-Zqmark: 1\r\n\r\n{}", 400, "bad_request", "invalid Content-Length header"},
		{"Content-Length with trailing bytes", post + "Content-Length: 2zqmark\r\n\r\n{}", 400, "bad_request", "invalid Content-Length header"},
		{"two Content-Length headers", post + "Content-Length: 2\r\nContent-Length: 3\r\nX-Zqmark: 1\r\n\r\n{}", 400, "bad_request", "more than one Content-Length header"},
		{"unknown Transfer-Encoding", post + "Transfer-Encoding: zqmark\r\n\r\n{}", 400, "bad_request", "Transfer-Encoding header"},
		{"chunk size not hex", chunked + "zqmark\r\n{}\r\n0\r\n\r\n", 400, "bad_request", "invalid chunked body"},
		{"two Transfer-Encoding headers", post + "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nX-Zqmark: 1\r\n\r\n0\r\n\r\n", 400, "bad_request", "Transfer-Encoding header"},
		{"chunk size too large", chunked + "fffffffffffffffffffff\r\nzqmark\r\n0\r\n\r\n", 400, "bad_request", "invalid chunked body"},
		{"chunk without its CRLF", chunked + "2\r\n{}zqmark\r\n0\r\n\r\n", 400, "bad_request", "invalid chunked body"},
		{"forbidden trailer", chunked + "2\r\n{}\r\n0\r\nHost: zqmark\r\n\r\n", 400, "bad_request", "invalid chunked body trailer"},
		{"control byte in a trailer", chunked + "2\r\n{}\r\n0\r\nX-Y: zq\x01mark\r\n\r\n", 400, "bad_request", "invalid chunked body trailer"},
		{"header without colon", "GET /health HTTP/1.1\r\nHost: x\r\nZqmark\r\n\r\n", 400, "bad_request", "malformed header line"},
		{"space before colon", "GET /health HTTP/1.1\r\nHost: x\r\nZqmark : v\r\n\r\n", 400, "bad_request", "invalid header name"},
		{"control byte in a header name", "GET /health HTTP/1.1\r\nHost: x\r\nX-\x01Zqmark: v\r\n\r\n", 400, "bad_request", "malformed header line"},
		{"control byte in a header value", "GET /health HTTP/1.1\r\nHost: x\r\nX-Y: zq\x01mark\r\n\r\n", 400, "bad_request", "invalid character in a header value"},
		{"garbage request line", "ZQMARK\r\n\r\n", 400, "bad_request", "malformed request line"},
		{"bad method", "G@T /zqmark HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "malformed request line"},
		{"no HTTP version", "GET /zqmark\r\nHost: x\r\n\r\n", 400, "bad_request", "malformed request line"},
		{"unknown protocol", "GET /zqmark ZQMARK/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "malformed request line"},
		{"empty target", "GET  HTTP/1.1\r\nHost: zqmark\r\n\r\n", 400, "bad_request", "malformed request line"},
		{"NUL in the target", "GET /zq\x00mark HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request", "invalid request target"},
		// Past the 4 KiB read buffer (fasthttp's default ReadBufferSize,
		// which the worker keeps), a query string included.
		{"long query string", "GET /api/activities?type=zqmark" + strings.Repeat("a", 5000) + " HTTP/1.1\r\nHost: x\r\n\r\n", 431, "headers_too_large", "too large"},
		{"long header", "GET /health HTTP/1.1\r\nHost: x\r\nX-Zqmark: " + strings.Repeat("a", 5000) + "\r\n\r\n", 431, "headers_too_large", "too large"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", a.addr)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.WriteString(c, tc.req); err != nil {
				t.Fatalf("write request: %v", err)
			}
			res, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatalf("read answer: %v", err)
			}
			defer res.Body.Close()
			body, err := io.ReadAll(res.Body)
			if err != nil {
				t.Fatalf("read body: %v", err)
			}
			r := response{status: res.StatusCode, header: res.Header, body: body}
			wantError(t, tc.name, r, tc.status, tc.code, tc.msg)
			if bytes.Contains(bytes.ToLower(body), []byte("zqmark")) {
				t.Errorf("%s: answer %s quotes the request", tc.name, body)
			}
		})
	}
}

func TestAuth(t *testing.T) {
	t.Parallel()
	a := newAPI(t, Config{APITokens: []string{"tok-one", "tok-two-longer"}})
	for _, tc := range []struct{ name, auth string }{
		{"none", ""},
		{"wrong token", "Bearer tok-three"},
		{"prefix of a token", "Bearer tok-"},
		{"token plus more", "Bearer tok-onex"},
		{"no scheme", "tok-one"},
		{"basic scheme", "Basic dG9rLW9uZTo="},
		{"empty bearer", "Bearer "},
	} {
		for _, path := range []string{"/api/agents", "/api/activities", "/api/nope"} {
			var hdr []string
			if tc.auth != "" {
				hdr = []string{"Authorization", tc.auth}
			}
			r := a.get(path, hdr...)
			wantError(t, "GET "+path+" with "+tc.name, r, http.StatusUnauthorized, "unauthorized", "bearer token")
			if got := r.header.Get("WWW-Authenticate"); !strings.HasPrefix(got, "Bearer") {
				t.Errorf("GET %s with %s: WWW-Authenticate = %q, want a Bearer challenge", path, tc.name, got)
			}
		}
	}
	r := a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`)
	wantError(t, "POST /api/chat without a token", r, http.StatusUnauthorized, "unauthorized")

	for _, auth := range []string{"Bearer tok-one", "Bearer tok-two-longer", "bearer tok-one", "BEARER  tok-two-longer "} {
		wantStatus(t, "GET /api/agents with "+auth, a.get("/api/agents", "Authorization", auth), http.StatusOK)
	}
	r = a.post("/api/chat", `{"agent_id": "default", "message": "hi"}`, "Authorization", "Bearer tok-two-longer")
	wantStatus(t, "POST /api/chat with a token", r, http.StatusOK)

	wantStatus(t, "GET /health without a token", a.get("/health"), http.StatusOK)
	// Outside /api/ there is nothing to protect: a 404 says so.
	wantError(t, "GET /nope without a token", a.get("/nope"), http.StatusNotFound, "not_found")
}

// TestIdempotencyKeyHeader: a key that cannot be one is a 400 naming the
// header, and so are two keys, where either guess would be wrong.
func TestIdempotencyKeyHeader(t *testing.T) {
	a := newAPI(t, Config{})
	body := []byte(`{"agent_id":"default","message":"hi"}`)
	for what, headers := range map[string][]string{
		"empty":        {"Idempotency-Key", ""},
		"too long":     {"Idempotency-Key", strings.Repeat("k", 256)},
		"with a space": {"Idempotency-Key", "a b"},
		"given twice":  {"Idempotency-Key", "one", "Idempotency-Key", "two"},
		"twice, same":  {"Idempotency-Key", "one", "Idempotency-Key", "one"},
	} {
		wantError(t, "POST /api/chat, Idempotency-Key "+what, a.do(http.MethodPost, "/api/chat", body, headers...),
			http.StatusBadRequest, "bad_request", "Idempotency-Key")
	}
	wantStatus(t, "POST /api/chat with one key", a.do(http.MethodPost, "/api/chat", body, "Idempotency-Key", "one"), http.StatusOK)
}

func TestCORS(t *testing.T) {
	t.Parallel()
	const allowed = "https://app.example.com"
	a := newAPI(t, Config{CORSOrigins: []string{allowed}, APITokens: []string{"tok"}})
	auth := []string{"Authorization", "Bearer tok"}

	r := a.get("/api/agents", append(auth, "Origin", allowed)...)
	wantStatus(t, "GET from an allowed origin", r, http.StatusOK)
	if got := r.header.Get("Access-Control-Allow-Origin"); got != allowed {
		t.Errorf("allowed origin: Access-Control-Allow-Origin = %q, want %q", got, allowed)
	}
	if got := r.header.Values("Vary"); !contains(got, "Origin") {
		t.Errorf("allowed origin: Vary = %q, want Origin", got)
	}

	// A preflight carries no credentials and must not need any.
	r = a.do(http.MethodOptions, "/api/chat", nil, "Origin", allowed,
		"Access-Control-Request-Method", "POST", "Access-Control-Request-Headers", "authorization, content-type")
	if r.status != http.StatusNoContent {
		t.Fatalf("preflight from an allowed origin = %d %s, want 204", r.status, r.body)
	}
	for h, want := range map[string]string{
		"Access-Control-Allow-Origin":  allowed,
		"Access-Control-Allow-Methods": "POST",
		"Access-Control-Allow-Headers": "Authorization",
		"Access-Control-Max-Age":       "600",
	} {
		if got := r.header.Get(h); !strings.Contains(got, want) {
			t.Errorf("preflight %s = %q, want it to contain %q", h, got, want)
		}
	}
	// Every request header the API reads may be sent, and every response
	// header its clients read (docs/api.md) may be read by the script.
	for _, h := range []string{"Content-Type", "Idempotency-Key", "Last-Event-ID", "Prefer", "X-Request-ID"} {
		if got := r.header.Get("Access-Control-Allow-Headers"); !strings.Contains(got, h) {
			t.Errorf("preflight Access-Control-Allow-Headers = %q, want %s", got, h)
		}
	}
	r = a.do(http.MethodPost, "/api/chat", []byte(`{"agent_id":"default","message":"hi"}`),
		append(auth, "Origin", allowed, "Content-Type", "application/json")...)
	for _, h := range []string{"Idempotent-Replayed", "Location", "Preference-Applied", "Retry-After", "X-Chat-Id", "X-Request-ID"} {
		if got := r.header.Get("Access-Control-Expose-Headers"); !strings.Contains(got, h) {
			t.Errorf("POST /api/chat from an allowed origin: Access-Control-Expose-Headers = %q, want %s", got, h)
		}
	}
	if r.header.Get("X-Chat-Id") == "" {
		t.Errorf("POST /api/chat from an allowed origin = %d %s, want an X-Chat-Id to expose", r.status, r.body)
	}

	for _, origin := range []string{"https://evil.example.com", "http://app.example.com", "https://app.example.com.evil.net", "null"} {
		r = a.get("/api/agents", append(auth, "Origin", origin)...)
		wantStatus(t, "GET from "+origin, r, http.StatusOK)
		if got := r.header.Get("Access-Control-Allow-Origin"); got != "" {
			t.Errorf("GET from %s: Access-Control-Allow-Origin = %q, want none", origin, got)
		}
		r = a.do(http.MethodOptions, "/api/chat", nil, "Origin", origin, "Access-Control-Request-Method", "POST")
		if r.status == http.StatusNoContent || r.header.Get("Access-Control-Allow-Origin") != "" || r.header.Get("Access-Control-Allow-Methods") != "" {
			t.Errorf("preflight from %s = %d with CORS headers %v, want a refusal without them", origin, r.status, r.header)
		}
	}

	// No list: no CORS headers for anyone.
	b := newAPI(t, Config{})
	r = b.do(http.MethodOptions, "/api/chat", nil, "Origin", allowed, "Access-Control-Request-Method", "POST")
	if r.status == http.StatusNoContent || r.header.Get("Access-Control-Allow-Origin") != "" {
		t.Errorf("preflight with no CORS list = %d %v, want a refusal without CORS headers", r.status, r.header)
	}

	// "*" allows any origin, echoed.
	c := newAPI(t, Config{CORSOrigins: []string{"*"}})
	r = c.get("/api/agents", "Origin", "http://localhost:5173")
	if got := r.header.Get("Access-Control-Allow-Origin"); got != "http://localhost:5173" {
		t.Errorf("CORS *: Access-Control-Allow-Origin = %q, want the origin echoed", got)
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		for _, part := range strings.Split(v, ",") {
			if strings.TrimSpace(part) == s {
				return true
			}
		}
	}
	return false
}
