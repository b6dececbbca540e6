package handlers

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// watchInterval is how often the watcher looks for clients that went away.
const watchInterval = 250 * time.Millisecond

// watcher cancels the work of requests whose client has closed its
// connection. fasthttp notices a disconnect only when a write fails, and a
// chat waiting 60 s for its first token writes nothing; so one goroutine per
// worker peeks at every watched connection (recv with MSG_PEEK, which
// consumes nothing) and cancels the request's context on EOF or reset.
type watcher struct {
	mu    sync.Mutex
	conns map[*watched]struct{}
	stop  chan struct{} // nil until the goroutine starts; closed by close
	done  chan struct{}
}

type watched struct {
	raw    syscall.RawConn
	cancel context.CancelFunc
}

func newWatcher() *watcher {
	return &watcher{conns: make(map[*watched]struct{})}
}

// watch cancels cancel when c's peer closes. The returned func stops
// watching and must be called before the request's handler is done with c.
// Connections that are not sockets (in-memory ones) are not watched.
func (w *watcher) watch(c net.Conn, cancel context.CancelFunc) (unwatch func()) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return func() {}
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return func() {}
	}
	e := &watched{raw: raw, cancel: cancel}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stop == nil {
		w.stop, w.done = make(chan struct{}), make(chan struct{})
		go w.run(w.stop, w.done)
	}
	w.conns[e] = struct{}{}
	return func() {
		w.mu.Lock()
		delete(w.conns, e)
		w.mu.Unlock()
	}
}

func (w *watcher) run(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	t := time.NewTicker(watchInterval)
	defer t.Stop()
	var batch []*watched
	for {
		select {
		case <-stop:
			return
		case <-t.C:
		}
		w.mu.Lock()
		batch = batch[:0]
		for e := range w.conns {
			batch = append(batch, e)
		}
		w.mu.Unlock()
		for _, e := range batch {
			if peerClosed(e.raw) {
				e.cancel()
				w.mu.Lock()
				delete(w.conns, e)
				w.mu.Unlock()
			}
		}
	}
}

// close stops the watcher's goroutine and waits for it.
func (w *watcher) close() {
	w.mu.Lock()
	stop, done := w.stop, w.done
	w.stop = nil
	w.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// peerClosed reports whether the peer of raw has closed or reset the
// connection. Bytes waiting to be read (a pipelined request) mean it has not.
func peerClosed(raw syscall.RawConn) bool {
	var closed bool
	var buf [1]byte
	// Control, not Read: RawConn.Read fails with ErrDeadlineExceeded once
	// the read deadline fasthttp set for the request (Server.ReadTimeout)
	// has passed, which would look like a disconnect in the middle of
	// every chat longer than ReadTimeout. MSG_DONTWAIT keeps the peek from
	// blocking without the poller.
	err := raw.Control(func(fd uintptr) {
		n, _, err := syscall.Recvfrom(int(fd), buf[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == nil:
			closed = n == 0
		case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EINTR):
			closed = false
		default:
			closed = true
		}
	})
	return closed || err != nil
}
