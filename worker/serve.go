package worker

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttputil"
)

// worker is the state of one running worker process.
type worker struct {
	in      Info
	cfg     Config
	log     zerolog.Logger
	srv     *fasthttp.Server
	probeLn probeListener

	controlMu sync.Mutex // serialises writes to control
	control   *os.File

	requests atomic.Uint64 // finished requests, the worker's own probes excluded
	// inFlight counts requests from their start to their last byte: a
	// streamed response (server-sent events, a streamed chat) is written
	// after its handler returned, so it stays counted, with its connection
	// in streaming, until fasthttp has written it (connState).
	inFlight  atomic.Int64
	streaming sync.Map // net.Conn -> struct{}: a streamed response being written
	conns     atomic.Int64
	panics    atomic.Uint64
	draining  atomic.Bool
	// healthDown: the supervisor announced its stop (Config.DrainHealth).
	healthDown atomic.Bool
	accept     acceptState
	recycle    chan struct{} // one token once MaxRequests is reached
}

// ErrPanic is what the Error hook receives for a request whose handler
// panicked.
var ErrPanic = errors.New("worker: handler panicked")

// ErrOverloaded is what the Error hook receives for a request refused by
// the concurrency limit.
var ErrOverloaded = errors.New("worker: too many requests in flight")

// ErrMisdirected is what the Error hook receives for a request whose Host
// Config.HostAllowed refused.
var ErrMisdirected = errors.New("worker: this server does not answer for that host name")

// ErrDraining is what the Error hook receives for GET /health once the
// server is stopping (Config.DrainHealth).
var ErrDraining = errors.New("worker: the server is stopping")

// TooLargeError is what the Error hook receives for a request over a size
// limit: its body (413, Config.MaxBodySize) or its request line and
// headers (431, Config.MaxHeaderSize).
type TooLargeError struct {
	Err error
	Max int // the limit, in bytes
}

func (e *TooLargeError) Error() string { return fmt.Sprintf("%v (limit %d bytes)", e.Err, e.Max) }
func (e *TooLargeError) Unwrap() error { return e.Err }

// Limit is the limit the request passed, in bytes.
func (e *TooLargeError) Limit() int { return e.Max }

// ErrFoldedHeader is what the Error hook receives, with status 400, for a
// request whose headers use obsolete line folding (RFC 9112 section 5.2: a
// header line that starts with a space or a tab continues the previous
// one).
var ErrFoldedHeader = errors.New("worker: obsolete line folding in a request header")

// serve is the one panic boundary of the worker, and where requests are
// counted, limited and logged.
func (w *worker) serve(ctx *fasthttp.RequestCtx) {
	if isProbe(ctx.Conn()) {
		w.guard(ctx)
		return
	}
	start := time.Now()
	// Copied: the handler may rewrite the request's headers.
	id := string(setRequestID(ctx))
	n := w.inFlight.Add(1)
	switch {
	case folded(ctx.Request.Header.RawHeaders()):
		// fasthttp joins a folded line to the one before it and obeys the
		// result, a folded Transfer-Encoding or Content-Length included,
		// while a front end may have framed the same bytes otherwise (or
		// dropped the line). RFC 9112 lets a server reject the request; the
		// connection closes with the answer, so nothing the two disagree
		// on is read as a next request.
		ctx.SetConnectionClose()
		w.cfg.Error(ctx, fasthttp.StatusBadRequest, ErrFoldedHeader)
	case w.cfg.HostAllowed != nil && !w.cfg.HostAllowed(string(ctx.Host())):
		w.cfg.Error(ctx, fasthttp.StatusMisdirectedRequest, ErrMisdirected)
	case w.healthDown.Load() && string(ctx.Path()) == "/health":
		w.cfg.Error(ctx, fasthttp.StatusServiceUnavailable, ErrDraining)
	case w.cfg.MaxConcurrency > 0 && n > int64(w.cfg.MaxConcurrency) && (w.cfg.Unlimited == nil || !w.cfg.Unlimited(ctx)):
		ctx.Response.Header.Set("Retry-After", "1")
		w.cfg.Error(ctx, fasthttp.StatusServiceUnavailable, ErrOverloaded)
	default:
		w.guard(ctx)
	}
	ctx.Response.Header.Set(RequestIDHeader, id)
	if w.draining.Load() {
		ctx.SetConnectionClose()
	}
	if ctx.Response.IsBodyStream() {
		// fasthttp writes the stream once this returns; the connection
		// turns idle or closed after its last byte (or a failed write),
		// and only then is the request no longer in flight.
		w.streaming.Store(ctx.Conn(), struct{}{})
	} else {
		w.inFlight.Add(-1)
	}
	done := w.requests.Add(1)
	if max := w.in.MaxRequests; max > 0 && done == max {
		select {
		case w.recycle <- struct{}{}:
		default:
		}
	}
	if w.cfg.AccessLog {
		// A streamed body is written after the handler returns; asking its
		// length here would read the whole stream into memory first.
		size := -1
		if !ctx.Response.IsBodyStream() {
			size = len(ctx.Response.Body())
		}
		// uvicorn's order: client, method, path, query, HTTP version, status.
		e := w.log.Info().
			Str("remote", w.cfg.Proxies.Client(ctx)).
			Bytes("method", ctx.Method()).
			Bytes("path", ctx.Path())
		if q := ctx.URI().QueryString(); len(q) > 0 {
			e = e.Bytes("query", q)
		}
		e.Bytes("http_version", bytes.TrimPrefix(ctx.Request.Header.Protocol(), []byte("HTTP/"))).
			Int("status", ctx.Response.StatusCode()).
			Bytes("user_agent", ctx.UserAgent()).
			Str("request_id", id).
			Dur("duration_ms", time.Since(start)).
			Int("bytes", size).
			Msg("request")
	}
}

// folded reports whether raw, a request's header block as received (after
// the request line), holds a line that starts with a space or a tab.
// fasthttp itself refuses such a line right after the request line.
func folded(raw []byte) bool {
	for i := bytes.IndexByte(raw, '\n'); i >= 0 && i+1 < len(raw); {
		if c := raw[i+1]; c == ' ' || c == '\t' {
			return true
		}
		j := bytes.IndexByte(raw[i+1:], '\n')
		if j < 0 {
			return false
		}
		i += 1 + j
	}
	return false
}

// guard runs the handler and turns a panic into a logged 500.
func (w *worker) guard(ctx *fasthttp.RequestCtx) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		w.panics.Add(1)
		stack := debug.Stack()
		if p, ok := ctx.UserValue(httpPanicKey{}).(httpPanic); ok {
			v, stack = p.value, p.stack
		}
		w.log.Error().
			Interface("panic", v).
			Bytes("method", ctx.Method()).
			Bytes("path", ctx.Path()).
			Str("stack", string(stack)).
			Msg("handler panicked")
		// fasthttp buffers the response until the handler returns, so
		// whatever the handler had set can still be replaced.
		ctx.Response.Reset()
		w.cfg.Error(ctx, fasthttp.StatusInternalServerError, ErrPanic)
	}()
	w.cfg.Handler(ctx)
}

// serveError answers a request fasthttp could not read.
func (w *worker) serveError(ctx *fasthttp.RequestCtx, err error) {
	status := fasthttp.StatusBadRequest
	var small *fasthttp.ErrSmallBuffer
	switch {
	case errors.Is(err, fasthttp.ErrBodyTooLarge):
		status = fasthttp.StatusRequestEntityTooLarge
		err = &TooLargeError{err, w.cfg.MaxBodySize}
	case errors.As(err, &small):
		// The request line or the headers do not fit the read buffer.
		status = fasthttp.StatusRequestHeaderFieldsTooLarge
		err = &TooLargeError{err, w.cfg.MaxHeaderSize}
	case isTimeout(err):
		status = fasthttp.StatusRequestTimeout
	}
	ctx.SetConnectionClose()
	ctx.Response.Header.SetBytesV(RequestIDHeader, setRequestID(ctx))
	// The client may still be sending a body the server never read. A
	// client that timed out is sending too little, not too much: it is
	// closed at once.
	if status != fasthttp.StatusRequestTimeout {
		lingerOnClose(ctx.Conn())
	}
	w.cfg.Error(ctx, status, err)
}

// writeError is the default Config.Error.
func writeError(ctx *fasthttp.RequestCtx, status int, err error) {
	code := "error"
	switch status {
	case fasthttp.StatusServiceUnavailable:
		code = "overloaded"
		if errors.Is(err, ErrDraining) {
			code = "draining"
		}
	case fasthttp.StatusMisdirectedRequest:
		code = "misdirected_request"
	case fasthttp.StatusInternalServerError:
		code = "internal"
	}
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.SetBodyString(`{"error":{"code":"` + code + `","message":` + strconv.Quote(err.Error()) + `}}`)
}

// probeConn marks connections the worker dialled to itself; they bypass
// the concurrency limit, the counters and the access log.
type probeConn struct{ net.Conn }

// IsProbe reports whether ctx is the worker's own health probe, which
// handlers may leave out of their metrics.
func IsProbe(ctx *fasthttp.RequestCtx) bool { return isProbe(ctx.Conn()) }

func isProbe(c net.Conn) bool {
	_, ok := c.(probeConn)
	return ok
}

// probeListener hands out the worker's own in-memory connections, marked.
type probeListener struct{ *fasthttputil.InmemoryListener }

func (l probeListener) Accept() (net.Conn, error) {
	c, err := l.InmemoryListener.Accept()
	if err != nil {
		return nil, err
	}
	return probeConn{c}, nil
}
