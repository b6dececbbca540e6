package store

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
)

// Defaults applied by Open for zero Options fields.
const (
	// DefaultMaxOpenConns is the SQLite connection pool size per process.
	// Reads run in parallel under WAL; writes serialize in SQLite anyway.
	// (PostgreSQL: DefaultPostgresMaxConns.)
	DefaultMaxOpenConns = 6
	// DefaultPollInterval is how often WaitActivity's poller looks for
	// commits by other processes while anyone waits (SQLite only;
	// PostgreSQL wakes waiters through LISTEN/NOTIFY).
	DefaultPollInterval = 50 * time.Millisecond
)

// Options configures Open. The zero value works.
type Options struct {
	// Logger receives the store's events. The zero value logs nothing.
	Logger zerolog.Logger
	// Host identifies this machine in chat rows, so FailOrphanedChats and
	// FailAllStarted only touch chats this machine ran. Default: os.Hostname,
	// or "localhost" if that fails.
	Host string
	// MaxOpenConns caps this process's pooled connections. Default
	// DefaultMaxOpenConns for SQLite, DefaultPostgresMaxConns for
	// PostgreSQL, which also holds one more connection for LISTEN.
	MaxOpenConns int
	// PollInterval is the SQLite poller's period. Default
	// DefaultPollInterval.
	PollInterval time.Duration
	// RefuseMissingFolder makes a missing folder of the SQLite file an
	// error that names it (matching ErrNoFolder), so that a path the user
	// typed is never silently created. By default Open creates the folder,
	// mode 0700, as the server does for its default data/.
	RefuseMissingFolder bool
	// MaxAgents, if positive, bounds the number of agents: CreateAgent
	// returns an *AgentLimitError once that many exist. 0 means no bound.
	MaxAgents int
}

// Store holds agents, chats and activities in a database every worker
// process opens. Its methods may be called from any number of goroutines.
type Store struct {
	db   *sql.DB
	d    dialect
	path string      // the SQLite file, or postgres://user@host:port/db
	pg   *pgDatabase // nil on SQLite
	host string
	log  zerolog.Logger

	maxAgents int // Options.MaxAgents

	probe     diskProbe             // explains SQLite's disk errors
	diskFault atomic.Pointer[error] // the last disk error, until the disk takes writes again (see Ping)
	claim     io.Closer             // see ClaimInstance; nil until then
	jobs      *jobs                 // River, insert-only (see jobs.go)
	stmts     stmts                 // SQLite: prepared statements (see stmts.go)
	// lost holds when HandBackLostHosts first found each instance without
	// its claim, until it hands that instance's chats back or finds the
	// claim again.
	lostMu sync.Mutex
	lost   map[string]time.Time

	// writing admits one read-write transaction of this Store at a time;
	// nil on PostgreSQL. SQLite runs one writer at a time anyway; queuing
	// here, in FIFO-ish Go order and with ctx honoured, keeps at most one
	// connection per process in SQLite's busy handler, which sleeps and
	// retries and is not fair.
	writing chan struct{}

	feed      feed
	pollEvery time.Duration
	done      chan struct{} // closed by Close
	polled    chan struct{} // closed when the poller (or listener) returns
	stopPoll  context.CancelFunc
	closeOnce sync.Once
	closeErr  error
}

// Open opens the store named by url and checks it can serve: an SQLite file
// is created if missing (with its folder) and must be a writable SQLite
// database; a PostgreSQL server must answer and accept the connection. The
// schema must not have been migrated by a newer binary (ErrSchemaTooNew).
// Open does not migrate; the supervisor calls Migrate once before workers
// start.
//
// SQLite URL forms: "sqlite:data/server.db" (relative to the working
// directory), "sqlite:/abs/server.db", "sqlite://path" and
// "sqlite:///abs/path" (the "//" is dropped), "sqlite3:" and "file:" as
// aliases, or a bare path. Query parameters are refused.
//
// PostgreSQL: "postgres://" or "postgresql://" URLs in libpq's form (key=value
// parameters such as sslmode, connect_timeout, application_name are
// honoured; connect_timeout defaults to 5 s). A server that cannot be
// reached or refuses the connection is an error matching ErrUnavailable that
// names the host and database. Any other scheme matches ErrUnsupported.
//
// Errors never echo the password of a server database URL; they name the
// file of an SQLite one. The caller must Close the Store.
func Open(ctx context.Context, url string, opts Options) (*Store, error) {
	scheme, rest := splitScheme(url)
	var (
		d    dialect
		path string
		db   *sql.DB
		pg   *pgDatabase
		err  error
	)
	switch scheme {
	case "postgres", "postgresql":
		d = postgresDialect
		if pg, err = openPostgres(ctx, url, opts.MaxOpenConns); err != nil {
			return nil, err
		}
		db, path = pg.db, pg.name
	case "", "sqlite", "sqlite3", "file":
		d = sqliteDialect
		if path, err = sqlitePath(url, rest); err != nil {
			return nil, err
		}
		if opts.MaxOpenConns <= 0 {
			opts.MaxOpenConns = DefaultMaxOpenConns
		}
		if db, err = openSQLite(ctx, path, opts.MaxOpenConns, !opts.RefuseMissingFolder); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("open store: scheme %q (want sqlite: or postgres://): %w", scheme, ErrUnsupported)
	}

	if opts.Host == "" {
		if opts.Host, err = os.Hostname(); err != nil {
			opts.Host = "localhost"
		}
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = DefaultPollInterval
	}
	pollCtx, stopPoll := context.WithCancel(context.Background())
	s := &Store{
		db:        db,
		d:         d,
		path:      path,
		pg:        pg,
		host:      opts.Host,
		log:       opts.Logger,
		maxAgents: opts.MaxAgents,
		pollEvery: opts.PollInterval,
		done:      make(chan struct{}),
		polled:    make(chan struct{}),
		stopPoll:  stopPoll,
	}
	if d.queueWrites {
		s.writing = make(chan struct{}, 1)
	}
	if s.jobs, err = newJobs(db, pg != nil, opts.Logger); err != nil {
		stopPoll()
		db.Close()
		if pg != nil {
			pg.pool.Close()
		}
		return nil, fmt.Errorf("open store %s: %w", path, err)
	}
	s.feed.init()

	v, err := s.schemaVersion(ctx, db)
	if err != nil {
		err = s.wrap(ctx, "read schema version of "+path, err)
	} else {
		err = s.checkVersion(v)
	}
	var listenConn *pgx.Conn
	if err == nil && pg != nil {
		if listenConn, err = s.listenConnect(ctx); err != nil {
			err = s.wrap(ctx, "open store "+path+": listen", err)
		}
	}
	if err != nil {
		stopPoll()
		db.Close()
		if pg != nil {
			pg.pool.Close()
		}
		return nil, err
	}
	if pg != nil {
		go s.listen(pollCtx, listenConn)
	} else {
		go s.poll(pollCtx)
	}
	s.log.Debug().Str("path", path).Str("backend", d.name).Int("schema_version", v).Msg("store opened")
	return s, nil
}

// FilePath returns the absolute path of the database file an SQLite URL
// names, and false for a server database (postgres://) or a URL Open would
// refuse.
func FilePath(url string) (string, bool) {
	scheme, rest := splitScheme(url)
	switch scheme {
	case "", "sqlite", "sqlite3", "file":
		p, err := sqlitePath(url, rest)
		return p, err == nil
	}
	return "", false
}

// splitScheme splits "scheme:rest". A colon after the first slash, or a
// "scheme" that is not one, means there is no scheme: a bare path.
func splitScheme(url string) (scheme, rest string) {
	i := strings.IndexByte(url, ':')
	if i <= 0 || strings.ContainsRune(url[:i], '/') {
		return "", url
	}
	for _, r := range url[:i] {
		if !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9' || r == '+' || r == '-' || r == '.') {
			return "", url
		}
	}
	return strings.ToLower(url[:i]), url[i+1:]
}

// Path returns the database file, absolute, or for PostgreSQL
// "postgres://user@host:port/database" (never the password); for messages.
func (s *Store) Path() string { return s.path }

// Close stops the poller or listener, wakes WaitActivity callers with
// ErrClosed and closes the database. Calls after the first return the first
// result.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		close(s.done)
		s.stopPoll()
		<-s.polled
		if err := s.db.Close(); err != nil {
			s.closeErr = fmt.Errorf("close store %s: %w", s.path, err)
		}
		if s.pg != nil {
			s.pg.pool.Close()
		}
		if s.claim != nil {
			s.claim.Close()
		}
	})
	return s.closeErr
}

// q returns query with its placeholders in the dialect's style.
func (s *Store) q(query string) string { return s.d.rebind(query) }

// write runs fn in one read-write transaction (BEGIN IMMEDIATE on SQLite,
// READ COMMITTED on PostgreSQL) and commits it; fn's error rolls it back and
// is returned unwrapped.
func (s *Store) write(ctx context.Context, fn func(tx *sql.Tx) error) error {
	if s.writing != nil {
		select {
		case s.writing <- struct{}{}:
		case <-ctx.Done():
			return ctx.Err()
		case <-s.done:
			return ErrClosed
		}
		defer func() { <-s.writing }()
	} else {
		select {
		case <-s.done:
			return ErrClosed
		default:
		}
	}

	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		tx.Rollback()
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	if s.diskFault.Load() != nil {
		s.diskFault.Store(nil)
	}
	return nil
}

// newID returns 16 random hex characters: url-safe, and 64 bits make a
// collision unlikely enough that callers need not retry.
func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// timeLayout is fixed-width UTC with microseconds (PostgreSQL's precision),
// so text order is time order and a value reads back equal.
const timeLayout = "2006-01-02T15:04:05.000000Z"

// now returns the current time as stored: UTC, whole microseconds.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// dbTime stores a time.Time as timeLayout text and scans text or a driver's
// time.Time back.
type dbTime struct{ t *time.Time }

func (d dbTime) Scan(src any) error {
	switch v := src.(type) {
	case time.Time:
		*d.t = v.UTC()
		return nil
	case string:
		return d.parse(v)
	case []byte:
		return d.parse(string(v))
	case nil:
		*d.t = time.Time{}
		return nil
	}
	return fmt.Errorf("scan time: unexpected %T", src)
}

func (d dbTime) parse(v string) error {
	t, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		return fmt.Errorf("scan time: %w", err)
	}
	*d.t = t.UTC()
	return nil
}

func timeArg(t time.Time) string { return t.UTC().Format(timeLayout) }

// Ping reports whether the database answers a trivial query now and, after
// a disk error (a read-only filesystem, a full disk), whether the disk takes
// a write again. Its error matches ErrUnavailable when the database cannot
// serve.
func (s *Store) Ping(ctx context.Context) error {
	var one int
	if err := s.db.QueryRowContext(ctx, "SELECT 1").Scan(&one); err != nil {
		return s.wrap(ctx, "ping "+s.path, err)
	}
	if fault := s.diskFault.Load(); fault != nil {
		if err := s.probe.writable(filepath.Dir(s.path)); err != nil {
			return &unavailableError{fmt.Errorf("ping %s: the disk refuses writes: %w", s.path, err)}
		}
		s.diskFault.CompareAndSwap(fault, nil)
	}
	return nil
}
