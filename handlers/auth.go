package handlers

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"strings"

	"github.com/valyala/fasthttp"
)

// authorized reports whether the request may use /api/, answering 401 when
// it may not. With no tokens configured every request may.
func (h *Handler) authorized(ctx *fasthttp.RequestCtx) bool {
	if len(h.tokens) == 0 {
		return true
	}
	auth := ctx.Request.Header.Peek("Authorization")
	if len(auth) > 7 && strings.EqualFold(string(auth[:7]), "bearer ") {
		// Compare digests, so neither the length nor the content of a
		// configured token shows in the timing.
		got := sha256.Sum256(bytes.TrimSpace(auth[7:]))
		match := 0
		for _, want := range h.tokens {
			match |= subtle.ConstantTimeCompare(got[:], want)
		}
		if match == 1 {
			return true
		}
	}
	ctx.Response.Header.Set("WWW-Authenticate", `Bearer realm="corral"`)
	fail(ctx, errUnauthorized)
	return false
}

// cors adds the CORS headers for an allowed Origin and answers preflight
// requests; it reports whether it answered. Origins not on the list get no
// CORS headers, so browsers refuse them.
func (h *Handler) cors(ctx *fasthttp.RequestCtx) bool {
	if len(h.cfg.CORSOrigins) == 0 {
		return false
	}
	// The answer depends on Origin whether or not it is allowed, so caches
	// must key on it either way.
	ctx.Response.Header.Add("Vary", "Origin")
	origin := string(ctx.Request.Header.Peek("Origin"))
	if origin == "" || !h.originAllowed(origin) {
		return false
	}
	ctx.Response.Header.Set("Access-Control-Allow-Origin", origin)
	if !ctx.IsOptions() || len(ctx.Request.Header.Peek("Access-Control-Request-Method")) == 0 {
		return false
	}
	ctx.Response.Header.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE")
	ctx.Response.Header.Set("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID")
	ctx.Response.Header.Set("Access-Control-Max-Age", "600")
	ctx.SetStatusCode(fasthttp.StatusNoContent)
	return true
}

func (h *Handler) originAllowed(origin string) bool {
	for _, o := range h.cfg.CORSOrigins {
		if o == "*" || strings.EqualFold(o, origin) {
			return true
		}
	}
	return false
}
