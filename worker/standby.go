package worker

import (
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// standbyInterval is how often a worker looks at its neighbour's socket.
const standbyInterval = 25 * time.Millisecond

// standbyListener serves a neighbour slot's socket only when the neighbour
// does not: once connections have been waiting in that socket's queue on
// two looks in a row, standbyInterval apart, it accepts until the queue is
// empty, then goes back to looking. While every worker is alive the
// kernel's even SO_REUSEPORT spread stands, since each socket is drained by
// its own worker; when a worker is dead, stopped, starting or swamped, its
// neighbour drains its queue within about two intervals.
//
// The accept queue length of a listening socket is tcpi_unacked in
// TCP_INFO. Accept is called from one goroutine (fasthttp's accept loop).
type standbyListener struct {
	ln       *net.TCPListener
	tick     *time.Ticker
	done     chan struct{}
	close    sync.Once
	draining bool // the queue stood: accept without looking first
}

// newStandbyListener wraps a neighbour's socket; anything but a TCP
// listener is served plainly.
func newStandbyListener(ln net.Listener) net.Listener {
	tl, ok := ln.(*net.TCPListener)
	if !ok {
		return ln
	}
	return &standbyListener{ln: tl, tick: time.NewTicker(standbyInterval), done: make(chan struct{})}
}

// Accept returns the next connection the neighbour left waiting, or
// net.ErrClosed after Close.
func (l *standbyListener) Accept() (net.Conn, error) {
	for {
		if l.draining {
			// A short deadline: the owner may take the connection first.
			l.ln.SetDeadline(time.Now().Add(time.Millisecond))
			c, err := l.ln.Accept()
			if err == nil {
				return c, nil
			}
			if !isTimeout(err) {
				return nil, err
			}
			l.draining = false
		}
		for stood := 0; stood < 2; {
			select {
			case <-l.done:
				return nil, net.ErrClosed
			case <-l.tick.C:
			}
			if l.queued() > 0 {
				stood++
			} else {
				stood = 0
			}
		}
		l.draining = true
	}
}

// queued is the number of connections waiting to be accepted.
func (l *standbyListener) queued() uint32 {
	raw, err := l.ln.SyscallConn()
	if err != nil {
		return 0
	}
	var n uint32
	raw.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			n = info.Unacked
		}
	})
	return n
}

// Close stops Accept and closes this worker's descriptor of the socket
// (the socket itself stays open in the supervisor).
func (l *standbyListener) Close() error {
	l.close.Do(func() {
		close(l.done)
		l.tick.Stop()
	})
	return l.ln.Close()
}

func (l *standbyListener) Addr() net.Addr { return l.ln.Addr() }
