package worker

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// Waits between accept attempts while an accept error lasts: they double
// from the first to the last.
const (
	acceptRetryFirst = 5 * time.Millisecond
	acceptRetryLast  = time.Second
)

// patientListener retries the accept errors that pass with time: out of file
// descriptors (EMFILE for the process, ENFILE for the system) or out of
// kernel memory (ENOBUFS, ENOMEM). fasthttp takes every accept error but a
// timeout as permanent and ends Serve, which would end the worker and every
// connection it holds; instead the new connections wait in the socket's
// backlog (where a neighbour may take them) until descriptors are freed.
// Accept is called from one goroutine (fasthttp's accept loop).
// The worker's accept state, shared by its listeners, is in state: set
// while an accept fails this way, cleared by the next accept that succeeds.
type patientListener struct {
	net.Listener
	log   zerolog.Logger
	state *acceptState
}

func (l patientListener) Accept() (net.Conn, error) {
	var wait time.Duration
	var since time.Time
	for {
		c, err := l.Listener.Accept()
		if err != nil && passing(err) {
			if wait == 0 {
				since, wait = time.Now(), acceptRetryFirst
				l.log.Warn().Err(err).Str("addr", l.Addr().String()).Msg("accept failed; new connections wait in the backlog, retrying")
				l.state.set(true)
			} else {
				wait = min(2*wait, acceptRetryLast)
			}
			time.Sleep(wait)
			continue
		}
		if err == nil {
			if wait != 0 {
				l.log.Info().Str("addr", l.Addr().String()).Dur("after_ms", time.Since(since)).Msg("accepting again")
			}
			l.state.set(false)
		}
		return c, err
	}
}

// acceptState says whether the worker's accept is failing, for its
// heartbeat and, through onChange, the application's /health.
type acceptState struct {
	failing  atomic.Bool
	onChange func(failing bool) // Config.OnAcceptFailing; may be nil
}

// set records the outcome of an accept and reports a change to onChange.
// Called from the accept loops; cheap when nothing changes.
func (a *acceptState) set(failing bool) {
	if a.failing.Load() == failing || !a.failing.CompareAndSwap(!failing, failing) {
		return
	}
	if a.onChange != nil {
		a.onChange(failing)
	}
}

// passing reports whether an accept error may clear by itself.
func passing(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}
