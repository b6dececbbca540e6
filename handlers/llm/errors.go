package llm

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Sentinel errors. Every error Complete returns wraps at most one of them,
// except that ErrIdle also satisfies errors.Is(err, ErrTimeout),
// ErrReplyTooLarge errors.Is(err, ErrBadResponse), and a timeout
// errors.Is(err, context.DeadlineExceeded).
var (
	// ErrTimeout reports that the call ran past its deadline: OpenAIConfig.Timeout
	// or a deadline on the caller's context.
	ErrTimeout = errors.New("llm: upstream timed out")
	// ErrIdle reports that an upstream stream sent nothing for
	// OpenAIConfig.IdleTimeout. errors.Is(ErrIdle, ErrTimeout) is true.
	ErrIdle error = &kindError{msg: "llm: upstream stream went idle", parent: ErrTimeout}
	// ErrUpstream reports that upstream answered with an error: a non-2xx
	// status (see StatusError) or an error object inside the stream.
	ErrUpstream = errors.New("llm: upstream returned an error")
	// ErrStreamCut reports that the stream ended before upstream said it was
	// complete (no "data: [DONE]" and no finish_reason).
	ErrStreamCut = errors.New("llm: upstream stream cut short")
	// ErrBadResponse reports a response that is not an OpenAI chat.completions
	// event stream: wrong content type, invalid JSON, an oversized event.
	ErrBadResponse = errors.New("llm: upstream sent an invalid response")
	// ErrReplyTooLarge reports a reply longer than MaxReplySize.
	// errors.Is(ErrReplyTooLarge, ErrBadResponse) is true.
	ErrReplyTooLarge error = &kindError{msg: "llm: upstream reply too long", parent: ErrBadResponse}
	// ErrUnavailable reports that upstream could not be reached: refused or
	// timed-out dial, DNS or TLS failure, connection reset before a response.
	ErrUnavailable = errors.New("llm: upstream unavailable")
)

// kindError is a sentinel that is also a kind of another sentinel.
type kindError struct {
	msg    string
	parent error
}

func (e *kindError) Error() string { return e.msg }
func (e *kindError) Unwrap() error { return e.parent }

// StatusError reports that upstream answered with a non-2xx HTTP status.
// errors.Is(err, ErrUpstream) is true for it. Body is for logs only: an
// upstream's words are never a client's business.
type StatusError struct {
	// Status is the HTTP status code upstream answered with.
	Status int
	// Body is the start of the response body (at most 512 bytes), control
	// characters replaced by spaces and the API key, if present, redacted.
	Body string

	// retryAfter is the parsed Retry-After header; hasRetryAfter reports
	// whether there was a valid one.
	retryAfter    time.Duration
	hasRetryAfter bool
}

// Error returns the status and the body snippet.
func (e *StatusError) Error() string {
	s := fmt.Sprintf("llm: upstream returned status %d %s", e.Status, http.StatusText(e.Status))
	if e.Body != "" {
		s += ": " + e.Body
	}
	return s
}

// Is reports whether target is ErrUpstream.
func (e *StatusError) Is(target error) bool { return target == ErrUpstream }

// snippetSize bounds the upstream text kept in errors.
const snippetSize = 512

// snippet returns the start of b as printable single-line text with secret
// redacted, for logs.
func snippet(b []byte, secret string) string {
	s := strings.ToValidUTF8(string(b), "\uFFFD")
	if secret != "" {
		s = strings.ReplaceAll(s, secret, "[redacted]")
	}
	s = strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	if len(s) > snippetSize {
		cut := snippetSize
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut] + "..."
	}
	return s
}

// ctxError converts a finished context into the error Complete returns:
// cancellation wraps context.Canceled (and the cause, if the canceller gave
// one); an expired deadline wraps ErrTimeout and context.DeadlineExceeded.
func ctxError(ctx context.Context) error {
	err := ctx.Err()
	cause := context.Cause(ctx)
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%w: %w", ErrTimeout, err)
	case cause != nil && cause != err:
		return fmt.Errorf("%w: %w", err, cause)
	default:
		return err
	}
}

// RetryAfter returns the wait upstream asked for in its Retry-After header,
// and whether it sent a valid one.
func (e *StatusError) RetryAfter() (time.Duration, bool) { return e.retryAfter, e.hasRetryAfter }
