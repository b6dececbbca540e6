package handlers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

var (
	errNoRoute      = errors.New("no such route")
	errMethod       = errors.New("method not allowed")
	errUnauthorized = errors.New("missing or invalid bearer token")
	errNoAgent      = errors.New("no such agent")
)

// requestError is a problem with the request itself; its message is shown
// to the client as is.
type requestError struct {
	status int
	msg    string
}

func (e *requestError) Error() string { return e.msg }

func badRequest(msg string) error { return &requestError{fasthttp.StatusBadRequest, msg} }

// recordedError is an outcome the store already holds, answered as
// recorded: a chat that failed (failedChat).
type recordedError struct {
	status int
	obj    errorObject
}

func (e *recordedError) Error() string { return e.obj.Message }

// noAgent returns err, or, when err says that no agent has id, an error
// whose message names id and tells the client how to find the real ones.
func noAgent(id string, err error) error {
	if !errors.Is(err, store.ErrNotFound) {
		return err
	}
	msg := fmt.Sprintf("no agent %q; GET /api/agents lists them (the default one is %q)", id, store.DefaultAgentID)
	switch id {
	case "":
		msg = "no agent id given; GET /api/agents lists them"
	case store.DefaultAgentID:
		msg = fmt.Sprintf("no agent %q (it was deleted); GET /api/agents lists them", id)
	}
	return &requestError{fasthttp.StatusNotFound, msg}
}

// codes names the error code of the JSON body for each status.
var codes = map[int]string{
	fasthttp.StatusBadRequest:                  "bad_request",
	fasthttp.StatusUnauthorized:                "unauthorized",
	fasthttp.StatusNotFound:                    "not_found",
	fasthttp.StatusMethodNotAllowed:            "method_not_allowed",
	fasthttp.StatusConflict:                    "conflict",
	fasthttp.StatusRequestTimeout:              "request_timeout",
	fasthttp.StatusRequestEntityTooLarge:       "body_too_large",
	fasthttp.StatusUnsupportedMediaType:        "unsupported_media_type",
	fasthttp.StatusRequestHeaderFieldsTooLarge: "headers_too_large",
	fasthttp.StatusTooManyRequests:             "too_many_requests",
	fasthttp.StatusInternalServerError:         "internal",
	fasthttp.StatusBadGateway:                  "upstream_error",
	fasthttp.StatusServiceUnavailable:          "unavailable",
	fasthttp.StatusGatewayTimeout:              "upstream_timeout",
}

// errorObject is the one JSON error shape of the API.
type errorObject struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// statusOf maps an error to the status the client gets and the message it
// may read. This is the only place where errors become HTTP statuses.
// Upstream and store details are logged by the caller, never echoed.
func statusOf(err error) (int, errorObject) {
	if rec, ok := errors.AsType[*recordedError](err); ok {
		return rec.status, rec.obj
	}
	var re *requestError
	var le *store.AgentLimitError
	var status int
	msg := ""
	switch {
	case errors.As(err, &re):
		status, msg = re.status, re.msg
	case errors.Is(err, errNoRoute), errors.Is(err, errNoAgent), errors.Is(err, store.ErrNotFound):
		status = fasthttp.StatusNotFound
		msg = err.Error()
		if errors.Is(err, store.ErrNotFound) {
			msg = errNoAgent.Error()
		}
	case errors.As(err, &le):
		// 409, not 422: the request is valid and succeeds once an agent is
		// deleted; it conflicts with the state of the collection.
		status, msg = fasthttp.StatusConflict, fmt.Sprintf("there are already %d agents, the most this server keeps (--limit-agents); delete one first", le.Max)
	case errors.Is(err, errMethod):
		status, msg = fasthttp.StatusMethodNotAllowed, err.Error()
	case errors.Is(err, errUnauthorized):
		status, msg = fasthttp.StatusUnauthorized, err.Error()
	case errors.Is(err, store.ErrUnavailable), errors.Is(err, store.ErrClosed):
		status, msg = fasthttp.StatusServiceUnavailable, "the database is unavailable; try again shortly"
	case errors.Is(err, llm.ErrTimeout), errors.Is(err, context.DeadlineExceeded):
		status, msg = fasthttp.StatusGatewayTimeout, "the LLM did not answer in time"
	case errors.Is(err, llm.ErrUnavailable):
		status, msg = fasthttp.StatusBadGateway, "the LLM could not be reached"
	case errors.Is(err, llm.ErrReplyTooLarge):
		status, msg = fasthttp.StatusBadGateway, fmt.Sprintf("the LLM's reply was longer than %d bytes", llm.MaxReplySize)
	case errors.Is(err, llm.ErrUpstream), errors.Is(err, llm.ErrStreamCut), errors.Is(err, llm.ErrBadResponse):
		status, msg = fasthttp.StatusBadGateway, "the LLM answered with an error"
	default:
		status = fasthttp.StatusInternalServerError
	}
	if msg == "" {
		msg = genericMessage(status)
	}
	return status, errorObject{Code: code(status), Message: msg}
}

func code(status int) string {
	if c := codes[status]; c != "" {
		return c
	}
	return "error"
}

// WriteError is the worker's hook for the errors it answers itself
// (panics, overload, unreadable requests): it answers status with the API's
// one JSON error shape, {"error":{"code":"...","message":"..."}}. The
// message is fixed: for a 400 it names the part of the request that
// fasthttp could not read when err says which, and the status's generic
// message otherwise. err's own text is never shown, since fasthttp quotes
// raw request bytes in it.
func WriteError(ctx *fasthttp.RequestCtx, status int, err error) {
	msg := genericMessage(status)
	if status == fasthttp.StatusBadRequest {
		if m := requestFault(err); m != "" {
			msg = m
		}
	}
	// The worker's size refusals carry their limit (worker.TooLargeError).
	var limit interface{ Limit() int }
	if errors.As(err, &limit) {
		msg += ": the limit is " + sizeText(limit.Limit())
	}
	writeErrorObject(ctx, status, errorObject{Code: code(status), Message: msg})
}

// requestFaults maps what fasthttp says about a request it could not read
// to a message naming the part at fault. fasthttp does not export these
// errors (the few exported ones that would do, such as
// ErrUnsupportedRequestMethod, it returns only with SecureErrorLogMessage),
// so they are recognised by the fixed start of their text. Any error of
// the chain may match, and only by its start: fasthttp puts quoted request
// bytes after that start, so a request cannot choose its own message.
// TestMalformedRequests pins every entry, so a fasthttp upgrade that
// rewords one fails there rather than falling back to "malformed HTTP
// request" unnoticed.
var requestFaults = []struct{ prefix, msg string }{
	{"missing required host header", "missing Host header"},
	{"too many host headers", "more than one Host header"},
	{"cannot parse content-length", "invalid Content-Length header"},
	{"unsupported transfer-encoding", "unsupported Transfer-Encoding header: want chunked"},
	{"too many transfer-encoding headers", "unsupported Transfer-Encoding header: want chunked"},
	{"invalid header key", "invalid header name"},
	{"malformed mime header", "malformed header line"},
	{"invalid header value", "invalid character in a header value"},
	{"cannot find http request method", "malformed request line"},
	{"unsupported http request method", "malformed request line"},
	{"cannot find whitespace in the first line", "malformed request line"},
	{"unsupported http version", "malformed request line"},
	{"request uri cannot be empty", "malformed request line"},
	{"invalid request uri", "invalid request target"},
	{"empty hex number", "invalid chunked body"}, // a chunk size that is not hex
	{"too large hex number", "invalid chunked body"},
	{"forbidden trailer key", "invalid chunked body trailer"},
	// The worker's own refusal (worker.ErrFoldedHeader), matched like
	// fasthttp's: handlers does not import the process model.
	{"worker: obsolete line folding", "obsolete line folding: a header line starts with a space or tab"},
	{"invalid trailer value", "invalid chunked body trailer"},
}

// requestFault returns the message naming what was wrong with a request
// fasthttp could not read, or "" when err does not say.
func requestFault(err error) string {
	if errors.Is(err, fasthttp.ErrDuplicateContentLength) {
		return "more than one Content-Length header"
	}
	if _, ok := errors.AsType[fasthttp.ErrBrokenChunk](err); ok {
		return "invalid chunked body"
	}
	for e := err; e != nil; e = errors.Unwrap(e) {
		text := e.Error()
		for _, f := range requestFaults {
			if strings.HasPrefix(text, f.prefix) {
				return f.msg
			}
		}
	}
	return ""
}

func genericMessage(status int) string {
	switch status {
	case fasthttp.StatusInternalServerError:
		return "internal server error"
	case fasthttp.StatusRequestEntityTooLarge:
		return "request body too large"
	case fasthttp.StatusRequestTimeout:
		return "request not received in time"
	case fasthttp.StatusBadRequest:
		return "malformed HTTP request"
	case fasthttp.StatusRequestHeaderFieldsTooLarge:
		return "request line or headers too large"
	case fasthttp.StatusServiceUnavailable:
		return "too many requests in flight; retry later"
	}
	return fasthttp.StatusMessage(status)
}

// fail answers err with the status statusOf gives it.
func fail(ctx *fasthttp.RequestCtx, err error) {
	status, obj := statusOf(err)
	if status == fasthttp.StatusServiceUnavailable {
		// The database may be back in a moment; say when to try again.
		ctx.Response.Header.Set("Retry-After", "1")
	}
	writeErrorObject(ctx, status, obj)
}

func writeErrorObject(ctx *fasthttp.RequestCtx, status int, obj errorObject) {
	b, _ := json.Marshal(struct {
		Error errorObject `json:"error"`
	}{obj})
	ctx.SetStatusCode(status)
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}

var errStreamClosed = errors.New("event stream closed")

// sizeText says n bytes as the settings take sizes: "1 MiB", "16 KiB",
// "1500 bytes".
func sizeText(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
