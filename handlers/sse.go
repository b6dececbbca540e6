package handlers

import (
	"bufio"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/valyala/fasthttp"
)

// sseWriter writes one text/event-stream response from the stream writer
// fasthttp calls after the handler returned. Events and the keep-alive
// comments that a timer writes during silences are serialised by mu.
type sseWriter struct {
	mu       sync.Mutex
	w        *bufio.Writer
	err      error // the first write error: the client is gone
	closed   bool
	interval time.Duration
	timer    *time.Timer
	conn     net.Conn // for write deadlines; nil when none can be set
}

// sseWriteTimeout cuts a stream whose client stopped reading: a write that
// cannot complete in this time ends the stream, so a stalled client does
// not hold its goroutine and connection for ever.
const sseWriteTimeout = 30 * time.Second

// startSSE sets the headers of an event stream.
func startSSE(ctx *fasthttp.RequestCtx) {
	ctx.SetContentType("text/event-stream")
	ctx.Response.Header.Set("Cache-Control", "no-cache")
	// nginx buffers responses unless told otherwise; a buffered event
	// stream reaches the client all at once at the end.
	ctx.Response.Header.Set("X-Accel-Buffering", "no")
	// The status and headers go out at once, before the first event (for
	// a chat, the LLM's first token, seconds away): a client learns that
	// its stream is open.
	ctx.Response.ImmediateHeaderFlush = true
}

func newSSEWriter(w *bufio.Writer, interval time.Duration, conn net.Conn) *sseWriter {
	s := &sseWriter{w: w, interval: interval, conn: conn}
	// Under mu: keepAlive reads s.timer, and the timer may fire before
	// this assignment would otherwise be visible to it.
	s.mu.Lock()
	s.timer = time.AfterFunc(interval, s.keepAlive)
	s.mu.Unlock()
	return s
}

// event writes one event and flushes it. id 0 writes no id line. It returns
// the first write error the stream met.
func (s *sseWriter) event(id int64, name string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.err != nil {
		return s.errLocked()
	}
	if id > 0 {
		s.w.WriteString("id: ")
		s.w.WriteString(strconv.FormatInt(id, 10))
		s.w.WriteByte('\n')
	}
	s.w.WriteString("event: ")
	s.w.WriteString(name)
	s.w.WriteString("\ndata: ")
	s.w.Write(data) // JSON from encoding/json holds no raw newline
	s.w.WriteString("\n\n")
	s.err = s.flushLocked()
	s.timer.Reset(s.interval)
	return s.errLocked()
}

// comment writes an SSE comment line, which clients ignore.
func (s *sseWriter) comment(text string) error {
	return s.field(": ", text)
}

// retry tells the client how soon to reconnect after the stream ends.
func (s *sseWriter) retry(d time.Duration) error {
	return s.field("retry: ", strconv.FormatInt(d.Milliseconds(), 10))
}

func (s *sseWriter) field(prefix, text string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.err != nil {
		return s.errLocked()
	}
	s.w.WriteString(prefix)
	s.w.WriteString(text)
	s.w.WriteString("\n\n")
	s.err = s.flushLocked()
	return s.errLocked()
}

func (s *sseWriter) keepAlive() {
	if s.comment("keep-alive") == nil {
		s.mu.Lock()
		if !s.closed {
			s.timer.Reset(s.interval)
		}
		s.mu.Unlock()
	}
}

func (s *sseWriter) flushLocked() error {
	if s.conn != nil {
		s.conn.SetWriteDeadline(time.Now().Add(sseWriteTimeout))
	}
	return s.w.Flush()
}

// gone reports whether a write failed, which means the client went away.
func (s *sseWriter) gone() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err != nil
}

func (s *sseWriter) errLocked() error {
	if s.err != nil {
		return s.err
	}
	if s.closed {
		return errStreamClosed
	}
	return nil
}

// close stops the keep-alive timer and clears the write deadline, which a
// kept-alive connection's next response must not inherit; the writer must
// not be used after the stream writer function returns, and close
// guarantees it is not.
func (s *sseWriter) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	s.timer.Stop()
	if s.conn != nil {
		s.conn.SetWriteDeadline(time.Time{})
	}
}
