package handlers

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"slices"
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

// hostAllowed reports whether /api/ answers this request's Host, answering
// 421 when it does not.
func (h *Handler) hostAllowed(ctx *fasthttp.RequestCtx) bool {
	if h.cfg.HostAllowed == nil || h.cfg.HostAllowed(string(ctx.Host())) {
		return true
	}
	host := string(ctx.Host())
	if len(host) > 100 {
		host = host[:100]
	}
	writeErrorObject(ctx, fasthttp.StatusMisdirectedRequest, errorObject{Code: "misdirected_request",
		Message: fmt.Sprintf("this server does not answer for the host %q: list it in ALLOWED_HOSTS, or protect the API with API_TOKEN (docs/configuration.md)", host)})
	return false
}

// modelAllowed reports whether an agent may name model ("" is the
// provider's default, always allowed).
func (h *Handler) modelAllowed(model string) bool {
	return model == "" || h.cfg.Models == nil || slices.Contains(h.cfg.Models, model)
}

// modelRefused is the 422 for a model not on the allow-list, naming the
// allowed ones.
func (h *Handler) modelRefused(what string) errorObject {
	return errorObject{Code: "model_not_allowed",
		Message: fmt.Sprintf("%s is not allowed on this server; allowed: %s", what, strings.Join(h.cfg.Models, ", "))}
}

const (
	// corsAllowHeaders are the request headers the API reads: a browser
	// sends no other to another origin.
	corsAllowHeaders = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, Prefer, X-Request-ID"
	// corsExposeHeaders are the response headers the API's clients read,
	// beyond those a browser always shows a script.
	corsExposeHeaders = "Idempotent-Replayed, Location, Preference-Applied, Retry-After, X-Chat-Id, X-Request-ID"
)

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
		ctx.Response.Header.Set("Access-Control-Expose-Headers", corsExposeHeaders)
		return false
	}
	ctx.Response.Header.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE")
	ctx.Response.Header.Set("Access-Control-Allow-Headers", corsAllowHeaders)
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
