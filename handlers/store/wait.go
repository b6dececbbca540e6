package store

import (
	"context"
	"sync"
	"time"
)

// feed broadcasts "the highest activity id grew" to WaitActivity callers.
// Each waiter costs its own goroutine and nothing else: one poller per Store
// queries the database for all of them, and only while someone waits.
type feed struct {
	mu      sync.Mutex
	last    int64         // highest activity id seen; only grows
	changed chan struct{} // closed and replaced whenever last grows
	waiters int
	// kick (capacity 1) tells the idle poller that waiters appeared.
	kick chan struct{}
}

func (f *feed) init() {
	f.changed = make(chan struct{})
	f.kick = make(chan struct{}, 1)
}

// advance records that activity id exists and wakes waiters if that is news.
func (f *feed) advance(id int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if id > f.last {
		f.last = id
		close(f.changed)
		f.changed = make(chan struct{})
	}
}

func (f *feed) hasWaiters() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.waiters > 0
}

// WaitActivity blocks until an activity with id > after exists, then returns
// nil; or until ctx is done, returning ctx.Err(); or until Close, returning
// ErrClosed. Commits by this Store wake waiters at once; commits by any
// other process or Store on the same database within about one
// PollInterval (50 ms by default) on SQLite, and as soon as the NOTIFY
// arrives on PostgreSQL. It returns at once, without a query, when
// the Store already knows of a newer activity.
func (s *Store) WaitActivity(ctx context.Context, after int64) error {
	f := &s.feed
	f.mu.Lock()
	if f.last > after {
		f.mu.Unlock()
		return nil
	}
	f.waiters++
	if f.waiters == 1 {
		select {
		case f.kick <- struct{}{}:
		default:
		}
	}
	defer func() {
		f.mu.Lock()
		f.waiters--
		f.mu.Unlock()
	}()
	for {
		ch := f.changed
		f.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return ErrClosed
		}
		f.mu.Lock()
		if f.last > after {
			f.mu.Unlock()
			return nil
		}
	}
}

// poll is the Store's one poller goroutine; Close stops it through ctx and
// s.done. It sleeps until the first waiter arrives, then reads the highest
// activity id every PollInterval until no waiter is left, and publishes it.
//
// It reads MAX(id), an index lookup at the right edge of the table, through
// the pool rather than PRAGMA data_version on a dedicated connection: both
// cost one read of the WAL index, and MAX(id) needs no held connection and
// answers what waiters ask directly.
func (s *Store) poll(ctx context.Context) {
	defer close(s.polled)
	timer := time.NewTimer(0)
	<-timer.C
	var lastPoll time.Time
	failing := false
	for {
		select {
		case <-s.feed.kick:
		case <-s.done:
			return
		}
		for s.feed.hasWaiters() {
			// A waiter arriving after a quiet spell gets an answer now; a
			// stream of them shares one query per interval.
			if d := s.pollEvery - time.Since(lastPoll); d > 0 {
				timer.Reset(d)
				select {
				case <-timer.C:
				case <-s.done:
					return
				}
			}
			lastPoll = time.Now()
			id, err := s.maxActivityID(ctx)
			switch {
			case ctx.Err() != nil:
				return
			case err != nil:
				if !failing {
					s.log.Warn().Err(err).Str("path", s.path).Msg("activity poll failed")
				}
				failing = true
				continue
			case failing:
				s.log.Info().Str("path", s.path).Msg("activity poll recovered")
				failing = false
			}
			s.feed.advance(id)
		}
	}
}
