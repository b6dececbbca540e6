package store

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Chat statuses. A chat is "started" until it finishes exactly once.
const (
	ChatStarted   = "started"
	ChatCompleted = "completed"
	ChatFailed    = "failed"
	ChatCancelled = "cancelled"
)

// Chat is one message sent to an agent, run by one worker process.
type Chat struct {
	ID      string // generated if empty
	AgentID string
	Message string
	Origin  Origin // the worker running the chat
	// RequestID, if set, is the id of the request that started the chat;
	// the chat.started activity carries it as data.request_id.
	RequestID string
}

// StartChat stores c with status "started" and a "chat.started" activity in
// one transaction and returns the activity (its ChatID carries a generated
// id). The agent must exist (ErrNotFound); a taken chat id is ErrExists.
func (s *Store) StartChat(ctx context.Context, c Chat) (Activity, error) {
	if c.ID == "" {
		c.ID = newID()
	}
	act := Activity{
		Time: now(), Type: "chat.started", AgentID: c.AgentID, ChatID: c.ID,
		Worker: c.Origin.Worker, PID: c.Origin.PID,
	}
	if c.RequestID != "" {
		act.Data = map[string]any{"request_id": c.RequestID}
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		var one int
		err := tx.QueryRowContext(ctx, s.q(`SELECT 1 FROM agents WHERE id = ?`), c.AgentID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("agent %s: %w", c.AgentID, ErrNotFound)
		}
		if err != nil {
			return err
		}
		res, err := tx.ExecContext(ctx, s.q(`INSERT INTO chats (id, agent_id, message, status, worker, pid, host, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`),
			c.ID, c.AgentID, c.Message, ChatStarted, c.Origin.Worker, c.Origin.PID, s.host, timeArg(act.Time))
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return ErrExists
		}
		return s.insertActivity(ctx, tx, &act)
	})
	if err != nil {
		return Activity{}, s.wrap(ctx, "start chat "+c.ID, err)
	}
	s.feed.advance(act.ID)
	return act, nil
}

// FinishChat moves a started chat to status ("completed", "failed" or
// "cancelled") and writes a "chat."+status activity carrying data, in one
// transaction, and returns the activity. The activity's worker and pid are
// the chat's. A chat finishes exactly once: a second FinishChat returns
// ErrChatFinished and writes nothing; an unknown chat is ErrNotFound.
func (s *Store) FinishChat(ctx context.Context, chatID, status string, data map[string]any) (Activity, error) {
	op := "finish chat " + chatID
	switch status {
	case ChatCompleted, ChatFailed, ChatCancelled:
	default:
		return Activity{}, fmt.Errorf("%s: status %q, want %s, %s or %s", op, status, ChatCompleted, ChatFailed, ChatCancelled)
	}
	act := Activity{Time: now(), Type: "chat." + status, ChatID: chatID, Data: data}
	err := s.write(ctx, func(tx *sql.Tx) error {
		err := tx.QueryRowContext(ctx, s.q(`UPDATE chats SET status = ?, finished_at = ?
WHERE id = ? AND status = ? RETURNING agent_id, worker, pid`),
			status, timeArg(act.Time), chatID, ChatStarted).Scan(&act.AgentID, &act.Worker, &act.PID)
		if errors.Is(err, sql.ErrNoRows) {
			var cur string
			err = tx.QueryRowContext(ctx, s.q(`SELECT status FROM chats WHERE id = ?`), chatID).Scan(&cur)
			if errors.Is(err, sql.ErrNoRows) {
				return ErrNotFound
			}
			if err != nil {
				return err
			}
			return fmt.Errorf("status %s: %w", cur, ErrChatFinished)
		}
		if err != nil {
			return err
		}
		return s.insertActivity(ctx, tx, &act)
	})
	if err != nil {
		return Activity{}, s.wrap(ctx, op, err)
	}
	s.feed.advance(act.ID)
	return act, nil
}

// FailOrphanedChats fails every chat still "started" by process pid on this
// Options.Host, each with a "chat.failed" activity whose data is
// {"reason": reason}, and returns how many. The supervisor calls it when a
// worker dies, so no chat stays "started" forever.
func (s *Store) FailOrphanedChats(ctx context.Context, pid int, reason string) (int, error) {
	n, err := s.failStarted(ctx, reason, `pid = ?`, pid)
	if err != nil {
		return 0, s.wrap(ctx, fmt.Sprintf("fail chats of pid %d", pid), err)
	}
	if n > 0 {
		s.log.Info().Int("pid", pid).Int("chats", n).Str("reason", reason).Msg("orphaned chats failed")
	}
	return n, nil
}

// FailAllStarted fails every chat still "started" on this Options.Host, as
// FailOrphanedChats does, and returns how many. The supervisor calls it at
// start, before workers run: such chats were left by a previous run.
func (s *Store) FailAllStarted(ctx context.Context, reason string) (int, error) {
	n, err := s.failStarted(ctx, reason, "")
	if err != nil {
		return 0, s.wrap(ctx, "fail started chats", err)
	}
	if n > 0 {
		s.log.Info().Int("chats", n).Str("reason", reason).Msg("chats of a previous run failed")
	}
	return n, nil
}

// failStarted fails this host's started chats matching the optional extra
// condition cond (with args) in one transaction.
func (s *Store) failStarted(ctx context.Context, reason, cond string, args ...any) (int, error) {
	type orphan struct {
		act     Activity
		started time.Time // created_at
	}
	var found []orphan
	err := s.write(ctx, func(tx *sql.Tx) error {
		found = found[:0]
		t := now()
		// The literal 'started' lets the planner use the partial index
		// chats_started; a bound parameter would not.
		query := `UPDATE chats SET status = ?, finished_at = ? WHERE host = ? AND status = 'started'`
		if cond != "" {
			query += " AND " + cond
		}
		query += " RETURNING id, agent_id, worker, pid, created_at"
		rows, err := tx.QueryContext(ctx, s.q(query), append([]any{ChatFailed, timeArg(t), s.host}, args...)...)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			o := orphan{act: Activity{Time: t, Type: "chat." + ChatFailed, Data: map[string]any{"reason": reason}}}
			if err := rows.Scan(&o.act.ChatID, &o.act.AgentID, &o.act.Worker, &o.act.PID, dbTime{&o.started}); err != nil {
				return err
			}
			found = append(found, o)
		}
		if err := rows.Err(); err != nil {
			return err
		}
		rows.Close()
		// RETURNING order is unspecified; the feed lists the oldest chat first.
		slices.SortFunc(found, func(a, b orphan) int {
			return cmp.Or(a.started.Compare(b.started), strings.Compare(a.act.ChatID, b.act.ChatID))
		})
		for i := range found {
			if err := s.insertActivity(ctx, tx, &found[i].act); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	if len(found) > 0 {
		s.feed.advance(found[len(found)-1].act.ID)
	}
	return len(found), nil
}
