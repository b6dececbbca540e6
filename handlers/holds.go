package handlers

import (
	"fmt"
	"net"
	"strconv"
	"sync"

	"github.com/valyala/fasthttp"
)

// holdRetryAfter is the Retry-After, in seconds, of a request refused
// because its client holds too many streams and long-polls.
const holdRetryAfter = 5

// holds counts, per client address, the requests that hold a connection
// open while they wait: event streams and long-polls. One client cannot
// hold more than max of them at once on this worker, so it cannot take the
// worker's descriptors and memory from every other client. Safe for
// concurrent use.
type holds struct {
	max    int // 0: no limit
	client func(ctx *fasthttp.RequestCtx) string

	mu sync.Mutex
	n  map[string]int
}

func newHolds(max int, client func(ctx *fasthttp.RequestCtx) string) *holds {
	if client == nil {
		client = peerAddr
	}
	return &holds{max: max, client: client, n: map[string]int{}}
}

// peerAddr is the connection's peer address, when no Config.Client says
// how to read the client behind a proxy.
func peerAddr(ctx *fasthttp.RequestCtx) string {
	if _, ok := ctx.RemoteAddr().(*net.UnixAddr); ok {
		return "unix"
	}
	return ctx.RemoteIP().String()
}

// acquire counts one more held request for ctx's client and returns the
// function that ends it, to be called exactly once. Past the limit it
// sets Retry-After on ctx's response and returns a 429 error for fail.
func (hs *holds) acquire(ctx *fasthttp.RequestCtx) (release func(), err error) {
	if hs.max <= 0 {
		return func() {}, nil
	}
	// Copied: the key outlives the request when a stream releases it.
	client := hs.client(ctx)
	hs.mu.Lock()
	if hs.n[client] >= hs.max {
		hs.mu.Unlock()
		ctx.Response.Header.Set("Retry-After", strconv.Itoa(holdRetryAfter))
		return nil, &requestError{fasthttp.StatusTooManyRequests, fmt.Sprintf(
			"this client already holds %d event streams and long-polls on this worker, the most allowed (--limit-streams-per-client); close one or retry later", hs.max)}
	}
	hs.n[client]++
	hs.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			hs.mu.Lock()
			defer hs.mu.Unlock()
			if hs.n[client]--; hs.n[client] <= 0 {
				delete(hs.n, client)
			}
		})
	}, nil
}
