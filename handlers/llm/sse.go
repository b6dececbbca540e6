package llm

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
)

// maxEventSize bounds one SSE line and one event's data, so that a broken or
// hostile upstream cannot make a worker buffer without limit.
const maxEventSize = 1 << 20

var errEventTooLarge = errors.New("event larger than 1 MiB")

// MaxReplySize bounds the reply text one call accumulates (Response.Text),
// for the same reason: a stream of small events could otherwise grow a
// reply without end, held whole in memory until the call returns. 1 MiB is
// about 250,000 tokens of English, twice the longest outputs models offered
// in 2025 (128k tokens), so only a runaway or hostile stream reaches it;
// the call then fails with ErrReplyTooLarge.
const MaxReplySize = 1 << 20

// sseEvent is one server-sent event. data is valid until the next call to
// sseReader.next.
type sseEvent struct {
	typ  string
	data []byte
}

// sseReader splits a text/event-stream body into events. It follows the
// WHATWG rules that matter for OpenAI-compatible servers: lines end in LF or
// CRLF (a lone CR is not a line end), a line starting with ':' is a comment
// (keep-alives), "data" lines of one event are joined with LF, a blank line
// dispatches the event, fields other than "data" and "event" are ignored.
type sseReader struct {
	br      *bufio.Reader
	line    []byte // a line longer than br's buffer, assembled
	data    []byte
	typ     string
	hasData bool
}

func newSSEReader(r io.Reader) *sseReader {
	return &sseReader{br: bufio.NewReader(r)}
}

// next returns the next event. At the end of the body it returns io.EOF if
// the body ended at a line boundary and io.ErrUnexpectedEOF if it ended
// inside a line. Complete "data" lines left without a closing blank line at
// EOF are still dispatched, once: servers that close right after their last
// event lose nothing. Other read errors are returned as they are.
func (s *sseReader) next() (sseEvent, error) {
	s.data, s.typ, s.hasData = s.data[:0], "", false
	for {
		line, err := s.readLine()
		if err != nil {
			if err == io.EOF && s.hasData {
				return sseEvent{typ: s.typ, data: s.data}, nil
			}
			return sseEvent{}, err
		}
		if len(line) == 0 {
			if s.hasData {
				return sseEvent{typ: s.typ, data: s.data}, nil
			}
			s.typ = ""
			continue
		}
		if line[0] == ':' {
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		if len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		switch string(field) {
		case "data":
			if len(s.data)+len(value)+1 > maxEventSize {
				return sseEvent{}, errEventTooLarge
			}
			if s.hasData {
				s.data = append(s.data, '\n')
			}
			s.data = append(s.data, value...)
			s.hasData = true
		case "event":
			s.typ = string(value)
		}
	}
}

// readLine returns the next line without its line end. The slice is valid
// until the next read.
func (s *sseReader) readLine() ([]byte, error) {
	s.line = s.line[:0]
	for {
		frag, err := s.br.ReadSlice('\n')
		switch err {
		case nil:
			if len(s.line) == 0 {
				return trimEOL(frag), nil
			}
			s.line = append(s.line, frag...)
			return trimEOL(s.line), nil
		case bufio.ErrBufferFull:
			s.line = append(s.line, frag...)
			if len(s.line) > maxEventSize {
				return nil, errEventTooLarge
			}
		case io.EOF:
			if len(frag) > 0 || len(s.line) > 0 {
				return nil, io.ErrUnexpectedEOF
			}
			return nil, io.EOF
		default:
			return nil, err
		}
	}
}

// drain reads and discards up to limit bytes until EOF, so that the HTTP/1.1
// connection under a finished stream goes back to the pool instead of being
// closed. It reports nothing: the caller bounds it with its idle timer.
func (s *sseReader) drain(limit int64) {
	_, _ = io.Copy(io.Discard, io.LimitReader(s.br, limit))
}

func trimEOL(b []byte) []byte {
	b = bytes.TrimSuffix(b, []byte("\n"))
	return bytes.TrimSuffix(b, []byte("\r"))
}

// wireChunk is the part of an OpenAI chat.completion.chunk that we use.
type wireChunk struct {
	Object  string `json:"object"`
	Model   string `json:"model"`
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			Content string `json:"content"`
		} `json:"delta"`
		FinishReason string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error   json.RawMessage `json:"error"`
	Message string          `json:"message"` // vLLM's {"object":"error","message":...}
}

// stream assembles a reply from a chat.completions event stream.
type stream struct {
	emit   func(string) error // nil: no deltas wanted
	secret string             // redacted from upstream text kept in errors

	text      strings.Builder
	model     string
	usage     Usage
	finished  bool // a choice reported a finish_reason
	done      bool // "data: [DONE]" arrived
	delivered bool // emit was called
	abandoned bool // emit returned an error
}

// consume reads events until upstream says the stream is complete. It
// returns nil on "data: [DONE]" or on EOF after a finish_reason (for servers
// that close without [DONE]). Every other end is an error wrapping
// ErrStreamCut, ErrBadResponse or ErrUpstream, or the reader's own error
// (a cancelled request's, for one), or the emit error.
func (st *stream) consume(sse *sseReader) error {
	for {
		ev, err := sse.next()
		switch {
		case err == io.EOF && st.finished:
			return nil
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			return fmt.Errorf("read stream: %w: %w", ErrStreamCut, err)
		case err == errEventTooLarge:
			return fmt.Errorf("read stream: %w: %w", ErrBadResponse, err)
		case err != nil:
			return fmt.Errorf("read stream: %w: %w", ErrStreamCut, err)
		}
		if err := st.handle(ev); err != nil {
			return err
		}
		if st.done {
			return nil
		}
	}
}

func (st *stream) handle(ev sseEvent) error {
	data := bytes.TrimSpace(ev.data)
	if len(data) == 0 {
		return nil
	}
	if string(data) == "[DONE]" {
		st.done = true
		return nil
	}
	if ev.typ == "error" {
		return fmt.Errorf("stream error event %s: %w", snippet(data, st.secret), ErrUpstream)
	}
	var c wireChunk
	if err := json.Unmarshal(data, &c); err != nil {
		return fmt.Errorf("decode chunk %s: %w: %w", snippet(data, st.secret), ErrBadResponse, err)
	}
	if (len(c.Error) > 0 && string(c.Error) != "null") || c.Object == "error" {
		return fmt.Errorf("stream error %s: %w", snippet(data, st.secret), ErrUpstream)
	}
	if c.Model != "" {
		st.model = c.Model
	}
	if c.Usage != nil {
		st.usage = Usage{PromptTokens: c.Usage.PromptTokens, CompletionTokens: c.Usage.CompletionTokens}
	}
	for _, ch := range c.Choices {
		// We ask for one choice; a server that sends more gets the first.
		if ch.Index != 0 {
			continue
		}
		if ch.FinishReason != "" {
			st.finished = true
		}
		if ch.Delta.Content == "" {
			continue
		}
		if st.text.Len()+len(ch.Delta.Content) > MaxReplySize {
			return fmt.Errorf("assemble reply: %w", ErrReplyTooLarge)
		}
		st.text.WriteString(ch.Delta.Content)
		if st.emit == nil {
			continue
		}
		st.delivered = true
		if err := st.emit(ch.Delta.Content); err != nil {
			st.abandoned = true
			return fmt.Errorf("deliver delta: %w", err)
		}
	}
	return nil
}
