package worker

import (
	"context"
	"net/http"
	"runtime/debug"

	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttpadaptor"
)

// RunHTTP is Run for a net/http application: it serves h with the same
// process model (inherited listeners, neighbour standby, heartbeats through
// h, drain, recycle, concurrency limit, access log). cfg.Handler is ignored.
func RunHTTP(in Info, h http.Handler, cfg Config) error {
	cfg.Handler = HTTPHandler(h)
	return Run(in, cfg)
}

// HTTPHandler adapts a net/http handler to the worker's fasthttp server.
// The handler sees an ordinary *http.Request and http.ResponseWriter, which
// also implements http.Flusher (streamed responses, server-sent events) and
// http.Hijacker. As with net/http's Server.Shutdown, the request's context
// is not cancelled when the worker drains: the handler has the graceful
// budget to finish, after which its connection is closed. Nor is it when
// the client goes away: fasthttp learns of a disconnect only on the next
// write. A panic is logged with its value and the handler's stack.
func HTTPHandler(h http.Handler) fasthttp.RequestHandler {
	return fasthttpadaptor.NewFastHTTPHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// The adaptor's context is the fasthttp request, which the server
		// cancels as soon as a drain begins.
		ctx, _ := r.Context().(*fasthttp.RequestCtx)
		defer func() {
			if v := recover(); v != nil {
				// The adaptor re-panics with a value of its own, on
				// another goroutine: keep this one's for the log.
				if ctx != nil && v != http.ErrAbortHandler {
					ctx.SetUserValue(httpPanicKey{}, httpPanic{v, debug.Stack()})
				}
				panic(v)
			}
		}()
		h.ServeHTTP(w, r.WithContext(context.WithoutCancel(r.Context())))
	}))
}

// httpPanic is a net/http handler's panic, kept in its request's user
// values under httpPanicKey{} for guard to log.
type httpPanic struct {
	value any
	stack []byte
}

type httpPanicKey struct{}
