// Package store provides the state every worker process shares: agents,
// chats and the activity feed, in one database that all of them open.
//
// # Mechanism
//
// The embedded backend is one SQLite file (by default data/server.db) opened
// through github.com/ncruces/go-sqlite3, a cgo-free build of SQLite. Every
// connection runs with journal_mode=WAL, busy_timeout=10000 ms,
// synchronous=NORMAL and foreign_keys=on, and every read-write transaction
// starts with BEGIN IMMEDIATE: it takes the write lock before reading, so a
// writer that must wait does so in the busy handler instead of failing with
// SQLITE_BUSY half-way. Readers never block under WAL. Within one process a
// Store also queues its own writes, so at most one of its connections waits
// in SQLite's (sleeping, unfair) busy handler at a time.
//
// WaitActivity lets thousands of feed readers wait for new activities. One
// poller goroutine per Store reads MAX(id) every PollInterval, only while
// someone waits, and wakes them by closing a channel; a commit by the same
// Store wakes them at once. Commits by other processes are seen within about
// one PollInterval.
//
// Everything SQLite-specific (URL forms, pragmas, schema DDL, which errors
// mean "unavailable") is in sqlite.go behind the dialect type; the queries
// elsewhere use SQL that PostgreSQL also speaks, with ? placeholders that
// the PostgreSQL dialect rebinds to $n.
//
// A postgres:// or postgresql:// URL selects PostgreSQL (postgres.go):
// github.com/jackc/pgx/v5 with a pgxpool.Pool of Options.MaxOpenConns
// connections (default DefaultPostgresMaxConns) under database/sql, so the
// same queries run on both engines. Migrate takes an advisory lock first,
// so several hosts starting at once migrate exactly once. WaitActivity is
// woken through LISTEN/NOTIFY instead of polling (postgres_wait.go): a
// trigger notifies each new activity id on channel "corral_activity", and
// each Store keeps one dedicated LISTEN connection that turns notified ids
// into wake-ups; waiters then re-read by cursor. When that connection
// breaks it reconnects with backoff (100 ms doubling to 5 s, jittered),
// then reads the highest id, which wakes the waiters that missed something
// meanwhile; a silent connection is pinged every 30 s.
//
// # Invariants
//
//   - Activity ids strictly increase in commit order and are never reused,
//     so a reader that remembers the last id it saw and asks for "id > last"
//     misses nothing and sees nothing twice. (SQLite has one writer at a
//     time, so an id is never committed after a larger one. PostgreSQL
//     draws ids from a sequence before commit, so each activity insert
//     takes a database-wide advisory lock held until its transaction ends:
//     ids are drawn and committed in one order. That serializes the tail of
//     every write transaction, from the activity insert to the end of the
//     commit; see docs/deploy.md for the measured cost.)
//   - Every state change writes its activity in the same transaction:
//     "agent.created", "agent.deleted", "chat.queued" (background),
//     "chat.started", "chat.retried", and exactly one of "chat.completed",
//     "chat.failed", "chat.cancelled" per chat.
//   - A chat finishes once; a second FinishChat returns ErrChatFinished.
//   - A background chat and its River job are inserted in one transaction
//     (StartChat), and its cancellation cancels the job in the chat's
//     transaction (EndChat); jobs.go has the River wiring, and
//     HandBackChats makes a dead process's jobs available again at once.
//   - Timestamps are UTC with microsecond precision.
//
// # Operations
//
// Migrations are versioned (table schema_version) and run once by the
// supervisor, before workers start, with Migrate; workers only Open. A binary
// refuses a database whose schema is newer than it knows (ErrSchemaTooNew)
// at Open. Open also creates the file's folder and fails at once, naming
// the file, when the folder cannot be made, the file is not a database or
// cannot be written.
//
// SQLite keeps two files next to the database while it is open,
// server.db-wal and server.db-shm. They belong to SQLite: never delete, copy
// or open them while any process has the database open. Back up with
// "sqlite3 data/server.db .backup copy.db", not cp. The database must be on
// a local file system (WAL needs shared memory between the processes).
//
// Errors that mean the database cannot serve now (busy past the timeout,
// read-only, disk full, I/O; for PostgreSQL also unreachable, refusing
// connections, shutting down, a broken connection) match ErrUnavailable, for
// a 503. A PostgreSQL Store recovers by itself when the server returns:
// the pool replaces dead connections on the next call, and the listener
// reconnects. Errors name postgres://user@host:port/database, never the
// password. Chats record Options.Host, so FailOrphanedChats and
// FailAllStarted on one host never touch another host's chats.
//
// Connections per PostgreSQL Store: Options.MaxOpenConns pooled plus one
// for LISTEN. A server runs one Store per worker and one in the master.
//
// Bounds: Options.MaxAgents caps the agents (CreateAgent counts in its own
// transaction, under an advisory lock on PostgreSQL, so concurrent
// creators never pass it), and Agents returns pages of at most
// MaxAgentLimit with an opaque cursor. Prune deletes finished chats and
// old activities in small transactions and always keeps the newest
// activity, so the cursor invariant above survives it; on PostgreSQL one
// process at a time prunes (an advisory lock held by each batch's
// transaction, so no connection is kept between batches).
package store
