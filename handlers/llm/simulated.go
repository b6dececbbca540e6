package llm

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// Defaults for SimulatedConfig.
const (
	// DefaultSimulatedLatency is the latency a deployment should configure
	// to resemble a real model. NewSimulated does not apply it: a zero
	// Latency means "answer at once" (see SimulatedConfig.Latency).
	DefaultSimulatedLatency = 3 * time.Second
	// DefaultSimulatedModel is applied by NewSimulated when Model is "".
	DefaultSimulatedModel = "simulated-1"
)

// echoWords bounds how much of the user's message the simulated reply quotes,
// which also bounds the reply's size whatever the request.
const echoWords = 24

// SimulatedConfig configures the simulated provider.
type SimulatedConfig struct {
	// Latency is how long a reply takes, spread evenly over its words. It is
	// used as given: zero (the zero value) or negative answers at once, and
	// callers that want realism pass DefaultSimulatedLatency.
	Latency time.Duration
	// Model is reported when Request.Model is ""; default DefaultSimulatedModel.
	Model string
}

// Simulated is a deterministic provider that calls no model: it streams a
// fixed-template reply derived from the request. It is safe for concurrent
// use.
type Simulated struct {
	latency time.Duration
	model   string
}

// NewSimulated returns a simulated provider for cfg.
func NewSimulated(cfg SimulatedConfig) *Simulated {
	s := &Simulated{latency: max(cfg.Latency, 0), model: cfg.Model}
	if s.model == "" {
		s.model = DefaultSimulatedModel
	}
	return s
}

// Complete streams the simulated reply to req word by word (each delta a word
// and its following space), the words spread evenly over the configured
// latency, and returns it. The same request always gets the same reply. It
// uses one timer and no goroutine of its own. onDelta, if not nil, is called
// on the calling goroutine; an error from it abandons the call and is
// returned wrapped. A cancelled ctx returns an error wrapping
// context.Canceled at once; an expired one wraps ErrTimeout.
func (s *Simulated) Complete(ctx context.Context, req Request, onDelta func(string) error) (Response, error) {
	model := req.Model
	if model == "" {
		model = s.model
	}
	text := simulatedReply(model, req.Messages)
	resp := Response{Text: text, Provider: ProviderSimulated, Model: model}
	prompt := 0
	for _, m := range req.Messages {
		prompt += countWords(m.Content)
	}
	words := countWords(text)
	resp.Usage = Usage{PromptTokens: prompt, CompletionTokens: words}

	if err := ctx.Err(); err != nil {
		return Response{}, fmt.Errorf("simulated complete: %w", ctxError(ctx))
	}
	var timer *time.Timer
	start := time.Now()
	rest := text
	for i := 1; rest != ""; i++ {
		var word string
		word, rest = nextDelta(rest)
		if s.latency > 0 {
			// Deadlines from start, not from the previous word, so that
			// scheduling delays do not add up.
			wait := time.Until(start.Add(s.latency * time.Duration(i) / time.Duration(words)))
			if timer == nil {
				timer = time.NewTimer(wait)
				defer timer.Stop()
			} else {
				timer.Reset(wait)
			}
			select {
			case <-ctx.Done():
				return Response{}, fmt.Errorf("simulated complete: %w", ctxError(ctx))
			case <-timer.C:
			}
		} else if ctx.Err() != nil {
			return Response{}, fmt.Errorf("simulated complete: %w", ctxError(ctx))
		}
		if onDelta != nil {
			if err := onDelta(word); err != nil {
				return Response{}, fmt.Errorf("simulated complete: deliver delta: %w", err)
			}
		}
	}
	return resp, nil
}

// simulatedReply builds the reply: a fixed template that labels itself and
// quotes the start of the last user message.
func simulatedReply(model string, msgs []Message) string {
	var last string
	found := false
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].Role == "user" {
			last, found = msgs[i].Content, true
			break
		}
	}
	var b strings.Builder
	b.Grow(256)
	b.WriteString("This is a simulated reply from ")
	b.WriteString(model)
	b.WriteString("; no language model was called. ")
	n := countWords(last)
	if !found || n == 0 {
		b.WriteString("You sent no user message.")
	} else {
		b.WriteString("You wrote ")
		b.WriteString(strconv.Itoa(n))
		if n == 1 {
			b.WriteString(" word: \"")
		} else {
			b.WriteString(" words: \"")
		}
		rest := last
		for i := 0; i < min(n, echoWords); i++ {
			var w string
			w, rest = nextWord(rest)
			if i > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(w)
		}
		if n > echoWords {
			b.WriteString(" ...")
		}
		b.WriteString("\".")
	}
	b.WriteString(" Configure an OpenAI-compatible endpoint to get real answers.")
	return b.String()
}

// nextWord returns the first whitespace-separated word of s and what follows it.
func nextWord(s string) (word, rest string) {
	s = strings.TrimLeftFunc(s, unicode.IsSpace)
	end := strings.IndexFunc(s, unicode.IsSpace)
	if end < 0 {
		return s, ""
	}
	return s[:end], s[end:]
}

// nextDelta returns the first word of s with the whitespace after it, and
// the rest, so that the deltas of a text concatenate back to it. Leading
// whitespace is part of the first delta.
func nextDelta(s string) (delta, rest string) {
	i := 0
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		if !unicode.IsSpace(r) {
			break
		}
		i += n
	}
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		if unicode.IsSpace(r) {
			break
		}
		i += n
	}
	for i < len(s) {
		r, n := utf8.DecodeRuneInString(s[i:])
		if !unicode.IsSpace(r) {
			break
		}
		i += n
	}
	return s[:i], s[i:]
}

// countWords counts whitespace-separated words without allocating.
func countWords(s string) int {
	n, in := 0, false
	for _, r := range s {
		space := unicode.IsSpace(r)
		if !space && !in {
			n++
		}
		in = !space
	}
	return n
}
