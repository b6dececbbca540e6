package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/riverqueue/river"
	"github.com/riverqueue/river/riverdriver"
	"github.com/riverqueue/river/riverdriver/riverdatabasesql"
	"github.com/riverqueue/river/riverdriver/riverpgxv5"
	"github.com/riverqueue/river/riverdriver/riversqlite"
	"github.com/riverqueue/river/rivermigrate"
	"github.com/riverqueue/river/rivertype"
	"github.com/rs/zerolog"
)

// This file wires background chats to River (github.com/riverqueue/river),
// the job queue: its tables live in the same database, a chat's job is
// inserted in the chat's own transaction (StartChat), and RunChats starts
// the River client of a worker process that runs them.
//
// Every Store has an insert-only client over its database/sql pool
// (riversqlite on SQLite, riverdatabasesql on PostgreSQL), so that InsertTx,
// JobCancelTx and the rescue below take the store's *sql.Tx. RunChats
// starts a second, working client: riversqlite again on SQLite (polling),
// riverpgxv5 on PostgreSQL (LISTEN/NOTIFY) over a pool of its own.

// chatQueue is the River queue of background chats.
const chatQueue = "corral_chats"

// DefaultChatConcurrency is RunConfig.Concurrency's default.
const DefaultChatConcurrency = 256

// DefaultChatPoll is RunConfig.PollInterval's default.
const DefaultChatPoll = 250 * time.Millisecond

// chatArgs is a background chat's River job: only the chat id; the chat
// row holds the rest.
type chatArgs struct {
	ChatID string `json:"chat_id"`
	// RequestID is the id of the request that queued the chat, which every
	// attempt sends upstream and records in its activities.
	RequestID string `json:"request_id,omitempty"`
}

func (chatArgs) Kind() string { return "corral_chat" }

// jobs is a Store's River client for inserts and cancellations: an
// insert-only one, until RunChats on SQLite replaces it with the running
// client.
type jobs struct {
	driver riverdriver.Driver[*sql.Tx]
	cur    atomic.Pointer[river.Client[*sql.Tx]]
}

func (j *jobs) client() *river.Client[*sql.Tx] { return j.cur.Load() }

func newJobs(db *sql.DB, postgres bool, log zerolog.Logger) (*jobs, error) {
	var d riverdriver.Driver[*sql.Tx]
	if postgres {
		d = riverdatabasesql.New(db)
	} else {
		d = riversqlite.New(db)
	}
	c, err := river.NewClient(d, &river.Config{Logger: riverLogger(log)})
	if err != nil {
		return nil, fmt.Errorf("river client: %w", err)
	}
	j := &jobs{driver: d}
	j.cur.Store(c)
	return j, nil
}

// migrate brings River's own tables up to date. River's migrations add
// PostgreSQL enum values and must commit them before using them, so they
// run in transactions of their own, after the store's. On PostgreSQL the
// migrate lock (see migrateLockKey) is held meanwhile on a connection of
// its own, outside the pool (closing it releases the lock), so that hosts
// starting together migrate one after the other; on SQLite a concurrent
// Migrate of another process can only collide on a version both tried to
// apply, and one more pass finds it done.
func (j *jobs) migrate(ctx context.Context, db *sql.DB, lockConn *pgx.ConnConfig, log zerolog.Logger) error {
	postgres := lockConn != nil
	if postgres {
		// Not a pooled connection: the migrator needs the pool, which may
		// be a single connection (--database-max-conns 1).
		conn, err := pgx.ConnectConfig(ctx, lockConn)
		if err != nil {
			return err
		}
		defer closeListenConn(conn)
		if _, err := conn.Exec(ctx, fmt.Sprintf(`SELECT pg_advisory_lock(%d)`, migrateLockKey)); err != nil {
			return err
		}
	}
	m, err := rivermigrate.New(j.driver, &rivermigrate.Config{Logger: riverLogger(log)})
	if err != nil {
		return fmt.Errorf("river migrate: %w", err)
	}
	if _, err = m.Migrate(ctx, rivermigrate.DirectionUp, nil); err != nil && !postgres {
		_, err = m.Migrate(ctx, rivermigrate.DirectionUp, nil)
	}
	if err != nil {
		return fmt.Errorf("river migrate: %w", err)
	}
	return nil
}

func (j *jobs) insertTx(ctx context.Context, tx *sql.Tx, chatID, requestID string) (int64, error) {
	res, err := j.client().InsertTx(ctx, tx, chatArgs{ChatID: chatID, RequestID: requestID}, &river.InsertOpts{Queue: chatQueue})
	if err != nil {
		return 0, fmt.Errorf("insert job: %w", err)
	}
	return res.Job.ID, nil
}

func (j *jobs) cancelTx(ctx context.Context, tx *sql.Tx, jobID int64) error {
	_, err := j.client().JobCancelTx(ctx, tx, jobID)
	if err != nil && !errors.Is(err, rivertype.ErrNotFound) {
		return fmt.Errorf("cancel job %d: %w", jobID, err)
	}
	return nil
}

// rescue is one running job rescueTx ends or makes available again.
type rescue struct {
	id    int64
	state rivertype.JobState
	at    time.Time // when it may run again; zero for now
}

// rescueTx makes running jobs available again (state "available", at
// their time or at once) or ends them (state "discarded"), with River's
// own rescue query: the one its rescuer runs on jobs stuck past
// RescueStuckJobsAfter. Corral calls it as soon as it knows the process
// running them is dead.
func (j *jobs) rescueTx(ctx context.Context, tx *sql.Tx, jobs []rescue, reason string) error {
	if len(jobs) == 0 {
		return nil
	}
	t := time.Now().UTC()
	p := &riverdriver.JobRescueManyParams{StuckHorizon: t.Add(time.Minute)}
	for _, r := range jobs {
		p.ID = append(p.ID, r.id)
		p.Error = append(p.Error, []byte(fmt.Sprintf(`{"at":%q,"attempt":0,"error":%q}`, t.Format(time.RFC3339Nano), reason)))
		at := t
		if r.at.After(t) {
			at = r.at.UTC()
		}
		p.ScheduledAt = append(p.ScheduledAt, at)
		p.State = append(p.State, string(r.state))
		if r.state == rivertype.JobStateDiscarded {
			p.FinalizedAt = append(p.FinalizedAt, &t)
		} else {
			p.FinalizedAt = append(p.FinalizedAt, nil)
		}
	}
	if _, err := j.driver.UnwrapExecutor(tx).JobRescueMany(ctx, p); err != nil {
		return fmt.Errorf("rescue jobs: %w", err)
	}
	return nil
}

// RunConfig configures RunChats.
type RunConfig struct {
	// Run runs one attempt of the background chat chatID, queued by the
	// request requestID (empty if unknown); ctx ends when the runner
	// stops. Its error, if any, makes River retry the job with its own
	// backoff, except one made by RetryIn.
	Run func(ctx context.Context, chatID, requestID string) error
	// Concurrency caps the chats this process runs at once. Default
	// DefaultChatConcurrency.
	Concurrency int
	// PollInterval is how often the runner looks for new jobs without a
	// notification. On SQLite, where River runs poll-only, every runner
	// finds a new chat within a poll (each look is a write transaction);
	// on PostgreSQL an insert wakes them at once. Default DefaultChatPoll.
	PollInterval time.Duration
	// RescueAfter is River's RescueStuckJobsAfter: the time after which a
	// job still running is taken back even though no death was reported
	// (a host that vanished). It must exceed the longest chat. Default
	// one hour.
	RescueAfter time.Duration
	// Logger receives River's warnings and errors.
	Logger zerolog.Logger
}

// retryError asks the runner to run the job again after a pause without
// counting a River attempt (the chat counts its own).
type retryError struct{ after time.Duration }

func (e *retryError) Error() string { return "retry in " + e.after.String() }

// JobCancelled reports whether ctx, a Run context, ended because the
// chat's job was cancelled (EndChat with ChatCancelled, from any process):
// on PostgreSQL River tells the runner too, by notification.
func JobCancelled(ctx context.Context) bool {
	return errors.Is(context.Cause(ctx), rivertype.ErrJobCancelledRemotely)
}

// RetryIn returns the error Run returns to have its job run again after d
// (0: at once, even on the next start after a shutdown).
func RetryIn(d time.Duration) error { return &retryError{after: max(d, 0)} }

type chatWorker struct {
	river.WorkerDefaults[chatArgs]
	run func(ctx context.Context, chatID, requestID string) error
}

func (w *chatWorker) Work(ctx context.Context, job *river.Job[chatArgs]) error {
	err := w.run(ctx, job.Args.ChatID, job.Args.RequestID)
	if r, ok := errors.AsType[*retryError](err); ok {
		return river.JobSnooze(r.after)
	}
	return err
}

// Timeout is none: a chat's LLM call has its own deadline.
func (w *chatWorker) Timeout(*river.Job[chatArgs]) time.Duration { return -1 }

// ChatRunner is a started River client running background chats in this
// process. Stop it before closing the Store.
type ChatRunner struct {
	stop, stopAndCancel func(context.Context) error
	pool                *pgxpool.Pool // PostgreSQL: the runner's own pool
	restore             func()        // SQLite: give inserts back to the insert-only client
	once                sync.Once
	err                 error
}

// RunChats starts running this Store's background chats, at most
// cfg.Concurrency at a time, until Stop.
func (s *Store) RunChats(ctx context.Context, cfg RunConfig) (*ChatRunner, error) {
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = DefaultChatConcurrency
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultChatPoll
	}
	workers := river.NewWorkers()
	river.AddWorker(workers, &chatWorker{run: cfg.Run})
	host, _ := os.Hostname()
	rc := &river.Config{
		ID:                   fmt.Sprintf("%s_%s_%d_%d", s.host, host, os.Getpid(), time.Now().UnixMilli()),
		Logger:               riverLogger(cfg.Logger),
		Queues:               map[string]river.QueueConfig{chatQueue: {MaxWorkers: cfg.Concurrency}},
		Workers:              workers,
		FetchPollInterval:    cfg.PollInterval,
		FetchCooldown:        min(cfg.PollInterval, 20*time.Millisecond),
		JobTimeout:           -1,
		RescueStuckJobsAfter: cfg.RescueAfter,
		// On SQLite River's notifier reads an outbox table every 50 ms
		// in every worker, for wake-ups Corral does without: cancellations
		// arrive through the activity feed, and a new chat waits at most
		// PollInterval for a fetch. It was a third of an idle server's
		// CPU (docs/benchmarks.md).
		PollOnly: s.pg == nil,
	}
	r := &ChatRunner{}
	if s.pg != nil {
		pool, err := pgxpool.NewWithConfig(ctx, s.pg.poolConfig.Copy())
		if err != nil {
			return nil, s.wrap(ctx, "start chat runner", err)
		}
		c, err := river.NewClient[pgx.Tx](riverpgxv5.New(pool), rc)
		if err != nil {
			pool.Close()
			return nil, fmt.Errorf("start chat runner: %w", err)
		}
		if err := c.Start(ctx); err != nil {
			pool.Close()
			return nil, s.wrap(ctx, "start chat runner", err)
		}
		r.stop, r.stopAndCancel, r.pool = c.Stop, c.StopAndCancel, pool
		return r, nil
	}
	c, err := river.NewClient(riversqlite.New(s.db), rc)
	if err != nil {
		return nil, fmt.Errorf("start chat runner: %w", err)
	}
	if err := c.Start(ctx); err != nil {
		return nil, s.wrap(ctx, "start chat runner", err)
	}
	r.stop, r.stopAndCancel = c.Stop, c.StopAndCancel
	insertOnly := s.jobs.cur.Swap(c)
	r.restore = func() { s.jobs.cur.CompareAndSwap(c, insertOnly) }
	return r, nil
}

// Stop takes no new chats, waits until ctx ends for the running ones to
// return, then cancels the contexts of those still running and waits for
// them to return (Run should then hand its chat back with RetryIn(0)).
// Calls after the first return the first result.
func (r *ChatRunner) Stop(ctx context.Context) error {
	r.once.Do(func() {
		if r.restore != nil {
			r.restore()
		}
		err := r.stop(ctx)
		if ctx.Err() != nil {
			cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			err = r.stopAndCancel(cctx)
			cancel()
		}
		if r.pool != nil {
			r.pool.Close()
		}
		if err != nil {
			r.err = fmt.Errorf("stop chat runner: %w", err)
		}
	})
	return r.err
}

// riverLogger passes River's warnings and errors to log.
func riverLogger(log zerolog.Logger) *slog.Logger {
	return slog.New(&slogBridge{log: log})
}

type slogBridge struct {
	log   zerolog.Logger
	attrs []slog.Attr
}

func (b *slogBridge) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }

func (b *slogBridge) Handle(_ context.Context, r slog.Record) error {
	ev := b.log.Warn()
	if r.Level >= slog.LevelError {
		ev = b.log.Error()
	}
	ev = ev.Str("component", "river")
	add := func(a slog.Attr) bool {
		ev = ev.Str(a.Key, a.Value.String())
		return true
	}
	for _, a := range b.attrs {
		add(a)
	}
	r.Attrs(add)
	ev.Msg(r.Message)
	return nil
}

func (b *slogBridge) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &slogBridge{log: b.log, attrs: append(append([]slog.Attr{}, b.attrs...), attrs...)}
}

func (b *slogBridge) WithGroup(string) slog.Handler { return b }

// Background chat attempts.

// BeginAttempt marks the queued background chat chatID as running in
// process by, counts the attempt and returns the chat. The first attempt
// writes a "chat.started" activity. A chat that is no longer queued (it was
// cancelled meanwhile, or finished) is an error matching ErrChatFinished.
func (s *Store) BeginAttempt(ctx context.Context, chatID string, by Origin) (ChatRow, error) {
	var c ChatRow
	var act *Activity
	err := s.write(ctx, func(tx *sql.Tx) error {
		t := now()
		var err error
		// "running" too: River's own rescuer (RunConfig.RescueAfter) hands
		// back a job whose process vanished without a reported death.
		c, err = scanChat(tx.QueryRowContext(ctx, s.q(`UPDATE chats SET status = 'running', attempts = attempts + 1,
	worker = ?, pid = ?, host = ?, started_at = COALESCE(started_at, ?)
WHERE id = ? AND background AND status IN ('queued', 'running') RETURNING `+chatColumns),
			by.Worker, by.PID, s.host, timeArg(t), chatID))
		if errors.Is(err, sql.ErrNoRows) {
			var cur string
			if err := tx.QueryRowContext(ctx, s.q(`SELECT status FROM chats WHERE id = ?`), chatID).Scan(&cur); err != nil {
				if errors.Is(err, sql.ErrNoRows) {
					return ErrNotFound
				}
				return err
			}
			return fmt.Errorf("status %s: %w", cur, ErrChatFinished)
		}
		if err != nil {
			return err
		}
		if c.Attempts == 1 {
			act = &Activity{Time: t, Type: "chat.started", AgentID: c.AgentID, ChatID: c.ID, Worker: by.Worker, PID: by.PID}
			return s.insertActivity(ctx, tx, act)
		}
		return nil
	})
	if err != nil {
		return ChatRow{}, s.wrap(ctx, "begin chat "+chatID, err)
	}
	if act != nil {
		s.feed.advance(act.ID)
	}
	return c, nil
}

// Requeue says how RequeueChat hands a chat back.
type Requeue struct {
	Reason string         // the activity's data "reason"
	Data   map[string]any // more data for the activity and the chat's Detail
	// Uncounted gives the attempt back (a shutdown is not the chat's
	// fault): it does not count towards MaxAttempts.
	Uncounted bool
	// MaxAttempts, if positive, fails the chat instead once it has had
	// that many attempts.
	MaxAttempts int
	// After is the wait before the next attempt (the caller's RetryIn).
	// It is kept as "retry_at" in the activity and the chat's Detail, so
	// that a job rescued after its process died still waits for it.
	After time.Duration
}

// RequeueChat hands attempt number attempt of the running background chat
// chatID back to the queue with a "chat.retried" activity and reports true;
// or, past r.MaxAttempts, fails it with a "chat.failed" activity and
// reports false. The caller's job then returns RetryIn (or nothing). A chat
// no longer in that attempt is ErrChatFinished.
func (s *Store) RequeueChat(ctx context.Context, chatID string, attempt int, r Requeue) (bool, error) {
	data := map[string]any{"reason": r.Reason, "attempt": attempt}
	for k, v := range r.Data {
		data[k] = v
	}
	fails := !r.Uncounted && r.MaxAttempts > 0 && attempt >= r.MaxAttempts
	if r.After > 0 && !fails {
		data["retry_at"] = now().Add(r.After).UTC().Format(time.RFC3339Nano)
	}
	detail, err := encodeData(data)
	if err != nil {
		return false, err
	}
	var act Activity
	err = s.write(ctx, func(tx *sql.Tx) error {
		t := now()
		act = Activity{Time: t, ChatID: chatID, Data: data, Type: "chat.retried"}
		query := `UPDATE chats SET status = 'queued', detail = ?, attempts = attempts - ? WHERE id = ? AND status = 'running' AND attempts = ?`
		args := []any{detail, 0, chatID, attempt}
		switch {
		case r.Uncounted:
			args[1] = 1
		case fails:
			query = `UPDATE chats SET status = 'failed', detail = ?, finished_at = ? WHERE id = ? AND status = 'running' AND attempts = ?`
			args[1] = timeArg(t)
			act.Type = "chat.failed"
		}
		err := tx.QueryRowContext(ctx, s.q(query+` RETURNING agent_id, worker, pid`), args...).Scan(&act.AgentID, &act.Worker, &act.PID)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrChatFinished
		}
		if err != nil {
			return err
		}
		return s.insertActivity(ctx, tx, &act)
	})
	if err != nil {
		return false, s.wrap(ctx, "requeue chat "+chatID, err)
	}
	s.feed.advance(act.ID)
	return !fails, nil
}

// HandBackChats hands back the background chats that process pid on this
// Options.Host was running (every process of this host if pid is 0): each
// goes back to the queue with a "chat.retried" activity and its job is
// available again at once, or, once it has had maxAttempts attempts, fails
// with a "chat.failed" activity. The data of both is {"reason": reason,
// "attempt": n}. It returns how many chats it requeued and failed. The
// supervisor calls it when a worker dies and at start.
func (s *Store) HandBackChats(ctx context.Context, pid int, reason string, maxAttempts int) (requeued, failed int, err error) {
	return s.handBack(ctx, s.host, pid, reason, maxAttempts)
}

// lostGrace is how long an instance must be seen without its claim before
// HandBackLostHosts hands its chats back: longer than a claim whose
// connection broke takes to come back (claimCheckEvery after the database
// answers again), so that a moment's loss of the connection does not run
// that instance's chats a second time.
func lostGrace() time.Duration { return 2 * claimCheckEvery }

// HandBackLostHosts hands back, as HandBackChats does with reason
// "instance_lost", the running background chats of every other instance
// (--instance-id) whose claim on the database (ClaimInstance) has been
// gone in every call for at least lostGrace (10 s): its server died with
// its master, or lost the database for good. PostgreSQL only; on SQLite,
// one machine, the next start of that instance does it. The masters of a
// deployment call it every few seconds; each Store keeps its own record of
// when it first found an instance lost. An instance cut from the database
// for longer than lostGrace while its worker still reaches the LLM has its
// chats run twice: the first attempt's outcome is then discarded (EndChat
// with Outcome.Attempt), but its LLM call runs to its end.
func (s *Store) HandBackLostHosts(ctx context.Context, maxAttempts int) (int, error) {
	if s.pg == nil {
		return 0, nil
	}
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT DISTINCT host FROM chats
WHERE status = 'running' AND background AND host <> ? AND NOT EXISTS (
	SELECT 1 FROM pg_locks l WHERE `+instanceLockHeld("chats.host")+`)`), s.host)
	if err != nil {
		return 0, s.wrap(ctx, "find lost instances", err)
	}
	var hosts []string
	for rows.Next() {
		var h string
		if err := rows.Scan(&h); err != nil {
			rows.Close()
			return 0, s.wrap(ctx, "find lost instances", err)
		}
		hosts = append(hosts, h)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, s.wrap(ctx, "find lost instances", err)
	}
	// Only instances lost in every call since lostGrace ago.
	t := time.Now()
	s.lostMu.Lock()
	seen := make(map[string]time.Time, len(hosts))
	due := hosts[:0]
	for _, h := range hosts {
		first, ok := s.lost[h]
		if !ok {
			first = t
		}
		seen[h] = first
		if t.Sub(first) >= lostGrace() {
			due = append(due, h)
		}
	}
	s.lost = seen
	s.lostMu.Unlock()
	total := 0
	for _, h := range due {
		r, f, err := s.handBack(ctx, h, 0, "instance_lost", maxAttempts)
		if err != nil {
			return total, err
		}
		total += r + f
	}
	return total, nil
}

func (s *Store) handBack(ctx context.Context, host string, pid int, reason string, maxAttempts int) (requeued, failed int, err error) {
	var acts []Activity
	err = s.write(ctx, func(tx *sql.Tx) error {
		acts, requeued, failed = acts[:0], 0, 0
		query := `SELECT id, agent_id, worker, pid, attempts, job_id FROM chats WHERE host = ? AND status = 'running' AND background`
		args := []any{host}
		if pid != 0 {
			query += ` AND pid = ?`
			args = append(args, pid)
		}
		rows, err := tx.QueryContext(ctx, s.q(query+` ORDER BY created_at, id`), args...)
		if err != nil {
			return err
		}
		type orphan struct {
			act      Activity
			attempts int
			job      sql.NullInt64
		}
		var found []orphan
		for rows.Next() {
			var o orphan
			if err := rows.Scan(&o.act.ChatID, &o.act.AgentID, &o.act.Worker, &o.act.PID, &o.attempts, &o.job); err != nil {
				rows.Close()
				return err
			}
			found = append(found, o)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return err
		}
		t := now()
		var rescued []rescue
		for _, o := range found {
			o.act.Time = t
			o.act.Data = map[string]any{"reason": reason, "attempt": o.attempts}
			detail, _ := encodeData(o.act.Data)
			state := rivertype.JobStateAvailable
			// The status and host in the WHERE: another master may hand the
			// same lost host back at the same time (PostgreSQL), and only
			// one of them may requeue a chat and rescue its job.
			var res sql.Result
			if maxAttempts > 0 && o.attempts >= maxAttempts {
				o.act.Type, state = "chat.failed", rivertype.JobStateDiscarded
				res, err = tx.ExecContext(ctx, s.q(`UPDATE chats SET status = 'failed', finished_at = ?, detail = ? WHERE id = ? AND status = 'running' AND host = ?`), timeArg(t), detail, o.act.ChatID, host)
			} else {
				o.act.Type = "chat.retried"
				res, err = tx.ExecContext(ctx, s.q(`UPDATE chats SET status = 'queued', detail = ? WHERE id = ? AND status = 'running' AND host = ?`), detail, o.act.ChatID, host)
			}
			if err != nil {
				return err
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n == 0 {
				continue // handed back by another master meanwhile
			}
			if state == rivertype.JobStateDiscarded {
				failed++
			} else {
				requeued++
			}
			if o.job.Valid {
				rescued = append(rescued, rescue{id: o.job.Int64, state: state})
			}
			acts = append(acts, o.act)
		}
		// A chat the process had already put back in the queue (it was
		// stopping, or its LLM call failed) whose job River had not yet
		// been told about when the process died: its job is still
		// "running" and would wait for River's rescuer. It runs again at
		// the time the process gave it (an upstream's Retry-After).
		orphanQuery := `SELECT c.job_id, c.detail FROM chats c JOIN river_job j ON j.id = c.job_id
WHERE c.host = ? AND c.status = 'queued' AND c.background AND j.state = 'running'`
		if pid != 0 {
			orphanQuery += ` AND c.pid = ?`
		}
		jrows, err := tx.QueryContext(ctx, s.q(orphanQuery), args...)
		if err != nil {
			return err
		}
		for jrows.Next() {
			r := rescue{state: rivertype.JobStateAvailable}
			var detail sql.NullString
			if err := jrows.Scan(&r.id, &detail); err != nil {
				jrows.Close()
				return err
			}
			var d struct {
				RetryAt time.Time `json:"retry_at"`
			}
			if json.Unmarshal([]byte(detail.String), &d) == nil {
				r.at = d.RetryAt
			}
			rescued = append(rescued, r)
		}
		jrows.Close()
		if err := jrows.Err(); err != nil {
			return err
		}
		if err := s.jobs.rescueTx(ctx, tx, rescued, reason); err != nil {
			return err
		}
		for i := range acts {
			if err := s.insertActivity(ctx, tx, &acts[i]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, 0, s.wrap(ctx, "hand back chats of "+host+" pid "+strconv.Itoa(pid), err)
	}
	if n := len(acts); n > 0 {
		s.feed.advance(acts[n-1].ID)
		s.log.Info().Str("instance", host).Int("pid", pid).Int("requeued", requeued).Int("failed", failed).Str("reason", reason).Msg("background chats handed back")
	}
	return requeued, failed, nil
}

// QueueStats is the state of the background chat queue, database-wide.
type QueueStats struct {
	Queued  int // chats waiting for a worker
	Running int // background chats running
	Retried int // "chat.retried" activities ever written
	// OldestQueued is when the oldest queued chat was created; zero when
	// none is queued.
	OldestQueued time.Time
}

// ChatQueueStats returns the queue's state.
func (s *Store) ChatQueueStats(ctx context.Context) (QueueStats, error) {
	var q QueueStats
	var oldest time.Time
	err := s.db.QueryRowContext(ctx, `SELECT
	(SELECT count(*) FROM chats WHERE status = 'queued'),
	(SELECT count(*) FROM chats WHERE status = 'running' AND background),
	(SELECT count(*) FROM activities WHERE type = 'chat.retried'),
	(SELECT MIN(created_at) FROM chats WHERE status = 'queued')`).Scan(&q.Queued, &q.Running, &q.Retried, dbTime{&oldest})
	if err != nil {
		return QueueStats{}, s.wrap(ctx, "read chat queue", err)
	}
	q.OldestQueued = oldest
	return q, nil
}
