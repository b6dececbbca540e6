// Package llm provides chat-completion providers for the agent API: a
// deterministic simulated one, the default that runs on any machine, and a
// client for any OpenAI-compatible /chat/completions endpoint (OpenAI,
// Ollama, vLLM, llama.cpp server).
//
// Both providers have the same method,
//
//	Complete(ctx, Request, onDelta func(string) error) (Response, error)
//
// and return concrete types; the consumer (package handlers) declares the
// interface it needs. Complete delivers each text delta to onDelta in order
// on the calling goroutine and returns the whole Response at the end. An
// error from onDelta abandons the call and is returned wrapped.
//
// # Simulated
//
// Simulated calls no model. Its reply is a fixed template, labelled as
// simulated, that quotes the first words of the last user message, so the
// same request always gets the same reply. It streams the reply word by word,
// spread evenly over SimulatedConfig.Latency, using one timer per call and no
// goroutine of its own. Usage counts whitespace-separated words.
//
// Measured cost of one in-flight call, its caller's goroutine included:
// about 5.3 KB (1.25 KB heap, 4.1 KB stack; RSS grows by 5.5 KB per call) with
// 10,000 concurrent calls and a 2 s latency, and the same with 30 s, on
// Go 1.26 linux/amd64. Command:
//
//	go test -run TestSimulatedMemoryPerCall -v ./handlers/llm/
//	LLM_MEMTEST_LATENCY=30s go test -run TestSimulatedMemoryPerCall -v ./handlers/llm/
//
// The test fails above 40 KiB per call; it skips under -race and -short.
//
// # OpenAI-compatible client
//
// OpenAI sends POST {BaseURL}/chat/completions with "stream": true and
// "stream_options": {"include_usage": true}, and always reads the reply as
// a server-sent event stream, even when the caller wants no deltas, so that
// cancellation and the idle timer work. It is hand-written on net/http
// rather than built on github.com/openai/openai-go/v3, for three reasons
// measured here on Go 1.26 linux/amd64 with v3.98.0 (a program making one
// streamed call either way):
//
//   - binary size: 35.3 MB with the SDK against 8.9 MB without (24.7 MB
//     against 6.2 MB stripped), in a binary every worker process maps;
//   - start-up: package init took 2.0 to 2.4 ms and 314 KB with the SDK
//     against 0.6 to 1.0 ms and 40 KB without (GODEBUG=inittrace=1), paid by
//     every worker at every restart;
//   - the stream cut rule: the SDK's stream ends with Err() == nil both on
//     "data: [DONE]" and on an EOF in the middle of a reply, and drops an
//     unterminated last event, so ErrStreamCut could not be told apart.
//
// What it does need (a POST, retries, an SSE line reader, a chunk decoder)
// is openai.go and sse.go, about 600 lines with comments; FuzzSSE fuzzes the
// reader and decoder.
//
// The event-stream reader ignores comment lines (": keep-alive"), blank
// lines, "id" and "retry" fields; it joins multi-line data; it stops at
// "data: [DONE]", and accepts an EOF right after a finish_reason as the end
// (servers that never send [DONE]). An {"error": ...} object, a vLLM
// {"object": "error"} object or an "event: error" mid-stream ends the call
// with ErrUpstream. Lines and events are limited to 1 MiB, and the reply
// text a call accumulates to MaxReplySize (1 MiB): a stream of small events
// past it ends the call with ErrReplyTooLarge, which is not retried.
//
// # Deadlines, retries and errors
//
// A call is bounded by OpenAIConfig.Timeout, retries and backoff included,
// and by the caller's ctx. Each attempt also has an idle timer of
// IdleTimeout that starts when the request is sent and is re-armed by every
// byte received, keep-alive comments included (they show upstream is alive;
// Timeout still bounds the call). When it fires the attempt is abandoned
// with ErrIdle, which is a kind of ErrTimeout: errors.Is(err, ErrTimeout)
// holds for both.
//
// An attempt is retried, at most MaxRetries times, only if nothing was
// delivered to onDelta yet (with a nil onDelta nothing ever is, so a reply
// cut mid-way is then retried whole) and it failed with a 429 or 5xx status, a failed
// connection (ErrUnavailable) or a stream cut before its first delta.
// Timeouts, other statuses, stream error objects and bad responses are not
// retried. The pause is Retry-After (seconds or an HTTP date) when a status
// error has one, else 250 ms doubling per retry, jittered to [d/2, d); after
// a refused connection the base is 25 ms, so a closed port fails within
// about 100 ms in all. A retry whose pause would outlast Timeout is not
// made: the last error is returned at once. A Request with NoRetry is
// tried once (a background chat's job retries on its own).
//
// Errors, for the HTTP layer to map:
//
//   - ErrTimeout (504): Timeout or the caller's deadline expired; such errors
//     also wrap context.DeadlineExceeded.
//   - ErrIdle (504): the stream went quiet; also ErrTimeout.
//   - ErrUpstream (502): a *StatusError (non-2xx, any status: an upstream
//     400 is our 502) or an error object in the stream.
//   - ErrStreamCut (502): the stream ended before [DONE] or a finish_reason.
//   - ErrBadResponse (502): not an event stream, invalid JSON, oversized event.
//   - ErrReplyTooLarge (502): the reply passed MaxReplySize; also
//     ErrBadResponse.
//   - ErrUnavailable (502): upstream unreachable; wraps the net error, so
//     errors.Is(err, syscall.ECONNREFUSED) also works.
//   - context.Canceled: the caller cancelled ctx.
//   - anything else wrapping the onDelta error.
//
// StatusError.Body and error texts quote upstream for logs; the API key is
// redacted from them and never appears in an error. Upstream text must not
// be shown to clients.
//
// # Operational notes
//
// Cancelling ctx, an onDelta error, a timeout or the idle timer cancels the
// request, which closes its connection; the upstream sees the disconnect.
// After [DONE] the client reads on for up to 100 ms so that the connection
// returns to the pool. The default HTTP client keeps up to 1024 idle
// connections per host, dials with a 1 s timeout, honours HTTP(S)_PROXY, has
// no Client.Timeout and does not follow redirects. BaseURL is the API root
// ("https://api.openai.com/v1"); a BaseURL without a path gets "/v1".
package llm
