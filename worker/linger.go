package worker

import (
	"io"
	"net"
	"sync/atomic"
	"time"
)

// Bounds of a lingering close. nginx lingers up to 30s in all and 5s
// between reads; a refused request's body is discarded at the speed the
// client sends it, so a shorter bound does, and the byte bound stops a
// client that would stream for ever.
const (
	lingerTimeout  = 5 * time.Second
	lingerMaxBytes = 64 << 20
)

// lingerListener wraps each accepted connection in a lingerConn.
type lingerListener struct{ net.Listener }

func (l lingerListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &lingerConn{Conn: c}, nil
}

// lingerConn closes like its connection unless linger was called: then it
// shuts down its sending side (the response already written gets a FIN
// after it), reads and discards what the client still sends for at most
// lingerTimeout and lingerMaxBytes, and only then closes.
//
// Without it, a server that refuses a request whose body it has not read
// (413, a bad Content-Length) closes while the client is still writing that
// body; the kernel answers the unread data with a reset, which destroys
// the response before the client reads it. Clients that send the whole
// body before reading the answer (Python's http.client, requests, httpx)
// then see "connection reset" instead of the 413. nginx calls this a
// lingering close.
type lingerConn struct {
	net.Conn
	lingering atomic.Bool
}

// NetConn returns the connection c wraps, as crypto/tls's Conn does, so
// that handlers can reach the socket (to watch for the client going away).
func (c *lingerConn) NetConn() net.Conn { return c.Conn }

// linger makes the next Close a lingering one.
func (c *lingerConn) linger() { c.lingering.Store(true) }

func (c *lingerConn) Close() error {
	if !c.lingering.Load() {
		return c.Conn.Close()
	}
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
		c.Conn.SetReadDeadline(time.Now().Add(lingerTimeout))
		io.CopyN(io.Discard, c.Conn, lingerMaxBytes)
	}
	return c.Conn.Close()
}

// lingerOnClose makes the close of ctx's connection a lingering one; the
// connection may be wrapped (TLS) around the lingerConn.
func lingerOnClose(c net.Conn) {
	for c != nil {
		switch t := c.(type) {
		case *lingerConn:
			t.linger()
			return
		case interface{ NetConn() net.Conn }:
			c = t.NetConn()
		default:
			return
		}
	}
}
