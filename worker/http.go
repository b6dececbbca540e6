package worker

import (
	"net/http"

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
// http.Hijacker. The request's context is not cancelled when the client
// goes away: fasthttp learns of a disconnect only on the next write.
func HTTPHandler(h http.Handler) fasthttp.RequestHandler {
	return fasthttpadaptor.NewFastHTTPHandler(h)
}
