package llm

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Defaults applied by NewOpenAI to zero fields of OpenAIConfig.
const (
	DefaultOpenAIModel = "gpt-4o-mini"
	DefaultTimeout     = 120 * time.Second
	DefaultIdleTimeout = 60 * time.Second
	DefaultMaxRetries  = 2
)

// Tuning of the default HTTP client and of retries.
const (
	// dialTimeout makes an unreachable upstream fail fast; LLM hosts are
	// either near or behind a load balancer that answers quickly.
	dialTimeout = time.Second
	// maxIdleConnsPerHost keeps a connection per concurrent call for reuse:
	// a worker may run thousands of calls against one upstream host.
	maxIdleConnsPerHost = 1024
	// retryBase is the first backoff; it doubles per retry, with jitter.
	retryBase = 250 * time.Millisecond
	// refusedRetryBase is the first backoff after a refused connection: a
	// refusal is immediate and cheap, and callers must learn within a second
	// that nothing listens there.
	refusedRetryBase = 25 * time.Millisecond
	// drainLimit and drainGrace bound the read after "data: [DONE]" that lets
	// the connection be reused.
	drainLimit = 64 << 10
	drainGrace = 100 * time.Millisecond
)

// OpenAIConfig configures an OpenAI-compatible chat completions client. Only
// BaseURL is required.
type OpenAIConfig struct {
	// BaseURL is the API root that "/chat/completions" is appended to, such
	// as "https://api.openai.com/v1" or "http://127.0.0.1:11434/v1" (Ollama).
	// A trailing slash is ignored. A URL with no path at all
	// ("http://127.0.0.1:8080") gets "/v1", the root every OpenAI-compatible
	// server serves; any other path is used as given
	// ("https://openrouter.ai/api/v1"). It must be http or https, without
	// user info or fragment. A query string is kept on every request
	// ("?api-version=2024-10-21" for Azure OpenAI).
	BaseURL string
	// APIKey is sent as "Authorization: Bearer <APIKey>"; "" sends no
	// Authorization header. It never appears in errors.
	APIKey string
	// Headers are added to every upstream request, such as Azure's
	// "api-key"; Content-Type, Accept, Authorization (when APIKey is set)
	// and X-Request-ID are the client's own and win over them. Their values
	// never appear in errors.
	Headers http.Header
	// Model is used when Request.Model is ""; default DefaultOpenAIModel.
	Model string
	// Timeout bounds a whole call, retries and backoff included; zero or
	// negative means DefaultTimeout.
	Timeout time.Duration
	// IdleTimeout abandons an attempt that receives no byte for this long,
	// from sending the request on (so it also bounds the wait for the first
	// token); zero or negative means DefaultIdleTimeout.
	IdleTimeout time.Duration
	// MaxRetries is how many times a failed attempt may be repeated; zero
	// means DefaultMaxRetries and a negative value disables retries.
	MaxRetries int
	// HTTPClient sends the requests. nil means a client tuned for many
	// concurrent long streams: pooled keep-alive connections (1024 idle per
	// host), 1 s dial timeout, proxy from the environment, redirects not
	// followed, and no Client.Timeout (streams are long; Timeout and
	// IdleTimeout bound them instead). A client given here should have no
	// Client.Timeout either: its expiry would be reported as ErrUnavailable
	// or ErrStreamCut rather than ErrTimeout.
	HTTPClient *http.Client
}

// OpenAI is a client for an OpenAI-compatible /chat/completions endpoint.
// It is safe for concurrent use.
type OpenAI struct {
	endpoint   string
	apiKey     string
	headers    http.Header
	model      string
	timeout    time.Duration
	idle       time.Duration
	maxRetries int
	http       *http.Client
}

// NewOpenAI returns a client for cfg. It returns an error naming BaseURL if
// BaseURL is empty or not a usable http(s) URL.
func NewOpenAI(cfg OpenAIConfig) (*OpenAI, error) {
	endpoint, err := chatEndpoint(cfg.BaseURL)
	if err != nil {
		return nil, err
	}
	c := &OpenAI{
		endpoint:   endpoint,
		apiKey:     cfg.APIKey,
		headers:    cfg.Headers.Clone(),
		model:      cfg.Model,
		timeout:    cfg.Timeout,
		idle:       cfg.IdleTimeout,
		maxRetries: cfg.MaxRetries,
		http:       cfg.HTTPClient,
	}
	if c.model == "" {
		c.model = DefaultOpenAIModel
	}
	if c.timeout <= 0 {
		c.timeout = DefaultTimeout
	}
	if c.idle <= 0 {
		c.idle = DefaultIdleTimeout
	}
	switch {
	case c.maxRetries == 0:
		c.maxRetries = DefaultMaxRetries
	case c.maxRetries < 0:
		c.maxRetries = 0
	}
	if c.http == nil {
		c.http = newHTTPClient()
	}
	return c, nil
}

// chatEndpoint validates a BaseURL and returns its chat completions URL.
func chatEndpoint(base string) (string, error) {
	const want = "want http(s)://host[:port][/path], such as https://api.openai.com/v1"
	if base == "" {
		return "", fmt.Errorf("new openai: BaseURL is empty: %s", want)
	}
	u, err := url.Parse(base)
	if err != nil {
		// url.Parse quotes the input, which could hold credentials.
		return "", fmt.Errorf("new openai: invalid BaseURL: %s", want)
	}
	switch {
	case u.User != nil:
		return "", fmt.Errorf("new openai: invalid BaseURL %q: user info is not allowed, use APIKey", u.Redacted())
	case u.Scheme != "http" && u.Scheme != "https", u.Host == "", u.Opaque != "":
		return "", fmt.Errorf("new openai: invalid BaseURL %q: %s", base, want)
	case u.Fragment != "":
		return "", fmt.Errorf("new openai: invalid BaseURL %q: a fragment is not allowed", u.Redacted())
	}
	path := strings.TrimRight(u.Path, "/")
	if path == "" {
		path = "/v1"
	}
	u.Path, u.RawPath = path+"/chat/completions", ""
	return u.String(), nil
}

func newHTTPClient() *http.Client {
	d := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           d.DialContext,
			ForceAttemptHTTP2:     true,
			MaxIdleConns:          maxIdleConnsPerHost,
			MaxIdleConnsPerHost:   maxIdleConnsPerHost,
			IdleConnTimeout:       90 * time.Second,
			TLSHandshakeTimeout:   10 * time.Second,
			ExpectContinueTimeout: time.Second,
		},
		// A redirected POST turns into a GET elsewhere; report the 3xx instead.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// chatRequest is the request body of POST /chat/completions.
type chatRequest struct {
	Model         string    `json:"model"`
	Messages      []Message `json:"messages"`
	Stream        bool      `json:"stream"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
}

// errIdleCause cancels an attempt whose stream went quiet.
var errIdleCause = errors.New("idle timer fired")

// Complete runs one streamed chat completion; see the package documentation
// for the retry rule and the errors. onDelta, if not nil, receives each
// non-empty content delta in order on the calling goroutine; an error from it
// abandons the call and is returned wrapped. Complete may be called
// concurrently.
func (c *OpenAI) Complete(ctx context.Context, req Request, onDelta func(string) error) (Response, error) {
	body := chatRequest{Model: req.Model, Messages: req.Messages, Stream: true}
	if body.Model == "" {
		body.Model = c.model
	}
	if body.Messages == nil {
		body.Messages = []Message{}
	}
	body.StreamOptions.IncludeUsage = true
	payload, err := json.Marshal(body)
	if err != nil {
		return Response{}, fmt.Errorf("openai complete: encode request: %w", err)
	}

	callCtx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	for attempt := 1; ; attempt++ {
		st := &stream{emit: onDelta, secret: c.apiKey}
		err := c.attempt(callCtx, payload, req.RequestID, st)
		if err == nil {
			resp := Response{Text: st.text.String(), Provider: ProviderOpenAI, Model: st.model, Usage: st.usage}
			if resp.Model == "" {
				resp.Model = body.Model
			}
			return resp, nil
		}
		if !st.abandoned && callCtx.Err() != nil {
			err = ctxError(callCtx)
		}
		if st.delivered || req.NoRetry || attempt > c.maxRetries || !retryable(err) {
			return Response{}, fmt.Errorf("openai complete attempt %d: %w", attempt, err)
		}
		wait := retryWait(attempt, err)
		if deadline, ok := callCtx.Deadline(); ok && time.Until(deadline) <= wait {
			return Response{}, fmt.Errorf("openai complete attempt %d: %w", attempt, err)
		}
		t := time.NewTimer(wait)
		select {
		case <-callCtx.Done():
			t.Stop()
			return Response{}, fmt.Errorf("openai complete attempt %d backoff: %w", attempt, ctxError(callCtx))
		case <-t.C:
		}
	}
}

// attempt sends one request and consumes its stream into st.
func (c *OpenAI) attempt(ctx context.Context, payload []byte, requestID string, st *stream) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	idle := time.AfterFunc(c.idle, func() { cancel(errIdleCause) })
	defer idle.Stop()
	idleErr := func(err error) error {
		if context.Cause(ctx) == errIdleCause {
			return fmt.Errorf("no data for %s: %w", c.idle, ErrIdle)
		}
		return err
	}

	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.endpoint, bytes.NewReader(payload))
	if err != nil {
		return fmt.Errorf("build request: %w", err)
	}
	for k, vs := range c.headers {
		req.Header[k] = vs
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	if c.apiKey != "" {
		req.Header.Set("Authorization", "Bearer "+c.apiKey)
	}
	if requestID != "" {
		req.Header.Set("X-Request-ID", requestID)
	}
	res, err := c.http.Do(req)
	if err != nil {
		return idleErr(fmt.Errorf("%w: %w", ErrUnavailable, err))
	}
	defer res.Body.Close()
	body := &activityReader{r: res.Body, timer: idle, d: c.idle}

	if res.StatusCode/100 != 2 {
		return statusError(res, body, c.apiKey)
	}
	if ct := res.Header.Get("Content-Type"); ct != "" {
		if mt, _, _ := mime.ParseMediaType(ct); mt != "text/event-stream" {
			return fmt.Errorf("content type %q, want text/event-stream: %w", ct, ErrBadResponse)
		}
	}
	sse := newSSEReader(body)
	if err := st.consume(sse); err != nil {
		if st.abandoned {
			return err
		}
		return idleErr(err)
	}
	if st.done {
		body.d = drainGrace
		idle.Reset(drainGrace)
		sse.drain(drainLimit)
	}
	return nil
}

// activityReader re-arms the idle timer whenever bytes arrive, keep-alive
// comments included: they prove upstream is alive, and Timeout still bounds
// the call.
type activityReader struct {
	r     io.Reader
	timer *time.Timer
	d     time.Duration
}

func (a *activityReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.timer.Reset(a.d)
	}
	return n, err
}

// statusError reads the start of a non-2xx response into a *StatusError.
func statusError(res *http.Response, body io.Reader, secret string) error {
	b, _ := io.ReadAll(io.LimitReader(body, 4*snippetSize))
	e := &StatusError{Status: res.StatusCode, Body: snippet(b, secret)}
	e.retryAfter, e.hasRetryAfter = parseRetryAfter(res.Header.Get("Retry-After"), time.Now())
	return e
}

// parseRetryAfter parses a Retry-After value in seconds or as an HTTP date.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if secs, err := strconv.ParseInt(v, 10, 32); err == nil {
		if secs < 0 {
			return 0, false
		}
		return time.Duration(secs) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		return max(t.Sub(now), 0), true
	}
	return 0, false
}

// retryable reports whether err may be retried (if nothing was delivered):
// a 429 or 5xx status, a connection that failed, or a stream cut before its
// first delta reached the caller. Timeouts are not retried: a hung upstream
// would only hang again.
func retryable(err error) bool {
	if se, ok := errors.AsType[*StatusError](err); ok {
		return se.Status == http.StatusTooManyRequests || se.Status >= 500
	}
	if errors.Is(err, ErrTimeout) {
		return false
	}
	return errors.Is(err, ErrUnavailable) || errors.Is(err, ErrStreamCut)
}

// retryWait returns the pause before retry number attempt (1-based): the
// Retry-After of a status error if it had one, else an exponential backoff
// with jitter in [d/2, d).
func retryWait(attempt int, err error) time.Duration {
	if se, ok := errors.AsType[*StatusError](err); ok && se.hasRetryAfter {
		return se.retryAfter
	}
	base := retryBase
	if errors.Is(err, syscall.ECONNREFUSED) {
		base = refusedRetryBase
	}
	d := base << min(attempt-1, 10)
	return d/2 + rand.N(d/2)
}
