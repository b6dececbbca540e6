package llm

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func TestSSEReaderEvents(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     []string // "type|data" per event
		end      error
	}{
		{"plain", "data: a\n\ndata: b\n\n", []string{"|a", "|b"}, io.EOF},
		{"CRLF and no space", "data:a\r\n\r\ndata:  b\r\n\r\n", []string{"|a", "| b"}, io.EOF},
		{"comments and blanks", ": keep-alive\n\n\n\n:\ndata: x\n: mid\n\n", []string{"|x"}, io.EOF},
		{"multi-line data", "data: 1\ndata: 2\n\n", []string{"|1\n2"}, io.EOF},
		{"event type and ignored fields", "id: 7\nretry: 10\nevent: error\ndata: e\n\ndata: f\n\n", []string{"error|e", "|f"}, io.EOF},
		{"event type without data resets", "event: x\n\ndata: y\n\n", []string{"|y"}, io.EOF},
		{"last event without blank line", "data: a\n\ndata: [DONE]\n", []string{"|a", "|[DONE]"}, io.EOF},
		{"cut inside a line", "data: a\n\ndata: {\"cho", []string{"|a"}, io.ErrUnexpectedEOF},
		{"empty", "", nil, io.EOF},
	} {
		// OneByteReader exercises lines split across reads.
		for _, r := range []io.Reader{strings.NewReader(tc.in), iotest.OneByteReader(strings.NewReader(tc.in))} {
			sse := newSSEReader(r)
			var got []string
			var err error
			for {
				var ev sseEvent
				if ev, err = sse.next(); err != nil {
					break
				}
				got = append(got, ev.typ+"|"+string(ev.data))
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") || err != tc.end {
				t.Errorf("%s: events %q ending %v, want %q ending %v", tc.name, got, err, tc.want, tc.end)
			}
		}
	}
}

func TestSSEReaderLimits(t *testing.T) {
	long := "data: " + strings.Repeat("x", maxEventSize) + "\n\n"
	if _, err := newSSEReader(strings.NewReader(long)).next(); err != errEventTooLarge {
		t.Errorf("next() on a %d-byte line error = %v, want errEventTooLarge", len(long), err)
	}
	many := strings.Repeat("data: "+strings.Repeat("y", 1000)+"\n", maxEventSize/1000+1) + "\n"
	if _, err := newSSEReader(strings.NewReader(many)).next(); err != errEventTooLarge {
		t.Errorf("next() on a %d-byte event error = %v, want errEventTooLarge", len(many), err)
	}
	fine := "data: " + strings.Repeat("z", 100_000) + "\n\n"
	if ev, err := newSSEReader(strings.NewReader(fine)).next(); err != nil || len(ev.data) != 100_000 {
		t.Errorf("next() on a 100 kB line = %d bytes, %v, want all of it", len(ev.data), err)
	}
}

func TestStreamErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     error
	}{
		{"done", "data: " + contentChunk("a") + "\n\ndata: [DONE]\n\n", nil},
		{"finish then EOF", "data: " + finishChunk + "\n\n", nil},
		{"EOF before end", "data: " + contentChunk("a") + "\n\n", ErrStreamCut},
		{"cut mid-line", "data: " + contentChunk("a")[:20], ErrStreamCut},
		{"error object", `data: {"error":{"message":"nope"}}` + "\n\n", ErrUpstream},
		{"error string", `data: {"error":"nope"}` + "\n\n", ErrUpstream},
		{"vLLM error object", `data: {"object":"error","message":"nope","code":400}` + "\n\n", ErrUpstream},
		{"error event", "event: error\ndata: {\"message\":\"nope\"}\n\n", ErrUpstream},
		{"null error is fine", `data: {"error":null,"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":"stop"}]}` + "\n\ndata: [DONE]\n\n", nil},
		{"garbage", "data: hello\n\n", ErrBadResponse},
		{"wrong types", `data: {"choices":"x"}` + "\n\n", ErrBadResponse},
		{"read error", "", ErrStreamCut},
	} {
		var r io.Reader = strings.NewReader(tc.in)
		if tc.name == "read error" {
			r = iotest.ErrReader(errors.New("connection reset"))
		}
		st := &stream{emit: func(string) error { return nil }}
		err := st.consume(newSSEReader(r))
		if (tc.want == nil) != (err == nil) || (tc.want != nil && !errors.Is(err, tc.want)) {
			t.Errorf("%s: consume() = %v, want %v", tc.name, err, tc.want)
		}
	}
}

func TestStreamIgnoresOtherChoices(t *testing.T) {
	in := `data: {"choices":[{"index":1,"delta":{"content":"B"}},{"index":0,"delta":{"content":"A"},"finish_reason":"stop"}]}` + "\n\ndata: [DONE]\n\n"
	st := &stream{}
	if err := st.consume(newSSEReader(strings.NewReader(in))); err != nil || st.text.String() != "A" {
		t.Errorf("consume() text %q, %v, want A", st.text.String(), err)
	}
}

// FuzzSSE feeds arbitrary bodies through the event-stream parser and the
// chunk decoder: they must not panic, every error must be one of the
// documented kinds, and the deltas must add up to the text.
func FuzzSSE(f *testing.F) {
	f.Add([]byte("data: " + contentChunk("hi") + "\n\ndata: " + finishChunk + "\n\ndata: [DONE]\n\n"))
	f.Add([]byte(": keep-alive\r\n\r\ndata: {\"choices\":[]}\n\n"))
	f.Add([]byte("event: error\ndata: {}\n\n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		var deltas []string
		st := &stream{emit: func(d string) error {
			deltas = append(deltas, d)
			return nil
		}}
		err := st.consume(newSSEReader(bytes.NewReader(body)))
		if err != nil && !errors.Is(err, ErrStreamCut) && !errors.Is(err, ErrBadResponse) && !errors.Is(err, ErrUpstream) {
			t.Fatalf("consume(%q) error = %v, want ErrStreamCut, ErrBadResponse or ErrUpstream", body, err)
		}
		if err == nil && !st.done && !st.finished {
			t.Fatalf("consume(%q) = nil without [DONE] or finish_reason", body)
		}
		if got := strings.Join(deltas, ""); got != st.text.String() {
			t.Fatalf("consume(%q) deltas %q, want them to concatenate to text %q", body, got, st.text.String())
		}
		// JSON decoding turns each invalid byte into a 3-byte U+FFFD, at most.
		if st.text.Len() > 3*len(body) {
			t.Fatalf("consume(%q) text is %d bytes from a %d-byte body", body, st.text.Len(), len(body))
		}
	})
}
