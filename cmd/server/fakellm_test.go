package main

// The tests' one OpenAI-compatible upstream: a real loopback server that
// can misbehave at any byte (the fault tests) or answer every chat and
// record what it received (the edge tests).

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeLLM is an OpenAI-compatible /v1/chat/completions server on a real
// loopback socket, written on raw TCP so that it can misbehave at any byte:
// the fault is chosen by the start of the chat's user message ("reset #3"
// runs fault "reset"). Every response closes its connection, so the
// worker's pool keeps nothing and leak checks compare like with like.
type fakeLLM struct {
	ln       net.Listener
	mu       sync.Mutex
	always   string         // if set, the fault of every chat whatever its message
	attempts map[string]int // requests seen per user message
	// at holds when each request arrived, per user message; hangups when
	// the worker closed each request's connection before the fake was
	// done with it.
	at, hangups map[string][]time.Time
	seen        []seenUpstream
	wg          sync.WaitGroup
	done        chan struct{}
}

func newFakeLLM(t *testing.T) *fakeLLM {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeLLM{ln: ln, attempts: map[string]int{}, at: map[string][]time.Time{}, hangups: map[string][]time.Time{},
		done: make(chan struct{})}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			f.wg.Add(1)
			go func() {
				defer f.wg.Done()
				defer c.Close()
				f.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		close(f.done)
		ln.Close()
		f.wg.Wait()
	})
	return f
}

func (f *fakeLLM) baseURL() string { return "http://" + f.ln.Addr().String() + "/v1" }

// seenUpstream is one request the fake upstream received.
type seenUpstream struct {
	path, query string
	header      http.Header
	model       string
}

// recordingLLM is the fake upstream answering every chat with a short
// streamed reply; seen returns the requests it received. base is its
// address without a path.
func recordingLLM(t *testing.T) (base string, seen func() []seenUpstream) {
	t.Helper()
	f := newFakeLLM(t)
	f.mu.Lock()
	f.always = "ok"
	f.mu.Unlock()
	return "http://" + f.ln.Addr().String(), func() []seenUpstream {
		f.mu.Lock()
		defer f.mu.Unlock()
		return append([]seenUpstream(nil), f.seen...)
	}
}

func (f *fakeLLM) attemptsFor(msg string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.attempts[msg]
}

// arrivals returns when each request for msg arrived, in order.
func (f *fakeLLM) arrivals(msg string) []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.at[msg]...)
}

// hangupsFor returns when the worker closed the connection of a request
// for msg while the fake still meant to use it.
func (f *fakeLLM) hangupsFor(msg string) []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.hangups[msg]...)
}

const sseHeader = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n"

func sseChunk(text string) string {
	b, _ := json.Marshal(map[string]any{
		"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake-1",
		"choices": []any{map[string]any{"index": 0, "delta": map[string]any{"content": text}}},
	})
	return "data: " + string(b) + "\n\n"
}

const sseFinish = `data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","model":"fake-1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}` + "\n\n" +
	`data: {"id":"chatcmpl-fake","object":"chat.completion.chunk","model":"fake-1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}` + "\n\n" +
	"data: [DONE]\n\n"

func (f *fakeLLM) serve(c net.Conn) {
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		return
	}
	var body struct {
		Model    string                           `json:"model"`
		Messages []struct{ Role, Content string } `json:"messages"`
	}
	json.NewDecoder(req.Body).Decode(&body)
	msg := ""
	if n := len(body.Messages); n > 0 {
		msg = body.Messages[n-1].Content
	}
	f.mu.Lock()
	f.attempts[msg]++
	f.at[msg] = append(f.at[msg], time.Now())
	attempt := f.attempts[msg]
	f.seen = append(f.seen, seenUpstream{req.URL.Path, req.URL.RawQuery, req.Header.Clone(), body.Model})
	always := f.always
	f.mu.Unlock()
	// gone closes when the worker closes its side (it gave up) or the test
	// ends, so that slow faults never outlive their use.
	gone := make(chan struct{})
	served := make(chan struct{})
	defer close(served)
	go func() {
		defer close(gone)
		buf := make([]byte, 512)
		for {
			if _, err := c.Read(buf); err != nil {
				select {
				case <-served: // our own close
				default:
					f.mu.Lock()
					f.hangups[msg] = append(f.hangups[msg], time.Now())
					f.mu.Unlock()
				}
				return
			}
		}
	}()
	wait := func(d time.Duration) bool {
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-gone:
		case <-f.done:
		}
		return false
	}
	ok := func() {
		io.WriteString(c, sseHeader+sseChunk("fake ")+sseChunk("reply ")+sseChunk("done")+sseFinish)
	}
	fault, _, _ := strings.Cut(msg, " ")
	if always != "" {
		fault = always
	}
	switch fault {
	case "ok":
		ok()
	case "slow-ok":
		// The reply after 2 s, for a request that must still be in flight.
		if wait(2 * time.Second) {
			ok()
		}
	case "first-byte-never":
		// The request is read; the response never starts.
		wait(time.Minute)
	case "keepalive-only":
		// Headers and keep-alive comments, never a token: the idle timer is
		// kept happy and only LLM_TIMEOUT can end the call.
		io.WriteString(c, sseHeader)
		for i := 0; i < 300 && wait(300*time.Millisecond); i++ {
			if _, err := io.WriteString(c, ": keep-alive\n\n"); err != nil {
				return
			}
		}
	case "reset":
		// Two tokens, then a TCP reset mid-stream.
		io.WriteString(c, sseHeader+sseChunk("half ")+sseChunk("a "))
		wait(100 * time.Millisecond)
		c.(*net.TCPConn).SetLinger(0)
	case "429":
		// Rate limited once with Retry-After, then recovered.
		if attempt == 1 {
			io.WriteString(c, "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: 43\r\nConnection: close\r\n\r\n"+
				`{"error":{"message":"rate limited","x":1}}`+"\n")
			return
		}
		ok()
	case "slow-down":
		// Rate limited with Retry-After: 2 on the first request, then
		// recovered.
		if attempt == 1 {
			io.WriteString(c, "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Type: application/json\r\nContent-Length: 35\r\nConnection: close\r\n\r\n"+
				`{"error":{"message":"slow down"}}`+"\r\n")
			return
		}
		ok()
	case "503":
		io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 37\r\nConnection: close\r\n\r\n"+
			`{"error":{"message":"overloaded"}}`+"\r\n\r\n")
	case "garbage":
		io.WriteString(c, sseHeader+"data: {this is not json\n\n\x00\x01\xffgarbage\n\n")
		wait(5 * time.Second)
	case "drip":
		// One token now, then one every 10 s: the idle timer ends it.
		io.WriteString(c, sseHeader+sseChunk("drip "))
		for wait(10 * time.Second) {
			if _, err := io.WriteString(c, sseChunk("drip ")); err != nil {
				return
			}
		}
	default:
		io.WriteString(c, "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	}
}
