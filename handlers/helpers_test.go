package handlers

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// testAPI is a Handler served by a real fasthttp.Server on a loopback TCP
// port, over a real SQLite store in t.TempDir(). The disconnect watcher
// needs a real socket, so no in-memory listener here.
type testAPI struct {
	t      *testing.T
	url    string // "http://127.0.0.1:port"
	addr   string // "127.0.0.1:port"
	dbURL  string
	st     *store.Store
	h      *Handler
	client *http.Client
}

// testWorkerSlot is the worker slot the test handler reports.
const testWorkerSlot = 3

// newAPI serves New(cfg) on 127.0.0.1:0. cfg.Store defaults to a migrated
// SQLite store on a new file and cfg.LLM to an instant simulated provider;
// the store is available as a.st either way. Everything is torn down at
// cleanup.
func newAPI(t *testing.T, cfg Config) *testAPI {
	t.Helper()
	return newTunedAPI(t, cfg, nil, nil)
}

// newWrappedAPI is newAPI with cfg.Store set to wrap(store): a spy or a
// failing store around the real one.
func newWrappedAPI(t *testing.T, cfg Config, wrap func(*store.Store) Store) *testAPI {
	t.Helper()
	return newTunedAPI(t, cfg, wrap, nil)
}

// newTunedAPI is newAPI with the store wrapped by wrap and the server
// adjusted by tune, each when not nil.
func newTunedAPI(t *testing.T, cfg Config, wrap func(*store.Store) Store, tune func(*fasthttp.Server)) *testAPI {
	t.Helper()
	dbURL := "sqlite:" + filepath.Join(t.TempDir(), "data", "corral.db")
	st := openStore(t, dbURL)
	if err := st.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	switch {
	case wrap != nil:
		cfg.Store = wrap(st)
	case cfg.Store == nil:
		cfg.Store = st
	}
	if cfg.LLM == nil {
		cfg.LLM = llm.NewSimulated(llm.SimulatedConfig{})
	}
	if cfg.Worker == (Worker{}) {
		cfg.Worker = Worker{Slot: testWorkerSlot, Generation: 1, PID: 4242, Started: time.Now()}
	}
	h := New(cfg)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	srv := &fasthttp.Server{
		Handler:            h.Serve,
		MaxRequestBodySize: 1 << 20,
		// As the worker package does (worker/serve.go serveError): an
		// oversized body is a 413 and oversized headers a 431 in the API's
		// one error shape, not fasthttp's plain-text 400.
		ErrorHandler: func(ctx *fasthttp.RequestCtx, err error) {
			status := fasthttp.StatusBadRequest
			var small *fasthttp.ErrSmallBuffer
			var ne net.Error
			switch {
			case errors.Is(err, fasthttp.ErrBodyTooLarge):
				status = fasthttp.StatusRequestEntityTooLarge
			case errors.As(err, &small):
				status = fasthttp.StatusRequestHeaderFieldsTooLarge
			case errors.As(err, &ne) && ne.Timeout():
				status = fasthttp.StatusRequestTimeout
			}
			ctx.SetConnectionClose()
			WriteError(ctx, status, err)
		},
		CloseOnShutdown:              true,
		NoDefaultServerHeader:        true,
		DisablePreParseMultipartForm: true, // as the worker package
		Logger:                       quietLogger{},
	}
	if tune != nil {
		tune(srv)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()

	a := &testAPI{
		t:      t,
		url:    "http://" + ln.Addr().String(),
		addr:   ln.Addr().String(),
		dbURL:  dbURL,
		st:     st,
		h:      h,
		client: &http.Client{Transport: &http.Transport{DisableCompression: true}},
	}
	// Cleanups run last-in first-out: the server goes first, then the
	// handler's watcher, then (registered earlier by openStore) the store.
	t.Cleanup(h.Close)
	t.Cleanup(func() {
		a.client.CloseIdleConnections()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.ShutdownWithContext(ctx); err != nil {
			t.Errorf("server shutdown: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve() = %v", err)
		}
	})
	return a
}

// on returns a with its helpers reporting to t, for subtests: a failure
// must stop the subtest, not its parent.
func (a *testAPI) on(t *testing.T) *testAPI {
	b := *a
	b.t = t
	return &b
}

// openStore opens the store at dbURL and closes it at cleanup. A second
// call on the same URL is what another worker process has: its own pool
// and its own activity poller.
func openStore(t *testing.T, dbURL string) *store.Store {
	t.Helper()
	st, err := store.Open(t.Context(), dbURL, store.Options{Host: "test-host"})
	if err != nil {
		t.Fatalf("store.Open(%s) = %v", dbURL, err)
	}
	t.Cleanup(func() {
		if err := st.Close(); err != nil {
			t.Errorf("store Close() = %v", err)
		}
	})
	return st
}

// response is a whole answer, read.
type response struct {
	status int
	header http.Header
	body   []byte
}

// apiError is the API's one error shape.
type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

// do sends a request with an optional body (a JSON content type is set
// when body is not nil and headers do not name one) and reads the answer.
func (a *testAPI) do(method, path string, body []byte, headers ...string) response {
	a.t.Helper()
	ctx, cancel := context.WithTimeout(a.t.Context(), 30*time.Second)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.url+path, rd)
	if err != nil {
		a.t.Fatalf("new request: %v", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	given := map[string]bool{}
	for i := 0; i+1 < len(headers); i += 2 {
		// A header named twice is sent twice.
		if given[headers[i]] {
			req.Header.Add(headers[i], headers[i+1])
		} else {
			req.Header.Set(headers[i], headers[i+1])
		}
		given[headers[i]] = true
	}
	res, err := a.client.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		a.t.Fatalf("%s %s: read body: %v", method, path, err)
	}
	return response{status: res.StatusCode, header: res.Header, body: b}
}

func (a *testAPI) get(path string, headers ...string) response {
	a.t.Helper()
	return a.do(http.MethodGet, path, nil, headers...)
}

func (a *testAPI) post(path, body string, headers ...string) response {
	a.t.Helper()
	return a.do(http.MethodPost, path, []byte(body), headers...)
}

// wantStatus fails unless r has status want and, for JSON answers, a JSON
// content type.
func wantStatus(t *testing.T, what string, r response, want int) {
	t.Helper()
	if r.status != want {
		t.Fatalf("%s: status = %d, want %d; body %s", what, r.status, want, r.body)
	}
	if len(r.body) > 0 && want != http.StatusNoContent {
		if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") && !strings.HasPrefix(ct, "text/event-stream") {
			t.Errorf("%s: Content-Type = %q, want application/json", what, ct)
		}
	}
}

// wantError fails unless r is an error answer with status, code, and a
// message containing each of msgParts.
func wantError(t *testing.T, what string, r response, status int, code string, msgParts ...string) apiError {
	t.Helper()
	wantStatus(t, what, r, status)
	return wantErrorBody(t, what, r.body, code, msgParts...)
}

// wantErrorBody fails unless body is the error shape with code and a
// message containing each of msgParts.
func wantErrorBody(t *testing.T, what string, body []byte, code string, msgParts ...string) apiError {
	t.Helper()
	var e apiError
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("%s: body %q is not the error shape: %v", what, body, err)
	}
	if e.Error.Code != code {
		t.Errorf("%s: error code = %q, want %q (message %q)", what, e.Error.Code, code, e.Error.Message)
	}
	if e.Error.Message == "" {
		t.Errorf("%s: error message is empty", what)
	}
	for _, p := range msgParts {
		if !strings.Contains(e.Error.Message, p) {
			t.Errorf("%s: error message = %q, want it to contain %q", what, e.Error.Message, p)
		}
	}
	noLeak(t, what, body)
	return e
}

// noLeak fails if an answer shows a stack trace or a Go error chain.
func noLeak(t *testing.T, what string, body []byte) {
	t.Helper()
	for _, bad := range []string{"goroutine ", ".go:", "panic", "sqlite3:", "llm:", "store:", testAPIKey} {
		if bytes.Contains(body, []byte(bad)) {
			t.Errorf("%s: answer %q contains %q", what, body, bad)
		}
	}
}

func decodeBody[T any](t *testing.T, what string, r response) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("%s: decode %q: %v", what, r.body, err)
	}
	return v
}

// chatAnswer is the answer of a chat, and the data of a stream's "done".
type chatAnswer struct {
	ID       string `json:"id"`
	AgentID  string `json:"agent_id"`
	Reply    string `json:"reply"`
	Provider string `json:"provider"`
	Model    string `json:"model"`
	Usage    *struct {
		PromptTokens     *int `json:"prompt_tokens"`
		CompletionTokens *int `json:"completion_tokens"`
	} `json:"usage"`
	DurationMS *int64 `json:"duration_ms"`
	Worker     *int   `json:"worker"`
}

// activityPage is the answer of GET /api/activities.
type activityPage struct {
	Activities []store.Activity `json:"activities"`
	NextAfter  *int64           `json:"next_after"`
}

// lastActivity returns the highest activity id in st.
func lastActivity(t *testing.T, st *store.Store) int64 {
	t.Helper()
	id, err := st.LastActivityID(t.Context())
	if err != nil {
		t.Fatalf("LastActivityID() = %v", err)
	}
	return id
}

// activitiesAfter returns every activity after id in st.
func activitiesAfter(t *testing.T, st *store.Store, after int64) []store.Activity {
	t.Helper()
	acts, err := st.Activities(t.Context(), store.Filter{After: after, Limit: store.MaxLimit})
	if err != nil {
		t.Fatalf("Activities(after %d) = %v", after, err)
	}
	// Every test that looks at the feed also checks that type= accepts
	// what the store wrote.
	for _, a := range acts {
		if !slices.Contains(activityTypes, a.Type) {
			t.Errorf("activity %d has type %q, want one of activityTypes %q", a.ID, a.Type, activityTypes)
		}
	}
	return acts
}

// chatTrail returns the activity types of the one chat started after
// cursor, failing if there is not exactly one.
func chatTrail(t *testing.T, st *store.Store, after int64) (chatID string, types []string, last store.Activity) {
	t.Helper()
	for _, a := range activitiesAfter(t, st, after) {
		if a.ChatID == "" {
			continue
		}
		if chatID == "" {
			chatID = a.ChatID
		} else if a.ChatID != chatID {
			t.Fatalf("activities after %d hold chats %s and %s, want one chat", after, chatID, a.ChatID)
		}
		types = append(types, a.Type)
		last = a
	}
	return chatID, types, last
}

// waitChatFinished polls the store until the one chat started after cursor
// has finished, and checks it finished exactly once with want.
func waitChatFinished(t *testing.T, st *store.Store, after int64, want string) store.Activity {
	t.Helper()
	var types []string
	var last store.Activity
	waitFor(t, 5*time.Second, func() error {
		_, types, last = chatTrail(t, st, after)
		if len(types) < 2 {
			return fmt.Errorf("chat activities = %v, want chat.started then %s", types, want)
		}
		return nil
	})
	if len(types) != 2 || types[0] != "chat.started" || types[1] != want {
		t.Fatalf("chat activities = %v, want [chat.started %s]", types, want)
	}
	return last
}

// waitFor polls cond until it returns nil or d passes, then fails with
// cond's last error, which says what was expected.
func waitFor(t *testing.T, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", d, err)
		}
		time.Sleep(10 * time.Millisecond) // polling interval, not synchronization
	}
}

// sseEvent is one block of an event stream. A comment-only block has
// only comment set.
type sseEvent struct {
	id, event, data, comment, retry string
}

// sseReader reads event-stream blocks.
type sseReader struct{ br *bufio.Reader }

func newSSEReader(r io.Reader) *sseReader { return &sseReader{bufio.NewReader(r)} }

// next returns the next block; comment lines form blocks of their own in
// what the server writes, and are returned as such.
func (s *sseReader) next() (sseEvent, error) {
	var ev sseEvent
	seen := false
	for {
		line, err := s.br.ReadString('\n')
		if err != nil {
			if seen && err == io.EOF {
				return ev, io.ErrUnexpectedEOF
			}
			return ev, err
		}
		line = strings.TrimSuffix(line, "\n")
		if line == "" {
			if seen {
				return ev, nil
			}
			continue
		}
		seen = true
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "":
			ev.comment = value
		case "id":
			ev.id = value
		case "event":
			ev.event = value
		case "data":
			if ev.data != "" {
				ev.data += "\n"
			}
			ev.data += value
		case "retry":
			ev.retry = value
		default:
			return ev, fmt.Errorf("unexpected event-stream line %q", line)
		}
	}
}

// nextEvent skips comment and retry blocks and returns the next event.
func (s *sseReader) nextEvent() (sseEvent, error) {
	for {
		ev, err := s.next()
		if err != nil || ev.event != "" || ev.data != "" {
			return ev, err
		}
	}
}

// openStream sends a request that answers an event stream and returns the
// open response; its body is closed at cleanup.
func (a *testAPI) openStream(ctx context.Context, method, path, body string, headers ...string) *http.Response {
	a.t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, a.url+path, rd)
	if err != nil {
		a.t.Fatalf("new request: %v", err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	res, err := a.client.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	a.t.Cleanup(func() { res.Body.Close() })
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		a.t.Fatalf("%s %s: status = %d, want 200; body %s", method, path, res.StatusCode, b)
	}
	if ct := res.Header.Get("Content-Type"); ct != "text/event-stream" {
		a.t.Fatalf("%s %s: Content-Type = %q, want text/event-stream", method, path, ct)
	}
	return res
}

// rawRequest dials the API and writes one HTTP/1.1 request by hand, for
// tests that close the connection themselves.
func (a *testAPI) rawRequest(method, path, body string) net.Conn {
	a.t.Helper()
	c, err := net.Dial("tcp", a.addr)
	if err != nil {
		a.t.Fatalf("dial %s: %v", a.addr, err)
	}
	a.t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s",
		method, path, a.addr, len(body), body)
	return c
}

// quietLogger drops fasthttp's own log lines (oversized bodies the tests
// send on purpose).
type quietLogger struct{}

func (quietLogger) Printf(string, ...any) {}
