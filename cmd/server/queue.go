package main

import (
	"context"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/supervisor"
)

// queueEvery is how often the master reads the background chat queue's
// state for the status and /metrics.
const queueEvery = time.Second

// queueWatch keeps the background chat queue's state, database-wide, for
// the master's status (server status, /status.json, the status page) and
// /metrics: one query a second in the master, so that neither a status
// request nor a scrape waits on the database.
//
// On PostgreSQL it also hands back, every lostEvery, the background chats
// of other instances whose claim on the database is gone (a host that died
// with its master), so that they do not wait for River's rescuer.
type queueWatch struct {
	st          *store.Store
	log         zerolog.Logger
	maxAttempts int
	mu          sync.Mutex
	q           store.QueueStats
	ok          bool // q has been read at least once
	stop        chan struct{}
	done        chan struct{}
}

// lostEvery is how often the master looks for lost instances.
const lostEvery = 2 * time.Second

func newQueueWatch(st *store.Store, log zerolog.Logger, maxAttempts int) *queueWatch {
	w := &queueWatch{st: st, log: log, maxAttempts: maxAttempts, stop: make(chan struct{}), done: make(chan struct{})}
	go w.run()
	return w
}

func (w *queueWatch) run() {
	defer close(w.done)
	t := time.NewTicker(queueEvery)
	defer t.Stop()
	failing := false
	lastLost := time.Now()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), queueEvery)
		q, err := w.st.ChatQueueStats(ctx)
		cancel()
		if time.Since(lastLost) >= lostEvery {
			lastLost = time.Now()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if _, err := w.st.HandBackLostHosts(ctx, w.maxAttempts); err != nil {
				w.log.Warn().Err(err).Msg("chats of lost instances not handed back")
			}
			cancel()
		}
		switch {
		case err != nil && !failing:
			w.log.Warn().Err(err).Msg("chat queue state not read")
			failing = true
		case err == nil:
			failing = false
			w.mu.Lock()
			w.q, w.ok = q, true
			w.mu.Unlock()
		}
		select {
		case <-w.stop:
			return
		case <-t.C:
		}
	}
}

func (w *queueWatch) close() {
	close(w.stop)
	<-w.done
}

func (w *queueWatch) state() (store.QueueStats, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.q, w.ok
}

// fields are the status's facts about background chats.
func (w *queueWatch) fields() []supervisor.Field {
	q, ok := w.state()
	if !ok {
		return nil
	}
	oldest := "-"
	if !q.OldestQueued.IsZero() {
		oldest = time.Since(q.OldestQueued).Round(time.Second).String()
	}
	return []supervisor.Field{
		{Name: "chats queued", Value: strconv.Itoa(q.Queued)},
		{Name: "chats running", Value: strconv.Itoa(q.Running)},
		{Name: "chats retried", Value: strconv.Itoa(q.Retried)},
		{Name: "oldest queued", Value: oldest},
	}
}

// queueMetricsMeta describes the queue's families for /metrics.
const queueMetricsMeta = `# HELP corral_chat_queue_depth Background chats queued, database-wide.
# TYPE corral_chat_queue_depth gauge
# HELP corral_chat_queue_running Background chats running, database-wide.
# TYPE corral_chat_queue_running gauge
# HELP corral_chat_queue_retries_total Background chat attempts retried (chat.retried activities), database-wide.
# TYPE corral_chat_queue_retries_total counter
# HELP corral_chat_queue_oldest_age_seconds Age of the oldest queued background chat; 0 when none waits.
# TYPE corral_chat_queue_oldest_age_seconds gauge
`

// writeMetrics writes the queue's metrics in Prometheus text.
func (w *queueWatch) writeMetrics(out io.Writer) {
	q, ok := w.state()
	if !ok {
		return
	}
	age := 0.0
	if !q.OldestQueued.IsZero() {
		age = time.Since(q.OldestQueued).Seconds()
	}
	io.WriteString(out, queueMetricsMeta)
	fmt.Fprintf(out, "corral_chat_queue_depth %d\n", q.Queued)
	fmt.Fprintf(out, "corral_chat_queue_running %d\n", q.Running)
	fmt.Fprintf(out, "corral_chat_queue_retries_total %d\n", q.Retried)
	fmt.Fprintf(out, "corral_chat_queue_oldest_age_seconds %g\n", age)
}
