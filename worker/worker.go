package worker

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"
	"github.com/valyala/fasthttp/fasthttputil"
	"golang.org/x/sys/unix"

	"github.com/corralhq/corral/supervisor/protocol"
)

// Defaults applied by Run to zero fields of Config.
const (
	DefaultGracefulTimeout  = protocol.DefaultGracefulTimeout
	DefaultOrphanTimeout    = time.Second
	DefaultKeepAliveTimeout = 5 * time.Second
	DefaultReadTimeout      = 30 * time.Second
	DefaultMaxBodySize      = 1 << 20
	// DefaultMaxHeaderSize bounds the request line and headers together,
	// as uvicorn's h11 does (--h11-max-incomplete-event-size).
	DefaultMaxHeaderSize = 16 << 10
	// DefaultCloseLeadIn is how long a draining worker keeps its listeners
	// open while answering every response with "Connection: close", so that
	// busy keep-alive clients learn to reconnect instead of finding their
	// connection closed under a request they just sent.
	DefaultCloseLeadIn = 500 * time.Millisecond
)

// Config configures Run. The zero value is usable for every field but Handler.
type Config struct {
	// Handler answers every request. Required.
	Handler fasthttp.RequestHandler
	// Error writes an error response for the failures the worker answers
	// itself (panic: 500, over the concurrency limit: 503, unreadable
	// request: 400, 408, 413 or 431, the last two with a *TooLargeError).
	// Nil writes a small JSON body.
	Error func(ctx *fasthttp.RequestCtx, status int, err error)
	// Logger receives the worker's events; the zero value discards them.
	Logger zerolog.Logger
	// AccessLog logs one line per request at info level.
	AccessLog bool
	// Proxies, if set, are the peers whose X-Forwarded-For names the client
	// in the access log; nil takes the peer's address.
	Proxies *Proxies
	// GracefulTimeout bounds the drain on SIGTERM. Default 75s.
	GracefulTimeout time.Duration
	// OrphanTimeout bounds the drain once the supervisor is gone. Default 1s.
	OrphanTimeout time.Duration
	// KeepAliveTimeout closes keep-alive connections idle for longer. Default 5s.
	KeepAliveTimeout time.Duration
	// DisableKeepAlive closes every connection after its response.
	DisableKeepAlive bool
	// ReadTimeout bounds reading one whole request, so a client that dribbles
	// its headers cannot hold a connection for ever. Default 30s.
	ReadTimeout time.Duration
	// MaxBodySize is the largest request body accepted (413 above). Default 1 MiB.
	MaxBodySize int
	// MaxHeaderSize is the largest request line plus headers accepted
	// (431 above). It is the size of each connection's read buffer.
	// Default 16 KiB.
	MaxHeaderSize int
	// TLS, if set, serves HTTPS on every inherited listener (the worker's
	// own health probe stays in memory, unencrypted).
	TLS *tls.Config
	// MaxConcurrency is the most requests served at once; more are answered
	// 503 with Retry-After. A request counts until its response's last
	// byte is written: a streamed body (SetBodyStreamWriter) counts while
	// it streams, after its handler returned. 0 means no limit.
	MaxConcurrency int
	// Unlimited, if set, names the requests the concurrency limit does not
	// apply to, such as a cheap health check that must not fail because
	// the worker is busy.
	Unlimited func(ctx *fasthttp.RequestCtx) bool
	// Signals delivers SIGTERM/SIGINT (drain). Nil means no signals.
	Signals <-chan os.Signal
	// Metrics, if set, writes the worker's metrics in Prometheus text; they
	// go to the supervisor with each heartbeat when Info.Metrics is true.
	Metrics func(w io.Writer)
	// OnAcceptFailing, if set, is called when accepting new connections
	// starts failing for want of descriptors or kernel memory (true) and
	// when an accept succeeds again (false), from an accept loop. The
	// heartbeat reports the same state to the supervisor.
	OnAcceptFailing func(failing bool)
	// OnMessage, if set, receives the supervisor's messages on the lifeline
	// (such as the reload build status), from one goroutine, in order.
	OnMessage func(protocol.Message)
	// HostAllowed, if set, refuses with 421 a request whose Host it does
	// not allow (the worker's own probe excepted).
	HostAllowed func(host string) bool
	// DrainHealth makes the worker answer GET /health with 503 itself once
	// the supervisor announces its stop (--drain-delay), so that load
	// balancers move away before the listeners close. An application
	// whose /health says so on its own leaves it false.
	DrainHealth bool
}

// Info identifies a worker process; Self reads it from the environment the
// supervisor set.
type Info struct {
	Slot, Slots, Generation int
	PID                     int
	SupervisorPID           int
	Started                 time.Time
	HealthcheckTimeout      time.Duration
	MaxRequests             uint64
	Listeners               int
	// Metrics is true when the supervisor serves metrics and wants the
	// worker's with every heartbeat.
	Metrics bool
}

// ErrNotWorker is returned by Self when the process was not started by the
// supervisor as a worker.
var ErrNotWorker = errors.New("worker: not started by the supervisor")

// ErrProtocol is returned by Self when the supervisor speaks another
// version of the protocol.
var ErrProtocol = errors.New("worker: protocol mismatch")

// Self returns the identity the supervisor gave this process. It returns an
// error wrapping ErrNotWorker when the role marker is absent, and an error
// naming the variable when a marker is malformed.
func Self() (Info, error) {
	if os.Getenv(protocol.EnvRole) != protocol.RoleWorker {
		return Info{}, ErrNotWorker
	}
	if v := os.Getenv(protocol.EnvProtocol); v != protocol.Version {
		return Info{}, fmt.Errorf("%w: the supervisor speaks protocol %q, this binary %q; the binary was replaced on disk with an incompatible one: restart the server", ErrProtocol, v, protocol.Version)
	}
	in := Info{PID: os.Getpid(), Started: time.Now()}
	ints := []struct {
		name string
		dst  *int
		min  int
	}{
		{protocol.EnvSlot, &in.Slot, 1},
		{protocol.EnvSlots, &in.Slots, 1},
		{protocol.EnvGeneration, &in.Generation, 1},
		{protocol.EnvListeners, &in.Listeners, 1},
		{protocol.EnvSupervisorPID, &in.SupervisorPID, 1},
	}
	for _, v := range ints {
		n, err := strconv.Atoi(os.Getenv(v.name))
		if err != nil || n < v.min {
			return Info{}, fmt.Errorf("worker: invalid %s %q: this variable is set by the supervisor", v.name, os.Getenv(v.name))
		}
		*v.dst = n
	}
	d, err := time.ParseDuration(os.Getenv(protocol.EnvHealthcheckTimeout))
	if err != nil || d <= 0 {
		return Info{}, fmt.Errorf("worker: invalid %s %q: this variable is set by the supervisor", protocol.EnvHealthcheckTimeout, os.Getenv(protocol.EnvHealthcheckTimeout))
	}
	in.HealthcheckTimeout = d
	in.Metrics = os.Getenv(protocol.EnvMetrics) == "true"
	if s := os.Getenv(protocol.EnvMaxRequests); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			return Info{}, fmt.Errorf("worker: invalid %s %q: this variable is set by the supervisor", protocol.EnvMaxRequests, s)
		}
		in.MaxRequests = n
	}
	return in, nil
}

// Run serves cfg.Handler as the worker described by in, on the inherited
// listeners, until it is told to stop (signal, lifeline EOF) and has drained.
// It returns nil after a drain, even one cut short by its budget, and an
// error when the inherited descriptors are unusable or serving fails.
func Run(in Info, cfg Config) error {
	if cfg.Handler == nil {
		return errors.New("worker: no handler")
	}
	setDefaults(&cfg)
	log := cfg.Logger

	lns, err := inheritListeners(in.Listeners)
	if err != nil {
		return err
	}
	control := os.NewFile(protocol.ControlFD, "control")
	lifeline := os.NewFile(protocol.LifelineFD, "lifeline")
	if control == nil || lifeline == nil {
		return errors.New("worker: control or lifeline descriptor missing")
	}
	defer control.Close()

	w := &worker{
		in:      in,
		cfg:     cfg,
		log:     log,
		control: control,
		probeLn: probeListener{fasthttputil.NewInmemoryListener()},
		recycle: make(chan struct{}, 1),
	}
	w.accept.onChange = cfg.OnAcceptFailing
	srv := &fasthttp.Server{
		Handler:               w.serve,
		ErrorHandler:          w.serveError,
		Name:                  "corral",
		NoDefaultServerHeader: true,
		ReadTimeout:           cfg.ReadTimeout,
		IdleTimeout:           cfg.KeepAliveTimeout,
		DisableKeepalive:      cfg.DisableKeepAlive,
		// WriteTimeout stays 0: it would cut streamed chat replies.
		MaxRequestBodySize: cfg.MaxBodySize,
		ReadBufferSize:     cfg.MaxHeaderSize,
		// A connection holds its read buffer (MaxHeaderSize) only while it
		// reads a request, not while its handler runs or while it waits
		// idle: thousands of chats waiting on an LLM, or of keep-alive
		// connections, then cost a few KB each rather than 16 KiB more.
		// The price is a read system call more per keep-alive request
		// (docs/benchmarks.md, "Memory per chat in flight").
		ReduceMemoryUsage:            true,
		CloseOnShutdown:              true,
		DisablePreParseMultipartForm: true,
		Logger:                       fasthttpLogger{log},
		// A request fasthttp cannot read is otherwise quoted in its error,
		// raw bytes and all: a bearer token, a ?token= query, a cookie
		// would reach the debug log and the 400's body.
		SecureErrorLogMessage: true,
		ConnState:             w.connState,
		// A body announced over the limit is refused before the client
		// sends it, not after a 100 Continue.
		ExpectHandler: func(ctx *fasthttp.RequestCtx) int {
			if ctx.Request.Header.ContentLength() > cfg.MaxBodySize {
				// fasthttp sends this response with the status returned.
				w.serveError(ctx, fasthttp.ErrBodyTooLarge)
				return fasthttp.StatusRequestEntityTooLarge
			}
			return fasthttp.StatusContinue
		},
	}
	w.srv = srv

	// The first listener is the worker's own slot; any other is a
	// neighbour's, served only when the neighbour leaves it waiting.
	for i := 1; i < len(lns); i++ {
		lns[i] = newStandbyListener(lns[i])
	}
	for i := range lns {
		lns[i] = lingerListener{patientListener{lns[i], log, &w.accept}}
		if cfg.TLS != nil {
			// Inside TLS, so that a lingering close discards the raw bytes.
			lns[i] = tls.NewListener(lns[i], cfg.TLS)
		}
	}
	serveErr := make(chan error, len(lns)+1)
	for _, ln := range append(lns, net.Listener(w.probeLn)) {
		go func() { serveErr <- srv.Serve(ln) }()
	}

	lifelineEOF := make(chan struct{})
	stopOrders := make(chan protocol.Message, 1)
	onMessage := cfg.OnMessage
	if cfg.DrainHealth {
		onMessage = func(m protocol.Message) {
			if m.Type == protocol.TypeDrain {
				w.healthDown.Store(true)
			}
			if cfg.OnMessage != nil {
				cfg.OnMessage(m)
			}
		}
	}
	go watchLifeline(lifeline, lifelineEOF, stopOrders, onMessage, log)

	stopBeat := make(chan struct{})
	beatDone := make(chan struct{})
	go func() {
		defer close(beatDone)
		w.heartbeat(stopBeat)
	}()

	var budget time.Duration
	var reason string
	select {
	case m := <-stopOrders:
		budget, reason = stopBudget(m, cfg.GracefulTimeout), m.Reason
	case sig := <-cfg.Signals:
		budget, reason = cfg.GracefulTimeout, "signal "+signalName(sig)
		if os.Getppid() != in.SupervisorPID {
			budget, reason = cfg.OrphanTimeout, "supervisor gone"
			break
		}
		// The supervisor writes its order (reason, budget) on the
		// lifeline before it signals; the reader may not have passed it
		// on yet. A SIGTERM from anyone else waits this long for nothing.
		select {
		case m := <-stopOrders:
			budget, reason = stopBudget(m, cfg.GracefulTimeout), m.Reason
		case <-time.After(stopOrderWait):
		}
	case <-lifelineEOF:
		budget, reason = cfg.OrphanTimeout, "supervisor gone"
	case err := <-serveErr:
		close(stopBeat)
		<-beatDone
		return fmt.Errorf("worker: serve: %w", err)
	}
	close(stopBeat)
	<-beatDone
	log.Info().Str("reason", reason).Dur("budget_ms", budget).Int64("in_flight", w.inFlight.Load()).Msg("drain started")
	// A draining worker still shows it is alive: the supervisor kills one
	// that goes silent (stopped or stuck) instead of waiting out its budget.
	stopDrainBeat := make(chan struct{})
	drainBeatDone := make(chan struct{})
	go func() {
		defer close(drainBeatDone)
		w.drainHeartbeat(stopDrainBeat)
	}()
	w.drain(budget, lifelineEOF, cfg.OrphanTimeout)
	close(stopDrainBeat)
	<-drainBeatDone
	log.Info().Uint64("requests", w.requests.Load()).Msg("drain finished")
	return nil
}

func setDefaults(cfg *Config) {
	if cfg.GracefulTimeout <= 0 {
		cfg.GracefulTimeout = DefaultGracefulTimeout
	}
	if cfg.OrphanTimeout <= 0 {
		cfg.OrphanTimeout = DefaultOrphanTimeout
	}
	if cfg.KeepAliveTimeout <= 0 {
		cfg.KeepAliveTimeout = DefaultKeepAliveTimeout
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = DefaultReadTimeout
	}
	if cfg.MaxBodySize <= 0 {
		cfg.MaxBodySize = DefaultMaxBodySize
	}
	if cfg.MaxHeaderSize <= 0 {
		cfg.MaxHeaderSize = DefaultMaxHeaderSize
	}
	if cfg.Error == nil {
		cfg.Error = writeError
	}
}

// inheritListeners wraps the n listening sockets starting at ListenerFD. The
// inherited descriptors are closed once wrapped, so that the worker holds
// each socket exactly once and fasthttp's Shutdown lets go of it.
func inheritListeners(n int) ([]net.Listener, error) {
	lns := make([]net.Listener, 0, n)
	for i := range n {
		fd := protocol.ListenerFD + i
		f := os.NewFile(uintptr(fd), "listener-"+strconv.Itoa(i))
		if f == nil {
			return nil, fmt.Errorf("worker: listener fd %d: not open", fd)
		}
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("worker: listener fd %d: %w", fd, err)
		}
		lns = append(lns, ln)
	}
	return lns, nil
}

// stopOrderWait bounds how long a worker signalled with SIGTERM waits for
// the supervisor's stop order, which the supervisor writes just before it
// signals (see protocol.TypeStop).
const stopOrderWait = 100 * time.Millisecond

// stopBudget is the drain budget of a stop order; def if it names none.
func stopBudget(m protocol.Message, def time.Duration) time.Duration {
	if m.BudgetMS > 0 {
		return time.Duration(m.BudgetMS) * time.Millisecond
	}
	return def
}

// signalName names sig as kill(1) and systemd do: "SIGTERM".
func signalName(sig os.Signal) string {
	if s, ok := sig.(syscall.Signal); ok {
		if name := unix.SignalName(s); name != "" {
			return name
		}
	}
	return sig.String()
}

// watchLifeline hands the supervisor's messages to onMessage, passes the
// first stop order to stops, and closes eof when the supervisor's end of
// the lifeline closes.
func watchLifeline(f *os.File, eof chan<- struct{}, stops chan<- protocol.Message, onMessage func(protocol.Message), log zerolog.Logger) {
	defer close(eof)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 1024), 1<<16)
	for sc.Scan() {
		m, err := protocol.Decode(sc.Bytes())
		if err != nil {
			log.Warn().Err(err).Msg("bad lifeline message")
			continue
		}
		if m.Type == protocol.TypeStop {
			select {
			case stops <- m: // the first order counts; a worker drains once
			default:
			}
		}
		if onMessage != nil {
			onMessage(m)
		}
	}
	// A line too long for the buffer stops the scanner: drain to EOF.
	io.Copy(io.Discard, f)
}

// drain stops accepting and waits for requests in flight, within budget,
// or within orphan once gone closes: a supervisor killed by SIGKILL can
// reach its workers first as a SIGTERM (the parent-death signal of the
// thread that started them) while getppid still names it, and only then
// as the lifeline's end.
func (w *worker) drain(budget time.Duration, gone <-chan struct{}, orphan time.Duration) {
	deadline := time.Now().Add(budget)
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	go func() {
		if budget <= orphan {
			return
		}
		select {
		case <-gone:
		case <-ctx.Done():
			return
		}
		w.log.Warn().Dur("budget_ms", orphan).Msg("supervisor gone while draining: drain cut short")
		t := time.NewTimer(orphan)
		defer t.Stop()
		select {
		case <-t.C:
			cancel()
		case <-ctx.Done():
		}
	}()
	w.draining.Store(true)
	// Phase one: keep accepting but close every connection after its next
	// response, so busy keep-alive clients move to the new worker cleanly.
	leadIn := min(DefaultCloseLeadIn, budget/4)
	for t := time.Now().Add(leadIn); time.Now().Before(t) && w.conns.Load() > 0; {
		time.Sleep(10 * time.Millisecond) // a bounded wait for a count, not synchronization
	}
	if err := w.srv.ShutdownWithContext(ctx); err != nil {
		w.log.Warn().Int64("in_flight", w.inFlight.Load()).Msg("drain budget expired")
	}
}

// connState counts client connections (not the worker's own probe) so the
// drain can tell when the lead-in has nothing left to do, and ends the
// count of a streamed response in flight once its connection has written
// it: a connection turns idle only after its response's last byte, and
// closed when the write failed or the response closed it.
func (w *worker) connState(c net.Conn, st fasthttp.ConnState) {
	if isProbe(c) {
		return
	}
	switch st {
	case fasthttp.StateNew:
		w.conns.Add(1)
	case fasthttp.StateIdle:
		w.endStream(c)
	case fasthttp.StateClosed, fasthttp.StateHijacked:
		w.endStream(c)
		w.conns.Add(-1)
	}
}

// endStream takes c's streamed response, if it had one, out of the
// requests in flight.
func (w *worker) endStream(c net.Conn) {
	if _, ok := w.streaming.LoadAndDelete(c); ok {
		w.inFlight.Add(-1)
	}
}

type fasthttpLogger struct{ log zerolog.Logger }

func (l fasthttpLogger) Printf(format string, args ...any) {
	l.log.Debug().Str("detail", fmt.Sprintf(format, args...)).Msg("fasthttp")
}

// isTimeout reports whether err is a read deadline.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.ETIMEDOUT)
}
