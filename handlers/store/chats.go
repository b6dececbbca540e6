package store

import (
	"cmp"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Chat statuses. A background chat is "queued" until a worker takes it,
// then "running"; a synchronous chat starts "running". A chat ends exactly
// once, in one of the three final statuses. A background chat handed back
// after a failed attempt is "queued" again.
const (
	ChatQueued    = "queued"
	ChatRunning   = "running"
	ChatCompleted = "completed"
	ChatFailed    = "failed"
	ChatCancelled = "cancelled"
)

// DefaultIdempotencyWindow is Chat.IdemWindow's default: how long an
// idempotency key names its chat.
const DefaultIdempotencyWindow = 24 * time.Hour

// Chat is one message sent to an agent: a new chat for StartChat.
type Chat struct {
	ID      string // generated if empty
	AgentID string
	Message string
	Origin  Origin // the worker that accepted the chat (and runs it unless Background)
	// RequestID, if set, is the id of the request that started the chat;
	// its first activity carries it as data.request_id, and a background
	// chat's job hands it to every attempt.
	RequestID string

	// Background queues the chat as a job that any worker may run instead
	// of running it in the caller.
	Background bool
	// QueueMax, if positive, refuses a Background chat with ErrQueueFull
	// when that many chats are already queued.
	QueueMax int
	// IdemKey, if set, names the chat for IdemWindow: a later StartChat
	// with the same key and IdemHash returns an error matching
	// ErrDuplicate (a *DuplicateError naming the first chat), one with
	// another IdemHash ErrKeyReused.
	IdemKey, IdemHash string
	// IdemWindow is how long an earlier chat's key counts, measured from
	// that chat's creation by the later StartChat (so it is the later
	// caller's window that applies). Default DefaultIdempotencyWindow.
	IdemWindow time.Duration
}

// ChatRow is a chat as stored.
type ChatRow struct {
	ID         string
	AgentID    string
	Message    string
	Status     string
	Background bool
	Attempts   int
	Worker     int    // the worker that runs or last ran it
	PID        int    // its process id
	Host       string // its instance (Options.Host)
	Created    time.Time
	Started    time.Time // zero until first run
	Finished   time.Time // zero until final
	Reply      string    // when completed
	// Detail is the JSON object of the finishing activity's data (usage,
	// provider, model; or reason, status, message), or of the last failed
	// attempt while a chat waits for a retry; empty otherwise.
	Detail string
	JobID  int64 // the River job of a background chat
}

// unanswered are the reasons a synchronous chat ends without its caller
// getting an answer: the client went away, or the process serving it did.
var unanswered = map[string]bool{
	"client_disconnected": true, "worker_died": true, "worker_stopping": true,
	"server_restarted": true, "instance_lost": true,
}

// Unanswered reports whether c is a synchronous chat that ended without
// its caller getting an answer. Its idempotency key is free: the caller's
// retry with it starts a new chat.
func (c ChatRow) Unanswered() bool {
	var d struct {
		Reason string `json:"reason"`
	}
	json.Unmarshal([]byte(c.Detail), &d) // no detail, no reason
	return !c.Background && Final(c.Status) && unanswered[d.Reason]
}

// Final reports whether status is one a chat ends in.
func Final(status string) bool {
	return status == ChatCompleted || status == ChatFailed || status == ChatCancelled
}

// StartChat stores c in one transaction with its first activity and
// returns that activity (its ChatID carries a generated id). A synchronous
// chat is "running" with a "chat.started" activity; a Background chat is
// "queued" with a "chat.queued" activity, and its River job is inserted in
// the same transaction, so there is never a chat without its job or a job
// without its chat. The agent must exist (ErrNotFound); a taken chat id is
// ErrExists; see Chat for ErrQueueFull, ErrDuplicate and ErrKeyReused.
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
	status, attempts, started := ChatRunning, 1, sql.NullString{String: timeArg(act.Time), Valid: true}
	if c.Background {
		act.Type, status, attempts, started = "chat.queued", ChatQueued, 0, sql.NullString{}
	}
	var idemKey, idemHash sql.NullString
	if c.IdemKey != "" {
		idemKey = sql.NullString{String: c.IdemKey, Valid: true}
		idemHash = sql.NullString{String: c.IdemHash, Valid: true}
	}
	insert := func(tx *sql.Tx) error {
		var one int
		err := s.queryRow(ctx, tx, `SELECT 1 FROM agents WHERE id = ?`, c.AgentID).Scan(&one)
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("agent %s: %w", c.AgentID, ErrNotFound)
		}
		if err != nil {
			return err
		}
		if c.IdemKey != "" {
			if err := s.checkIdemKeyTx(ctx, tx, c.IdemKey, c.IdemHash, act.Time, cmp.Or(c.IdemWindow, DefaultIdempotencyWindow)); err != nil {
				return err
			}
		}
		if c.Background && c.QueueMax > 0 {
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM chats WHERE status = 'queued'`).Scan(&n); err != nil {
				return err
			}
			if n >= c.QueueMax {
				return fmt.Errorf("%d chats queued: %w", n, ErrQueueFull)
			}
		}
		res, err := s.exec(ctx, tx, `INSERT INTO chats (id, agent_id, message, status, background, attempts,
	worker, pid, host, created_at, started_at, idem_key, idem_hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
			c.ID, c.AgentID, c.Message, status, c.Background, attempts,
			c.Origin.Worker, c.Origin.PID, s.host, timeArg(act.Time), started, idemKey, idemHash)
		if err != nil {
			return err
		}
		if n, err := res.RowsAffected(); err != nil {
			return err
		} else if n == 0 {
			return ErrExists
		}
		if c.Background {
			jobID, err := s.jobs.insertTx(ctx, tx, c.ID, c.RequestID)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, s.q(`UPDATE chats SET job_id = ? WHERE id = ?`), jobID, c.ID); err != nil {
				return err
			}
		}
		return s.insertActivity(ctx, tx, &act)
	}
	err := s.write(ctx, insert)
	if err != nil && c.IdemKey != "" && s.d.uniqueViolation != nil && s.d.uniqueViolation(err) {
		// Another host inserted the same key between our check and our
		// insert (PostgreSQL); now the check finds it.
		err = s.write(ctx, insert)
	}
	if err != nil {
		return Activity{}, s.wrap(ctx, "start chat "+c.ID, err)
	}
	s.feed.advance(act.ID)
	return act, nil
}

// checkIdemKeyTx returns a *DuplicateError or ErrKeyReused when key names a
// chat younger than window at t, and frees the key of an older chat or of
// a synchronous chat that ended unanswered.
func (s *Store) checkIdemKeyTx(ctx context.Context, tx *sql.Tx, key, hash string, t time.Time, window time.Duration) error {
	var c ChatRow
	var prevHash string
	var detail sql.NullString
	err := tx.QueryRowContext(ctx, s.q(`SELECT id, idem_hash, created_at, background, status, detail FROM chats WHERE idem_key = ?`), key).
		Scan(&c.ID, &prevHash, dbTime{&c.Created}, &c.Background, &c.Status, &detail)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	}
	if err != nil {
		return err
	}
	c.Detail = detail.String
	if t.Sub(c.Created) >= window || c.Unanswered() {
		_, err := tx.ExecContext(ctx, s.q(`UPDATE chats SET idem_key = NULL WHERE id = ?`), c.ID)
		return err
	}
	if prevHash != hash {
		return fmt.Errorf("chat %s: %w", c.ID, ErrKeyReused)
	}
	return &DuplicateError{ChatID: c.ID}
}

// DuplicateError reports that an idempotency key already names a chat.
// errors.Is(err, ErrDuplicate) is true for it.
type DuplicateError struct{ ChatID string }

func (e *DuplicateError) Error() string        { return "store: idempotency key names chat " + e.ChatID }
func (e *DuplicateError) Is(target error) bool { return target == ErrDuplicate }

const chatColumns = `id, agent_id, message, status, background, attempts, worker, pid, host,
	created_at, started_at, finished_at, reply, detail, job_id`

func scanChat(sc interface{ Scan(...any) error }) (ChatRow, error) {
	var c ChatRow
	var reply, detail sql.NullString
	var job sql.NullInt64
	err := sc.Scan(&c.ID, &c.AgentID, &c.Message, &c.Status, &c.Background, &c.Attempts, &c.Worker, &c.PID, &c.Host,
		dbTime{&c.Created}, dbTime{&c.Started}, dbTime{&c.Finished}, &reply, &detail, &job)
	c.Reply, c.Detail, c.JobID = reply.String, detail.String, job.Int64
	return c, err
}

// ChatByID returns the chat with id, or an error matching ErrNotFound.
func (s *Store) ChatByID(ctx context.Context, id string) (ChatRow, error) {
	c, err := scanChat(s.queryRow(ctx, nil, `SELECT `+chatColumns+` FROM chats WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return ChatRow{}, fmt.Errorf("chat %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return ChatRow{}, s.wrap(ctx, "read chat "+id, err)
	}
	return c, nil
}

// Outcome is how a chat ended, for EndChat.
type Outcome struct {
	Status string         // ChatCompleted, ChatFailed or ChatCancelled
	Data   map[string]any // the activity's data, also kept as the chat's Detail
	Reply  string         // when completed
	// Attempt, if positive, ends the chat only if this is still its
	// current attempt and it is running: a background attempt handed back
	// meanwhile finishes nothing (ErrChatFinished).
	Attempt int
}

// FinishChat is EndChat without a reply or attempt.
func (s *Store) FinishChat(ctx context.Context, chatID, status string, data map[string]any) (Activity, error) {
	return s.EndChat(ctx, chatID, Outcome{Status: status, Data: data})
}

// EndChat moves a running chat (or, to cancel it, a queued one) to o.Status
// and writes a "chat."+status activity carrying o.Data, in one transaction,
// and returns the activity. The activity's worker and pid are the chat's. A
// chat finishes exactly once: a second EndChat returns ErrChatFinished and
// writes nothing; an unknown chat is ErrNotFound.
func (s *Store) EndChat(ctx context.Context, chatID string, o Outcome) (Activity, error) {
	op := "finish chat " + chatID
	switch o.Status {
	case ChatCompleted, ChatFailed, ChatCancelled:
	default:
		return Activity{}, fmt.Errorf("%s: status %q, want %s, %s or %s", op, o.Status, ChatCompleted, ChatFailed, ChatCancelled)
	}
	detail, err := encodeData(o.Data)
	if err != nil {
		return Activity{}, fmt.Errorf("%s: %w", op, err)
	}
	var reply sql.NullString
	if o.Status == ChatCompleted {
		reply = sql.NullString{String: o.Reply, Valid: true}
	}
	act := Activity{Time: now(), Type: "chat." + o.Status, ChatID: chatID, Data: o.Data}
	var jobID sql.NullInt64
	err = s.write(ctx, func(tx *sql.Tx) error {
		query := `UPDATE chats SET status = ?, finished_at = ?, reply = ?, detail = ?
WHERE id = ? AND (status = 'running'`
		args := []any{o.Status, timeArg(act.Time), reply, detail, chatID}
		if o.Status == ChatCancelled {
			query += ` OR status = 'queued'`
		}
		query += `)`
		if o.Attempt > 0 {
			query += ` AND attempts = ?`
			args = append(args, o.Attempt)
		}
		query += ` RETURNING agent_id, worker, pid, job_id`
		err := s.queryRow(ctx, tx, query, args...).Scan(&act.AgentID, &act.Worker, &act.PID, &jobID)
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
		if o.Status == ChatCancelled && jobID.Valid && o.Attempt == 0 {
			// Cancelled from outside the job: River must not run or retry
			// it. (A job that ends its own chat returns, and River
			// completes it.)
			if err := s.jobs.cancelTx(ctx, tx, jobID.Int64); err != nil {
				return err
			}
		}
		return s.insertActivity(ctx, tx, &act)
	})
	if err != nil {
		return Activity{}, s.wrap(ctx, op, err)
	}
	s.feed.advance(act.ID)
	return act, nil
}

// FailOrphanedChats fails every synchronous chat still running in process
// pid on this Options.Host, each with a "chat.failed" activity whose data
// is {"reason": reason}, and returns how many. The supervisor calls it when
// a worker dies (and logs the count), so no chat stays running forever.
// (Background chats are handed back instead: see HandBackChats.)
func (s *Store) FailOrphanedChats(ctx context.Context, pid int, reason string) (int, error) {
	n, err := s.failStarted(ctx, reason, `pid = ?`, pid)
	if err != nil {
		return 0, s.wrap(ctx, fmt.Sprintf("fail chats of pid %d", pid), err)
	}
	return n, nil
}

// FailAllStarted fails every synchronous chat still running on this
// Options.Host, as FailOrphanedChats does, and returns how many. The
// supervisor calls it at start, before workers run: such chats were left by
// a previous run.
func (s *Store) FailAllStarted(ctx context.Context, reason string) (int, error) {
	n, err := s.failStarted(ctx, reason, "")
	if err != nil {
		return 0, s.wrap(ctx, "fail started chats", err)
	}
	return n, nil
}

// failStarted fails this host's running synchronous chats matching the
// optional extra condition cond (with args) in one transaction.
func (s *Store) failStarted(ctx context.Context, reason, cond string, args ...any) (int, error) {
	type orphan struct {
		act     Activity
		started time.Time // created_at
	}
	var found []orphan
	err := s.write(ctx, func(tx *sql.Tx) error {
		found = found[:0]
		t := now()
		detail, _ := encodeData(map[string]any{"reason": reason})
		// The literal 'running' lets the planner use the partial index
		// chats_running; a bound parameter would not.
		query := `UPDATE chats SET status = ?, finished_at = ?, detail = ? WHERE host = ? AND status = 'running' AND NOT background`
		if cond != "" {
			query += " AND " + cond
		}
		query += " RETURNING id, agent_id, worker, pid, created_at"
		rows, err := tx.QueryContext(ctx, s.q(query), append([]any{ChatFailed, timeArg(t), detail, s.host}, args...)...)
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
