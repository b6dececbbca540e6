package worker

import (
	"net"
	"os"
	"strings"
	"time"

	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/supervisor/protocol"
)

// heartbeat proves the serving path to the supervisor: it sends Ready after
// the first successful self-probe and a Heartbeat after each later one, and
// asks to be recycled once MaxRequests is reached. It returns when stop
// closes.
func (w *worker) heartbeat(stop <-chan struct{}) {
	interval := protocol.HeartbeatInterval(w.in.HealthcheckTimeout)
	client := &fasthttp.HostClient{
		Addr:                "worker",
		Dial:                func(string) (net.Conn, error) { return w.probeLn.Dial() },
		MaxIdleConnDuration: time.Minute,
	}
	ready, told := false, 0
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		// Ready needs an answer below 500 (an application without a /health
		// route answers 404, which proves the serving path as well); a
		// heartbeat needs any answer (a draining server's /health answers 503).
		st := w.probe(client, interval*2)
		if !ready && st >= fasthttp.StatusInternalServerError && st != told {
			told = st
			w.log.Warn().Int("status", st).Msg("not ready: the worker's GET /health (its readiness probe) answered 500 or more")
		}
		if st != 0 && st < fasthttp.StatusInternalServerError || ready && st != 0 {
			typ := protocol.TypeHeartbeat
			if !ready {
				typ, ready = protocol.TypeReady, true
				w.log.Debug().Msg("worker ready")
			}
			m := protocol.Message{Type: typ, Requests: w.requests.Load(), InFlight: w.inFlight.Load()}
			if w.accept.failing.Load() {
				m.Accept = protocol.AcceptFailing
			}
			if w.in.Metrics && w.cfg.Metrics != nil {
				var b strings.Builder
				w.cfg.Metrics(&b)
				m.Metrics = b.String()
			}
			w.send(m)
		}
		select {
		case <-stop:
			return
		case <-w.recycle:
			w.log.Info().Uint64("requests", w.requests.Load()).Str("reason", "max_requests").Msg("worker asks to be recycled")
			w.send(protocol.Message{Type: protocol.TypeRecycle, Reason: "max_requests"})
		case <-tick.C:
		}
	}
}

// drainHeartbeat heartbeats while the worker drains, until stop closes.
// The serving path is being shut down, so these beats prove only that the
// process runs and makes progress on its drain.
func (w *worker) drainHeartbeat(stop <-chan struct{}) {
	tick := time.NewTicker(protocol.HeartbeatInterval(w.in.HealthcheckTimeout))
	defer tick.Stop()
	for {
		w.send(protocol.Message{Type: protocol.TypeHeartbeat, Requests: w.requests.Load(), InFlight: w.inFlight.Load()})
		select {
		case <-stop:
			return
		case <-tick.C:
		}
	}
}

// probe sends GET /health to the worker's own handler through the
// in-memory listener and returns the status it answered within timeout, or
// 0 when it did not.
func (w *worker) probe(c *fasthttp.HostClient, timeout time.Duration) int {
	req := fasthttp.AcquireRequest()
	resp := fasthttp.AcquireResponse()
	defer fasthttp.ReleaseRequest(req)
	defer fasthttp.ReleaseResponse(resp)
	req.SetRequestURI("http://worker/health")
	req.Header.Set("User-Agent", "corral-probe")
	if err := c.DoTimeout(req, resp, timeout); err != nil {
		w.log.Warn().Err(err).Msg("health probe failed")
		return 0
	}
	return resp.StatusCode()
}

// send writes one message to the supervisor. A failed write means the
// supervisor is gone, which the lifeline reports on its own.
func (w *worker) send(m protocol.Message) {
	m.PID = os.Getpid()
	w.controlMu.Lock()
	defer w.controlMu.Unlock()
	if _, err := w.control.Write(m.Encode()); err != nil {
		w.log.Debug().Err(err).Msg("control write failed")
	}
}
