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
// elsewhere use SQL that PostgreSQL also speaks, with ? placeholders that a
// PostgreSQL dialect rebinds. That backend is not built yet: Open refuses
// postgres:// URLs with ErrUnsupported.
//
// # Invariants
//
//   - Activity ids strictly increase in commit order and are never reused,
//     so a reader that remembers the last id it saw and asks for "id > last"
//     misses nothing and sees nothing twice. (SQLite has one writer at a
//     time, so an id is never committed after a larger one.)
//   - Every state change writes its activity in the same transaction:
//     "agent.created", "agent.deleted", "chat.started", and exactly one of
//     "chat.completed", "chat.failed", "chat.cancelled" per chat.
//   - A chat finishes once; a second FinishChat returns ErrChatFinished.
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
// read-only, disk full, I/O) match ErrUnavailable, for a 503.
package store
