package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strings"
	"time"
)

// DefaultPruneBatch is how many rows of one table Prune deletes in one
// transaction when PruneOptions.Batch is 0.
const DefaultPruneBatch = 500

// pruneLockKey is the advisory lock each batch of a PostgreSQL Prune
// takes for its transaction, so that one process at a time prunes,
// database-wide. No connection is held between batches: a pool of one
// stays usable during a pass.
const pruneLockKey int64 = 0x636f7272616c04

// ErrPruneBusy is Prune's error when another process is pruning the same
// PostgreSQL database: the pass is skipped.
var ErrPruneBusy = errors.New("store: another process is pruning")

// PruneOptions configures one Prune pass.
type PruneOptions struct {
	// Before is the cutoff: chats finished and activities written before
	// it are deleted.
	Before time.Time
	// Batch bounds the rows of one table deleted per transaction. Default
	// DefaultPruneBatch.
	Batch int
	// Pause is the wait between two batches, which lets other writers in.
	Pause time.Duration
}

// Pruned counts what one Prune pass deleted.
type Pruned struct {
	Chats, Activities int
}

// Prune deletes the finished chats (completed, failed or cancelled; a
// queued or running chat is never deleted), with their stored deltas,
// finished before o.Before, and the activities written before it, in
// transactions of at most o.Batch rows of a table, until none is left (for
// activities: until a batch, read in id order, has none). The newest
// activity is always kept, so activity ids stay increasing and
// never reused, and a cursor a client holds stays a valid place in the
// feed. On PostgreSQL each batch takes an advisory lock for its
// transaction; while another process holds it Prune returns ErrPruneBusy
// at once (or, after its first batch, stops and leaves the rest to it).
// What was deleted before an error stays deleted.
func (s *Store) Prune(ctx context.Context, o PruneOptions) (Pruned, error) {
	if o.Batch <= 0 {
		o.Batch = DefaultPruneBatch
	}
	var done Pruned
	cutoff := timeArg(o.Before)
	// Activities are read in id order, a batch at a time from after: the
	// pass ends with the first batch that has none to delete.
	var after int64
	chatsLeft, actsLeft := true, true
	for first := true; chatsLeft || actsLeft; first = false {
		if !first && o.Pause > 0 {
			select {
			case <-ctx.Done():
				return done, ctx.Err()
			case <-time.After(o.Pause):
			}
		}
		var chats, acts int
		last := after
		busy := false
		err := s.write(ctx, func(tx *sql.Tx) error {
			if s.pg != nil {
				var ok bool
				if err := tx.QueryRowContext(ctx, `SELECT pg_try_advisory_xact_lock($1)`, pruneLockKey).Scan(&ok); err != nil || !ok {
					busy = !ok
					return err
				}
			}
			var err error
			if chatsLeft {
				if chats, err = s.deleteFinishedChats(ctx, tx, cutoff, o.Batch); err != nil {
					return err
				}
			}
			if actsLeft {
				acts, last, err = s.deleteOldActivities(ctx, tx, cutoff, after, o.Batch)
			}
			return err
		})
		if err != nil {
			return done, s.wrap(ctx, "prune", err)
		}
		if busy {
			// Another process prunes: the first batch says so; a later one
			// leaves the rest to it.
			if first {
				return done, ErrPruneBusy
			}
			return done, nil
		}
		done.Chats += chats
		done.Activities += acts
		after = last
		chatsLeft = chatsLeft && chats == o.Batch
		actsLeft = actsLeft && acts > 0
	}
	return done, nil
}

// The queries that find what a batch deletes read an index, not the
// table, so that a pass with nothing to do costs a batch's worth of reads
// whatever the store's size; its write transaction holds SQLite's lock.
const (
	// pruneChats takes a cutoff and a batch size. The statuses are written
	// out as the index chats_finished's condition is, so that both engines
	// use it.
	pruneChats = `SELECT id FROM chats
WHERE finished_at < ? AND status IN ('completed', 'failed', 'cancelled') ORDER BY finished_at LIMIT ?`
	// pruneActivities takes a cutoff, an activity id and a batch size: the
	// next activities by id (the primary key) after that one, the newest
	// excepted, each with whether it was written before the cutoff.
	pruneActivities = `SELECT id, time < ? FROM activities
WHERE id > ? AND id < (SELECT max(id) FROM activities) ORDER BY id LIMIT ?`
)

// deleteOldActivities deletes, of the next batch activities after id after
// (the newest excepted), those written before cutoff, in tx, and returns
// how many and the last id it read. Ids follow time, so the old ones come
// first; one written out of time order (another host's clock) is passed
// over until a later pass, and the pass ends early only at a whole batch
// of them.
func (s *Store) deleteOldActivities(ctx context.Context, tx *sql.Tx, cutoff string, after int64, batch int) (int, int64, error) {
	rows, err := tx.QueryContext(ctx, s.q(pruneActivities), cutoff, after, batch)
	if err != nil {
		return 0, after, err
	}
	last := after
	var ids []any
	for rows.Next() {
		var old bool
		if err := rows.Scan(&last, &old); err != nil {
			rows.Close()
			return 0, after, err
		}
		if old {
			ids = append(ids, last)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil || len(ids) == 0 {
		return 0, last, err
	}
	in := "(" + strings.Repeat("?, ", len(ids)-1) + "?)"
	if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM activities WHERE id IN `+in), ids...); err != nil {
		return 0, after, err
	}
	return len(ids), last, nil
}

// deleteFinishedChats deletes up to batch chats finished before cutoff,
// and their deltas, in tx. Finished, not created: a chat queued or retried
// for long keeps its result for the whole period after it ends.
func (s *Store) deleteFinishedChats(ctx context.Context, tx *sql.Tx, cutoff string, batch int) (int, error) {
	rows, err := tx.QueryContext(ctx, s.q(pruneChats), cutoff, batch)
	if err != nil {
		return 0, err
	}
	var ids []any
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			rows.Close()
			return 0, err
		}
		ids = append(ids, id)
	}
	rows.Close()
	if err := rows.Err(); err != nil || len(ids) == 0 {
		return 0, err
	}
	in := "(" + strings.Repeat("?, ", len(ids)-1) + "?)"
	if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM chat_events WHERE chat_id IN `+in), ids...); err != nil {
		return 0, fmt.Errorf("chat events: %w", err)
	}
	if _, err := tx.ExecContext(ctx, s.q(`DELETE FROM chats WHERE id IN `+in), ids...); err != nil {
		return 0, err
	}
	return len(ids), nil
}
