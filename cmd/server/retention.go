package main

import (
	"context"
	"errors"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers/store"
)

// Retention's pace: a pass at start and then every quarter of the
// retention period, at least every pruneEveryMax; within a pass, batches of
// store.DefaultPruneBatch rows with pruneBatchPause between them, so the
// workers' own writes are never held for long.
const (
	pruneEveryMin   = time.Second
	pruneEveryMax   = 10 * time.Minute
	pruneBatchPause = 20 * time.Millisecond
	pruneTimeout    = 10 * time.Minute
)

// pruner deletes the chats and activities older than --retention. It runs
// in the master only, one goroutine: on SQLite the master is the one
// process of the one server on the file; on PostgreSQL every host's master
// runs one, and store.Prune's advisory lock lets one at a time do a pass
// (the others skip theirs).
type pruner struct {
	st     *store.Store
	log    zerolog.Logger
	keep   time.Duration
	cancel context.CancelFunc
	done   chan struct{}
}

// startPruner starts the pruner; close stops it and waits for a pass in
// progress to end (it is cancelled).
func startPruner(st *store.Store, log zerolog.Logger, keep time.Duration) *pruner {
	ctx, cancel := context.WithCancel(context.Background())
	p := &pruner{st: st, log: log, keep: keep, cancel: cancel, done: make(chan struct{})}
	go p.run(ctx)
	return p
}

func (p *pruner) run(ctx context.Context) {
	defer close(p.done)
	every := min(max(p.keep/4, pruneEveryMin), pruneEveryMax)
	failing := false
	for {
		pctx, pcancel := context.WithTimeout(ctx, pruneTimeout)
		before := time.Now().Add(-p.keep)
		n, err := p.st.Prune(pctx, store.PruneOptions{Before: before, Pause: pruneBatchPause})
		pcancel()
		switch {
		case errors.Is(err, store.ErrPruneBusy):
			p.log.Debug().Msg("another server is pruning; pass skipped")
		case err != nil && ctx.Err() == nil:
			if !failing {
				p.log.Warn().Err(err).Int("chats", n.Chats).Int("activities", n.Activities).Msg("retention pass failed")
			}
			failing = true
		default:
			// A pass cut short by the master's stop says what it did.
			failing = false
			if n.Chats > 0 || n.Activities > 0 {
				p.log.Info().Int("chats", n.Chats).Int("activities", n.Activities).Time("before", before).Msg("deleted chats and activities past the retention period")
			}
		}
		if ctx.Err() != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(every):
		}
	}
}

func (p *pruner) close() {
	p.cancel()
	<-p.done
}
