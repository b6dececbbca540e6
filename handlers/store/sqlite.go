package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strings"

	"github.com/ncruces/go-sqlite3"
	"github.com/ncruces/go-sqlite3/driver"
)

// This file holds everything that is specific to SQLite: URL forms, the DSN
// and its pragmas, the open-time checks, the schema DDL and which errors mean
// "unavailable". The other files speak the SQL subset SQLite and PostgreSQL
// share (INSERT ... RETURNING, ON CONFLICT DO NOTHING, ? placeholders passed
// through dialect.rebind); postgres.go is the PostgreSQL counterpart.

// dialect is what differs between database engines.
type dialect struct {
	name string
	// migrations[i] moves the schema from version i to version i+1. The
	// schema_version table itself is created by migrate.go, before them.
	migrations []string
	// rebind rewrites ?-placeholders into the engine's style.
	rebind func(query string) string
	// unavailable reports whether err means the database cannot serve now
	// (ErrUnavailable) rather than a bug or a bad request.
	unavailable func(err error) bool
	// diskError, if set, reports whether an unavailable err came from the
	// database file's disk; such errors are explained by a diskProbe.
	diskError func(err error) bool
	// hasTable is a query with one argument, a table name, returning 1 if
	// that table exists and 0 otherwise.
	hasTable string
	// queueWrites makes a Store admit one of its read-write transactions at
	// a time (see Store.writing): right for an engine with one writer.
	queueWrites bool
	// lockMigrate, if set, runs first in Migrate's transaction so that
	// concurrent Migrates from several hosts run one after the other.
	lockMigrate string
	// lockAgents, if set, runs in CreateAgent's transaction before it
	// counts the agents, so that concurrent creations past
	// Options.MaxAgents run one after the other.
	lockAgents string
	// insertActivity inserts one activity and returns its id; its arguments
	// are time, type, agent_id, chat_id, worker, pid, host, data. On an
	// engine where ids could commit out of order it also takes the lock
	// that prevents it.
	insertActivity string
	// uniqueViolation, if set, reports whether err is a unique constraint
	// violation that a retry of the transaction resolves (an engine with
	// several concurrent writers).
	uniqueViolation func(err error) bool
}

var sqliteDialect = dialect{
	name:        "sqlite",
	migrations:  sqliteMigrations,
	rebind:      func(q string) string { return q },
	unavailable: sqliteUnavailable,
	diskError:   sqliteDiskError,
	hasTable:    `SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?`,
	// BEGIN IMMEDIATE already serializes migrations and activity inserts.
	queueWrites: true,
	insertActivity: `INSERT INTO activities (time, type, agent_id, chat_id, worker, pid, host, data)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id`,
}

// sqliteMigrations is the schema history; append, never edit a released step.
var sqliteMigrations = []string{
	// 1: agents, chats, activities.
	`
CREATE TABLE agents (
	id            TEXT PRIMARY KEY,
	name          TEXT NOT NULL,
	system_prompt TEXT NOT NULL,
	model         TEXT NOT NULL DEFAULT '',
	created_at    TEXT NOT NULL
);
CREATE INDEX agents_created ON agents (created_at, id);

-- No foreign key to agents: a chat's history outlives its agent.
CREATE TABLE chats (
	id          TEXT PRIMARY KEY,
	agent_id    TEXT NOT NULL,
	message     TEXT NOT NULL,
	status      TEXT NOT NULL CHECK (status IN ('started', 'completed', 'failed', 'cancelled')),
	worker      INTEGER NOT NULL,
	pid         INTEGER NOT NULL,
	host        TEXT NOT NULL,
	created_at  TEXT NOT NULL,
	finished_at TEXT
);
CREATE INDEX chats_started ON chats (host, pid) WHERE status = 'started';

-- AUTOINCREMENT: ids strictly increase and are never reused, so a reader's
-- "id > cursor" never misses or repeats a row.
CREATE TABLE activities (
	id       INTEGER PRIMARY KEY AUTOINCREMENT,
	time     TEXT NOT NULL,
	type     TEXT NOT NULL,
	agent_id TEXT NOT NULL DEFAULT '',
	chat_id  TEXT NOT NULL DEFAULT '',
	worker   INTEGER NOT NULL,
	pid      INTEGER NOT NULL,
	host     TEXT NOT NULL,
	data     TEXT
);
CREATE INDEX activities_agent ON activities (agent_id, id);
CREATE INDEX activities_type ON activities (type, id);
`,
	// 2: background chats. SQLite cannot change a CHECK constraint, so the
	// chats table is rebuilt: statuses queued and running ("started" becomes
	// "running"), the River job, attempts, the outcome and the idempotency
	// key; and chat_events holds the batched deltas of background chats.
	`
CREATE TABLE chats_v2 (
	id          TEXT PRIMARY KEY,
	agent_id    TEXT NOT NULL,
	message     TEXT NOT NULL,
	status      TEXT NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
	background  INTEGER NOT NULL DEFAULT 0,
	job_id      INTEGER,
	attempts    INTEGER NOT NULL DEFAULT 0,
	worker      INTEGER NOT NULL,
	pid         INTEGER NOT NULL,
	host        TEXT NOT NULL,
	created_at  TEXT NOT NULL,
	started_at  TEXT,
	finished_at TEXT,
	reply       TEXT,
	detail      TEXT,
	idem_key    TEXT,
	idem_hash   TEXT
);
INSERT INTO chats_v2 (id, agent_id, message, status, attempts, worker, pid, host, created_at, started_at, finished_at)
SELECT id, agent_id, message, CASE status WHEN 'started' THEN 'running' ELSE status END, 1,
	worker, pid, host, created_at, created_at, finished_at FROM chats;
DROP TABLE chats;
ALTER TABLE chats_v2 RENAME TO chats;
CREATE INDEX chats_running ON chats (host, pid) WHERE status = 'running';
CREATE INDEX chats_queued ON chats (created_at) WHERE status = 'queued';
CREATE UNIQUE INDEX chats_idem ON chats (idem_key);

-- One row per batch of deltas; seq is the event id a client resumes after.
CREATE TABLE chat_events (
	chat_id TEXT NOT NULL,
	seq     INTEGER NOT NULL,
	attempt INTEGER NOT NULL,
	text    TEXT NOT NULL,
	PRIMARY KEY (chat_id, seq)
);
`,
	// 3: the idempotency index holds only chats that have a key, so that a
	// chat without one (nearly every synchronous chat) writes one index
	// entry fewer.
	`
DROP INDEX chats_idem;
CREATE UNIQUE INDEX chats_idem ON chats (idem_key) WHERE idem_key IS NOT NULL;
`,
	// 4: retention finds the chats it deletes through an index of finished
	// chats (retention.go), instead of reading every chat; every finished
	// chat has a finish time.
	`
UPDATE chats SET finished_at = created_at
	WHERE finished_at IS NULL AND status IN ('completed', 'failed', 'cancelled');
CREATE INDEX chats_finished ON chats (finished_at)
	WHERE status IN ('completed', 'failed', 'cancelled');
`,
}

// sqliteUnavailable reports whether err is one of SQLite's "not now" codes.
func sqliteUnavailable(err error) bool {
	for _, code := range []sqlite3.ErrorCode{
		sqlite3.BUSY, sqlite3.LOCKED, sqlite3.READONLY, sqlite3.FULL,
		sqlite3.IOERR, sqlite3.CANTOPEN, sqlite3.PROTOCOL,
	} {
		if errors.Is(err, code) {
			return true
		}
	}
	return false
}

// sqliteDiskError reports whether err is one of SQLite's disk codes.
func sqliteDiskError(err error) bool {
	return errors.Is(err, sqlite3.IOERR) || errors.Is(err, sqlite3.FULL) ||
		errors.Is(err, sqlite3.READONLY) || errors.Is(err, sqlite3.CANTOPEN)
}

// sqlitePath returns the database file named by an SQLite URL; rest is what
// follows the scheme. Accepted:
//
//	sqlite:data/server.db      relative to the working directory
//	sqlite:/var/lib/x.db       absolute
//	sqlite://data/server.db    same as sqlite:data/server.db
//	sqlite:///var/lib/x.db     same as sqlite:/var/lib/x.db
//	sqlite:file:PATH           SQLite's URI form, same as sqlite:PATH
//	sqlite3:... file:...       aliases of sqlite:
//	data/server.db             a bare path (no scheme)
//
// Query parameters and fragments are refused rather than ignored: the
// pragmas are fixed (see sqliteDSN), and a silently dropped "?mode=ro" would
// surprise.
func sqlitePath(rawURL, rest string) (string, error) {
	// Without this, "sqlite:file:/x.db" would name the relative path
	// "file:/x.db" and create a folder "file:". The scheme is matched in
	// any case, as splitScheme matches "sqlite:".
	if len(rest) >= len("file:") && strings.EqualFold(rest[:len("file:")], "file:") {
		rest = rest[len("file:"):]
	}
	p := strings.TrimPrefix(rest, "//")
	if strings.ContainsAny(p, "?#") {
		return "", fmt.Errorf("open store %q: query parameters are not supported in sqlite urls", rawURL)
	}
	if p == "" || p == ":memory:" || strings.HasPrefix(p, ":memory:") {
		return "", fmt.Errorf("open store %q: want a file path, as in sqlite:data/server.db (workers share the store through the file)", rawURL)
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("open store %q: %w", rawURL, err)
	}
	return abs, nil
}

// sqliteDSN returns the driver's data source name for path. The pragmas are
// measured settings (docs/architecture.md, "The store"): WAL so readers never
// block the writer; a 10 s busy timeout so writers from every worker queue
// instead of failing; NORMAL sync, which in WAL mode loses at most the last
// commits on power loss and never corrupts; BEGIN IMMEDIATE for every
// read-write transaction, because a deferred transaction that reads and then
// writes cannot wait on the busy timeout and fails with SQLITE_BUSY.
// busy_timeout goes first so the others already wait on locks.
func sqliteDSN(path string) string {
	u := url.URL{Scheme: "file", OmitHost: true, Path: path}
	q := url.Values{}
	q.Add("_pragma", "busy_timeout(10000)")
	q.Add("_pragma", "journal_mode(WAL)")
	q.Add("_pragma", "synchronous(NORMAL)")
	q.Add("_pragma", "foreign_keys(1)")
	q.Set("_txlock", "immediate")
	u.RawQuery = q.Encode()
	return u.String()
}

// openSQLite opens the database file at path, creating it (and its folder
// if createFolder is set) if needed, and checks at once what would
// otherwise fail on the first request: a missing folder or one that cannot
// be created, a file that is not a database, a file or folder we cannot
// write, a file system without WAL support.
func openSQLite(ctx context.Context, path string, maxConns int, createFolder bool) (*sql.DB, error) {
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return nil, fmt.Errorf("open sqlite database %s: is a directory", path)
	}
	dir := filepath.Dir(path)
	if createFolder {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("open sqlite database %s: create folder: %w", path, unwrapPathError(err))
		}
	} else if _, err := os.Stat(dir); errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("open sqlite database %s: %w", path, &noFolderError{dir})
	}
	db, err := driver.Open(sqliteDSN(path))
	if err != nil {
		return nil, fmt.Errorf("open sqlite database %s: %w", path, err)
	}
	db.SetMaxOpenConns(maxConns)
	db.SetMaxIdleConns(maxConns)
	if err := checkSQLite(ctx, db); err != nil {
		db.Close()
		if errors.Is(err, sqlite3.READONLY) {
			// SQLite's "attempt to write a readonly database" also covers a
			// writable file in a folder where -wal and -shm cannot be made.
			return nil, fmt.Errorf("open sqlite database %s: file and folder must be writable (SQLite keeps %s-wal and %s-shm next to it): %w",
				path, filepath.Base(path), filepath.Base(path), err)
		}
		if sqliteDiskError(err) {
			// SQLite says "disk I/O error" for a full disk too: the
			// operating system's own answer names it.
			if perr := probeWrite(filepath.Dir(path)); perr != nil {
				err = fmt.Errorf("%w (a test write beside the database failed: %v)", err, perr)
			}
		}
		return nil, fmt.Errorf("open sqlite database %s: %w", path, err)
	}
	return db, nil
}

// noFolderError says that the database's folder does not exist; it
// matches ErrNoFolder.
type noFolderError struct{ dir string }

func (e *noFolderError) Error() string {
	return "folder " + e.dir + " does not exist; create it first"
}

func (e *noFolderError) Is(target error) bool { return target == ErrNoFolder }

func checkSQLite(ctx context.Context, db *sql.DB) error {
	conn, err := db.Conn(ctx)
	if err != nil {
		return sqliteCause(err)
	}
	defer conn.Close()
	var mode string
	if err := conn.QueryRowContext(ctx, `PRAGMA journal_mode`).Scan(&mode); err != nil {
		return sqliteCause(err)
	}
	if !strings.EqualFold(mode, "wal") {
		return fmt.Errorf("journal mode is %q, want wal (is the file system local?)", mode)
	}
	var n int
	if err := conn.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_master`).Scan(&n); err != nil {
		return sqliteCause(err)
	}
	// SQLite quietly opens a file it may not write read-only; say so now.
	return conn.Raw(func(dc any) error {
		c, ok := dc.(driver.Conn)
		if !ok {
			return nil
		}
		if ro, _ := c.Raw().ReadOnly("main"); ro {
			return sqlite3.READONLY
		}
		return nil
	})
}

// sqliteCause drops the driver's context ("sqlite3: invalid _pragma: ...",
// said of a file that is not a database) and keeps SQLite's error: its code,
// message and the operating system's error.
func sqliteCause(err error) error {
	var serr *sqlite3.Error
	if errors.As(err, &serr) {
		return serr
	}
	var code sqlite3.ExtendedErrorCode
	if errors.As(err, &code) {
		return code
	}
	return err
}

// unwrapPathError drops the *os.PathError's op and path when they repeat
// what the caller's message says.
func unwrapPathError(err error) error {
	var perr *os.PathError
	if errors.As(err, &perr) {
		return fmt.Errorf("%s: %w", perr.Path, perr.Err)
	}
	return err
}
