package worker

import (
	"encoding/binary"
	"encoding/hex"
	"math/rand/v2"

	"github.com/valyala/fasthttp"
)

// RequestIDHeader carries a request's id. The worker sets it on every
// request before the handler runs, so a handler reads exactly one valid id
// there, and on every response.
const RequestIDHeader = "X-Request-ID"

// maxRequestID is the longest id taken from a client.
const maxRequestID = 128

// setRequestID gives ctx's request its id: the client's own when it sent
// one that is printable ASCII and at most maxRequestID bytes, else a new
// random one (32 hex digits, as nginx's $request_id).
func setRequestID(ctx *fasthttp.RequestCtx) []byte {
	if id := ctx.Request.Header.Peek(RequestIDHeader); validRequestID(id) {
		return id
	}
	// An id names a request; it is no secret, so the runtime's fast
	// generator does: crypto/rand would cost a system call per request.
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], rand.Uint64())
	binary.LittleEndian.PutUint64(b[8:], rand.Uint64())
	var id [32]byte
	hex.Encode(id[:], b[:])
	ctx.Request.Header.SetBytesV(RequestIDHeader, id[:])
	return ctx.Request.Header.Peek(RequestIDHeader)
}

// validRequestID reports whether a client's id can be passed on as is: in
// headers, log lines and the upstream request.
func validRequestID(id []byte) bool {
	if len(id) == 0 || len(id) > maxRequestID {
		return false
	}
	for _, c := range id {
		if c < 0x20 || c > 0x7e {
			return false
		}
	}
	return true
}
