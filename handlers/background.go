package handlers

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
)

// Background chats: RunChat is the job the store's River client runs for
// each attempt of a background chat, in whichever worker took it.

// DefaultChatMaxAttempts is Config.ChatMaxAttempts's default.
const DefaultChatMaxAttempts = 3

// Retry backoff of a background chat between attempts, when upstream gave
// no Retry-After: retryBase doubling per attempt up to retryCap, jittered.
const (
	retryBase = time.Second
	retryCap  = time.Minute
	// maxRetryAfter caps an upstream's Retry-After.
	maxRetryAfter = 10 * time.Minute
)

// errCancelRequested is the cause of a chat context cancelled by
// POST /api/chats/{id}/cancel (seen here through the activity feed).
var errCancelRequested = errors.New("chat cancelled")

// RunChat runs one attempt of the background chat chatID, queued by the
// request requestID, which goes upstream and into the attempt's end
// activity as the synchronous path does: it marks the chat
// running here, calls the LLM, writes the deltas to the store in batches
// and records the end. ctx ends when this worker stops; the chat then goes
// back to the queue without counting the attempt. Upstream errors worth a
// retry (timeouts, 429, 5xx, a cut stream, unreachable) requeue it with
// backoff, honouring Retry-After, until Config.ChatMaxAttempts; others fail
// it. Its errors (the store's) make River retry the job.
func (h *Handler) RunChat(ctx context.Context, chatID, requestID string) error {
	callCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	unregister, err := h.cancels.register(chatID, cancel)
	if err != nil {
		return err
	}
	defer unregister()
	// The end of each attempt carries the queuing request's id, as a
	// synchronous chat's does.
	tagged := func(data map[string]any) map[string]any {
		if requestID != "" {
			data["request_id"] = requestID
		}
		return data
	}

	sc, scancel := context.WithTimeout(context.Background(), storeTimeout)
	c, err := h.cfg.Store.BeginAttempt(sc, chatID, h.origin)
	scancel()
	if errors.Is(err, store.ErrChatFinished) || errors.Is(err, store.ErrNotFound) {
		return nil // cancelled while queued: nothing to run
	}
	if err != nil {
		h.m.storeError("begin chat")
		return err
	}
	h.m.chatStarted()
	h.m.background(c.Attempts)
	started := time.Now()
	sc, scancel = context.WithTimeout(context.Background(), storeTimeout)
	agent, err := h.cfg.Store.Agent(sc, c.AgentID)
	scancel()
	if err != nil {
		h.m.chatEnded()
		if errors.Is(err, store.ErrNotFound) {
			_, obj := statusOf(errNoAgent)
			return h.endAttempt(c, store.Outcome{Status: store.ChatFailed, Data: tagged(map[string]any{
				"reason": obj.Code, "status": http.StatusNotFound, "message": obj.Message})})
		}
		return h.requeue(c, store.Requeue{Reason: "store_unavailable", Uncounted: true}, time.Second)
	}
	if !h.modelAllowed(agent.Model) {
		h.m.chatEnded()
		obj := h.modelRefused(fmt.Sprintf("agent %q names model %q, which", agent.ID, agent.Model))
		return h.endAttempt(c, store.Outcome{Status: store.ChatFailed, Data: tagged(map[string]any{
			"reason": obj.Code, "status": http.StatusUnprocessableEntity, "message": obj.Message})})
	}
	// One upstream request per attempt: the retries, their backoff and
	// Retry-After are the job's, so a wait frees the worker's slot, lasts
	// across restarts and counts in attempts.
	req := llm.Request{Model: agent.Model, RequestID: requestID, NoRetry: true, Messages: []llm.Message{
		{Role: "system", Content: agent.SystemPrompt},
		{Role: "user", Content: c.Message},
	}}
	llmCtx, stop := context.WithTimeout(callCtx, h.cfg.LLMTimeout)
	resp, err := h.cfg.LLM.Complete(llmCtx, req, func(text string) error {
		h.deltas.add(c.ID, c.Attempts, text)
		return nil
	})
	stop()
	h.deltas.flush()
	d := time.Since(started)
	h.m.chatEnded()
	status := store.ChatCompleted
	defer func() {
		h.m.llmCall(cmp.Or(resp.Provider, "unknown"), status, d, resp.Usage.PromptTokens, resp.Usage.CompletionTokens)
	}()
	switch {
	case err == nil:
		return h.endAttempt(c, store.Outcome{Status: store.ChatCompleted, Reply: resp.Text, Data: tagged(map[string]any{
			"duration_ms": d.Milliseconds(), "provider": resp.Provider, "model": resp.Model,
			"usage": map[string]int{"prompt_tokens": resp.Usage.PromptTokens, "completion_tokens": resp.Usage.CompletionTokens},
		})})
	case errors.Is(context.Cause(callCtx), errCancelRequested) || store.JobCancelled(ctx):
		status = store.ChatCancelled
		h.log.Info().Str("chat_id", c.ID).Int("attempt", c.Attempts).Msg("chat cancelled on request")
		return nil // the canceller recorded it
	case ctx.Err() != nil:
		// This worker is stopping: the chat waits for the next one.
		status = store.ChatQueued
		h.log.Info().Str("chat_id", c.ID).Int("attempt", c.Attempts).Msg("background chat handed back: worker stopping")
		return h.requeue(c, store.Requeue{Reason: "worker_stopping", Uncounted: true}, 0)
	}
	code, obj := statusOf(err)
	data := tagged(map[string]any{"reason": obj.Code, "status": code, "message": obj.Message, "duration_ms": d.Milliseconds()})
	if retryable(err) {
		status = store.ChatQueued
		h.log.Warn().Err(err).Str("chat_id", c.ID).Int("attempt", c.Attempts).Msg("background chat attempt failed")
		return h.requeue(c, store.Requeue{Reason: obj.Code, Data: data, MaxAttempts: h.cfg.ChatMaxAttempts}, retryWait(c.Attempts, err))
	}
	status = store.ChatFailed
	h.log.Warn().Err(err).Str("chat_id", c.ID).Int("status", code).Msg("chat failed")
	return h.endAttempt(c, store.Outcome{Status: store.ChatFailed, Data: data})
}

// endAttempt records the end of attempt c.
func (h *Handler) endAttempt(c store.ChatRow, o store.Outcome) error {
	o.Attempt = c.Attempts
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	act, err := h.cfg.Store.EndChat(sc, c.ID, o)
	switch {
	case err == nil:
		h.m.activity(act.Type)
	case errors.Is(err, store.ErrChatFinished):
		// Cancelled meanwhile, or handed back: the outcome is not ours.
	default:
		h.m.storeError("finish chat")
		return err
	}
	return nil
}

// requeue hands attempt c back, to run again after wait.
func (h *Handler) requeue(c store.ChatRow, r store.Requeue, wait time.Duration) error {
	sc, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	r.After = wait
	again, err := h.cfg.Store.RequeueChat(sc, c.ID, c.Attempts, r)
	switch {
	case errors.Is(err, store.ErrChatFinished):
		return nil
	case err != nil:
		h.m.storeError("requeue chat")
		return err
	case !again:
		h.m.activity("chat.failed")
		return nil
	}
	h.m.activity("chat.retried")
	return store.RetryIn(wait)
}

// retryable reports whether an attempt that failed with err is worth
// another: the LLM timed out, could not be reached, cut its stream or
// answered 429 or 5xx. Other 4xx would only fail again.
func retryable(err error) bool {
	if se, ok := errors.AsType[*llm.StatusError](err); ok {
		return se.Status == http.StatusTooManyRequests || se.Status >= 500
	}
	return errors.Is(err, llm.ErrTimeout) || errors.Is(err, llm.ErrUnavailable) || errors.Is(err, llm.ErrStreamCut)
}

// retryWait is the pause before the attempt after attempt: upstream's
// Retry-After if it sent one, else exponential backoff with jitter.
func retryWait(attempt int, err error) time.Duration {
	if se, ok := errors.AsType[*llm.StatusError](err); ok {
		if d, ok := se.RetryAfter(); ok {
			return min(d, maxRetryAfter)
		}
	}
	d := min(retryBase<<min(attempt-1, 10), retryCap)
	return d/2 + rand.N(d/2+1)
}

// cancels runs a chat's cancellation wherever the chat runs. The canceller
// (any worker, any host) ends the chat "cancelled" in the store, which
// writes a "chat.cancelled" activity; every worker that runs chats reads
// the new ones every followEvery from one goroutine, while it has chats
// registered, and cancels the context of its chats that appear there.
//
// It reads nothing else: activity ids grow in commit order (store), so
// "chat.cancelled activities after the last one seen" misses none, and a
// chat is registered before it can be cancelled, so the position read when
// the follower starts, or while it has no chat, is a safe place to start.
// A worker with no chat (idle, or only background chats queued elsewhere)
// costs one read of the feed's position a second; with chats, one indexed
// read every followEvery, whatever the traffic.
type cancels struct {
	h       *Handler
	mu      sync.Mutex
	running map[string]context.CancelCauseFunc
	after   int64  // the last activity id the follower has looked past
	regs    uint64 // registrations so far
	started bool
	stop    context.CancelFunc
	done    chan struct{}
}

// register makes cancel run when chatID is cancelled, until unregister.
// The first call reads the feed's position before it returns, so no
// cancellation of a chat registered later is missed.
func (cs *cancels) register(chatID string, cancel context.CancelCauseFunc) (unregister func(), err error) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if !cs.started {
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		after, err := cs.h.cfg.Store.LastActivityID(ctx)
		cancel()
		if err != nil {
			return nil, err
		}
		var wctx context.Context
		wctx, cs.stop = context.WithCancel(context.Background())
		cs.done = make(chan struct{})
		cs.started, cs.after = true, after
		go cs.follow(wctx)
	}
	cs.running[chatID] = cancel
	cs.regs++
	return func() {
		cs.mu.Lock()
		delete(cs.running, chatID)
		cs.mu.Unlock()
	}, nil
}

// followEvery spaces the follower's reads: a cancellation arrives well
// within a second, and a worker running chats reads the feed ten times a
// second however busy it is.
const followEvery = 100 * time.Millisecond

// idleFollowEvery spaces the follower's reads of the feed's position while
// this worker runs no chat, so that the first read after is short.
const idleFollowEvery = time.Second

func (cs *cancels) follow(ctx context.Context) {
	defer close(cs.done)
	st := cs.h.cfg.Store
	t := time.NewTicker(followEvery)
	defer t.Stop()
	var lastIdleRead time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cs.mu.Lock()
		idle, regs, after := len(cs.running) == 0, cs.regs, cs.after
		cs.mu.Unlock()
		if idle {
			if time.Since(lastIdleRead) < idleFollowEvery {
				continue
			}
			lastIdleRead = time.Now()
			last, err := st.LastActivityID(ctx)
			if errors.Is(err, store.ErrClosed) {
				return
			}
			cs.mu.Lock()
			// Only if no chat registered meanwhile: its cancellation may
			// be at or below last.
			if err == nil && cs.regs == regs {
				cs.after = max(cs.after, last)
			}
			cs.mu.Unlock()
			continue
		}
		acts, err := st.Activities(ctx, store.Filter{After: after, Type: "chat.cancelled", Limit: store.MaxLimit})
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, store.ErrClosed) {
				return
			}
			continue // the database is down: the next tick tries again
		}
		cs.mu.Lock()
		for _, a := range acts {
			if cancel := cs.running[a.ChatID]; cancel != nil {
				cancel(errCancelRequested)
			}
		}
		if n := len(acts); n > 0 {
			cs.after = max(cs.after, acts[n-1].ID)
		}
		cs.mu.Unlock()
	}
}

func (cs *cancels) close() {
	cs.mu.Lock()
	started := cs.started
	cs.mu.Unlock()
	if started {
		cs.stop()
		<-cs.done
	}
}

// Delta batching: the deltas of every background chat of this worker are
// written together, every deltaFlushEvery or as soon as one chat has
// deltaFlushBytes waiting, in one transaction.
const (
	deltaFlushEvery = 100 * time.Millisecond
	deltaFlushBytes = 1 << 10
)

type deltaBatcher struct {
	st      Store
	onError func(error)
	mu      sync.Mutex
	pending []store.ChatDelta // one entry per chat and attempt, in arrival order
	index   map[string]int    // chat id -> position in pending
	kick    chan struct{}
	flushMu sync.Mutex // one flush at a time, in order
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

func newDeltaBatcher(st Store, onError func(error)) *deltaBatcher {
	return &deltaBatcher{st: st, onError: onError, index: map[string]int{}, kick: make(chan struct{}, 1),
		stop: make(chan struct{}), done: make(chan struct{})}
}

func (b *deltaBatcher) add(chatID string, attempt int, text string) {
	b.once.Do(func() { go b.run() })
	b.mu.Lock()
	i, ok := b.index[chatID]
	if !ok || b.pending[i].Attempt != attempt {
		i = len(b.pending)
		b.pending = append(b.pending, store.ChatDelta{ChatID: chatID, Attempt: attempt})
		b.index[chatID] = i
	}
	b.pending[i].Text += text
	full := len(b.pending[i].Text) >= deltaFlushBytes
	b.mu.Unlock()
	if full {
		select {
		case b.kick <- struct{}{}:
		default:
		}
	}
}

// flush writes whatever is pending now and returns when it is stored.
func (b *deltaBatcher) flush() {
	b.flushMu.Lock()
	defer b.flushMu.Unlock()
	b.mu.Lock()
	batch := b.pending
	b.pending, b.index = nil, map[string]int{}
	b.mu.Unlock()
	if len(batch) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	if err := b.st.AppendChatEvents(ctx, batch); err != nil && b.onError != nil {
		b.onError(err)
	}
}

func (b *deltaBatcher) run() {
	defer close(b.done)
	t := time.NewTicker(deltaFlushEvery)
	defer t.Stop()
	for {
		select {
		case <-b.stop:
			b.flush()
			return
		case <-t.C:
		case <-b.kick:
		}
		b.flush()
	}
}

func (b *deltaBatcher) close() {
	started := true
	b.once.Do(func() { started = false })
	if started {
		close(b.stop)
		<-b.done
	}
}
