package handlers

import (
	"context"
	"errors"
	"net"
	"sync"
	"syscall"

	"github.com/valyala/fasthttp"
	"golang.org/x/sys/unix"
)

// watcher cancels the work of requests whose client has closed its
// connection. fasthttp notices a disconnect only when a write fails, and a
// chat waiting 60 s for its first token writes nothing. So each watched
// socket joins an epoll set of the watcher's own, for EPOLLRDHUP only (the
// peer closed or reset): the kernel reports disconnects by itself, and one
// goroutine per worker sleeps in epoll_wait until one happens. Its cost
// follows disconnects, not the connections watched; the earlier design,
// a peek at every socket every 250 ms, made 20,000 syscalls a second per
// worker at 10,000 chats in flight, in bursts that delayed /health.
type watcher struct {
	mu     sync.Mutex
	conns  map[uint64]*watched
	next   uint64
	epfd   int // -1 until the goroutine starts, and after close
	wake   int // eventfd that ends epoll_wait for close
	done   chan struct{}
	failed bool // epoll could not be set up: nothing is watched
}

type watched struct {
	raw    syscall.RawConn
	cancel context.CancelFunc
}

func newWatcher() *watcher {
	return &watcher{conns: make(map[uint64]*watched), epfd: -1, wake: -1}
}

// wakeKey is the epoll key of the eventfd; connection keys start at 1.
const wakeKey = 0

// setKey stores k in the event's 64-bit user data, which x/sys/unix
// splits into Fd and Pad.
func setKey(ev *unix.EpollEvent, k uint64) {
	ev.Fd, ev.Pad = int32(uint32(k)), int32(uint32(k>>32))
}

// eventKey is the key setKey stored.
func eventKey(ev unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// watch cancels cancel when c's peer closes. The returned func stops
// watching and must be called before the request's handler is done with c
// (the socket must still be open). Connections that are not sockets
// (in-memory ones) are not watched.
func (w *watcher) watch(c net.Conn, cancel context.CancelFunc) (unwatch func()) {
	sc, ok := socketOf(c)
	if !ok {
		return func() {}
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return func() {}
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.startLocked() {
		return func() {}
	}
	w.next++
	key := w.next
	epfd := w.epfd
	var added bool
	raw.Control(func(fd uintptr) {
		// EPOLLIN is left out: a pipelined request waiting to be read is
		// not a disconnect. EPOLLHUP and EPOLLERR are always reported.
		ev := unix.EpollEvent{Events: unix.EPOLLRDHUP}
		setKey(&ev, key)
		added = unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, int(fd), &ev) == nil
	})
	if !added {
		return func() {}
	}
	w.conns[key] = &watched{raw: raw, cancel: cancel}
	return func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		if _, ok := w.conns[key]; !ok {
			return // already reported, and taken out of the set
		}
		delete(w.conns, key)
		if w.epfd >= 0 {
			raw.Control(func(fd uintptr) { unix.EpollCtl(w.epfd, unix.EPOLL_CTL_DEL, int(fd), nil) })
		}
	}
}

// startLocked creates the epoll set and starts the goroutine on first use;
// it reports whether the watcher can watch.
func (w *watcher) startLocked() bool {
	if w.epfd >= 0 {
		return true
	}
	if w.failed {
		return false
	}
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		w.failed = true
		return false
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		w.failed = true
		return false
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	setKey(&ev, wakeKey)
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &ev); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		w.failed = true
		return false
	}
	w.epfd, w.wake, w.done = epfd, wake, make(chan struct{})
	go w.run(epfd, w.done)
	return true
}

// run waits for disconnects until the eventfd is written.
func (w *watcher) run(epfd int, done chan<- struct{}) {
	defer close(done)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(epfd, events, -1)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return
		}
		for _, ev := range events[:n] {
			key := eventKey(ev)
			if key == wakeKey {
				return
			}
			w.report(key)
		}
	}
}

// report handles an event on the connection key: the peer closed or reset
// it. A peer that only shut down its sending side after a pipelined
// request (bytes still waiting) has not gone; either way the connection
// leaves the set, as the kernel would report it again and again.
func (w *watcher) report(key uint64) {
	w.mu.Lock()
	e, ok := w.conns[key]
	if ok {
		delete(w.conns, key)
		e.raw.Control(func(fd uintptr) { unix.EpollCtl(w.epfd, unix.EPOLL_CTL_DEL, int(fd), nil) })
	}
	w.mu.Unlock()
	if ok && peerClosed(e.raw) {
		e.cancel()
	}
}

// close stops the watcher's goroutine and waits for it. Requests watched
// afterwards are not watched.
func (w *watcher) close() {
	w.mu.Lock()
	epfd, wake, done := w.epfd, w.wake, w.done
	w.epfd, w.failed = -1, true
	w.mu.Unlock()
	if epfd < 0 {
		return
	}
	one := [8]byte{1} // an eventfd takes a native-endian uint64; any non-zero value wakes it
	unix.Write(wake, one[:])
	<-done
	unix.Close(epfd)
	unix.Close(wake)
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

// socketOf finds the socket under c, which the server may have wrapped (TLS,
// the worker's lingering close); wrappers expose what they wrap by NetConn,
// as crypto/tls does.
func socketOf(c net.Conn) (syscall.Conn, bool) {
	for c != nil {
		if sc, ok := c.(syscall.Conn); ok {
			return sc, true
		}
		u, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = u.NetConn()
	}
	return nil, false
}

// onShutdown calls f when the server serving ctx shuts down, until stop is
// called. It keeps the server's shutdown channel rather than ctx:
// context.AfterFunc(ctx, f) would read ctx's values when the server shuts
// down, and a stream or a wait can end at that moment while fasthttp
// resets ctx for the connection's next request (a data race).
func onShutdown(ctx *fasthttp.RequestCtx, f func()) (stop func()) {
	shutdown := ctx.Done()
	done := make(chan struct{})
	go func() {
		select {
		case <-shutdown:
			f()
		case <-done:
		}
	}()
	var once sync.Once
	return func() { once.Do(func() { close(done) }) }
}
