package store

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
)

// This file holds everything that is specific to PostgreSQL except the
// LISTEN loop (postgres_wait.go): URL handling, the pool, the schema DDL, the
// two advisory locks and which errors mean "unavailable". The queries in the
// other files run unchanged through database/sql on top of a pgxpool.Pool
// (stdlib.OpenDBFromPool), with ? rebound to $n.

// DefaultPostgresMaxConns is the pool size per process (per Store) on
// PostgreSQL when Options.MaxOpenConns is 0. Each Store also holds one more
// connection for LISTEN, so a server uses WORKERS x (this + 1) connections
// plus the master's own Store; keep the sum over all hosts under the
// server's max_connections.
const DefaultPostgresMaxConns = 4

// defaultConnectTimeout bounds a connection attempt when the URL sets no
// connect_timeout: without one, a request made while the database host is
// unreachable waits for the kernel's TCP timeout (minutes) instead of
// answering 503.
const defaultConnectTimeout = 5 * time.Second

// Advisory lock keys (pg_advisory_xact_lock). Advisory locks are scoped to
// one database, so other databases on the same server never contend. The
// values spell "corral" followed by a number, to be recognisable in
// pg_locks (objid holds the low 32 bits, classid the high ones).
const (
	// migrateLockKey serializes Migrate across processes and hosts: the
	// first to take it migrates, the others wait and find nothing to do.
	migrateLockKey int64 = 0x636f7272616c01
	// activityLockKey is taken by every transaction that inserts an
	// activity, right before the insert, and held until it commits. See
	// postgresDialect for why.
	activityLockKey int64 = 0x636f7272616c02
	// agentsLockKey is taken by CreateAgent when Options.MaxAgents is set,
	// before it counts: two creations that each counted one below the
	// limit would otherwise both insert.
	agentsLockKey int64 = 0x636f7272616c03
)

// activityChannel is the LISTEN/NOTIFY channel. Each inserted activity
// notifies its id (a trigger, so writers that are not this binary notify
// too); listeners use the id only to know that there is something to read.
const activityChannel = "corral_activity"

// postgresDialect is the PostgreSQL dialect.
//
// Ordering of activity ids: a sequence hands out ids when rows are inserted,
// not when they commit, so two concurrent transactions can commit ids 8 and
// 7 in that order, and a reader that saw 8 and then asks for "id > 8" would
// never see 7. postgresInsertActivity closes that gap: every transaction
// takes one advisory lock (activityLockKey) as it inserts an activity, and
// keeps it until it ends, so ids are drawn and committed in one order,
// database-wide.
// PostgreSQL releases transaction locks only after the commit is visible to
// new snapshots, so when a reader sees id n every smaller id is either
// visible or was rolled back for good. The cost: writers of activities
// (every API write) are serialized from that insert to the end of their
// commit, about one round trip plus one WAL flush; docs/deploy.md has the
// measured throughput.
var postgresDialect = dialect{
	name:           "postgres",
	migrations:     postgresMigrations,
	rebind:         rebindDollar,
	unavailable:    postgresUnavailable,
	hasTable:       `SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema() AND tablename = ?`,
	lockMigrate:    fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d)`, migrateLockKey),
	lockAgents:     fmt.Sprintf(`SELECT pg_advisory_xact_lock(%d)`, agentsLockKey),
	insertActivity: postgresInsertActivity,
	uniqueViolation: func(err error) bool {
		var pgErr *pgconn.PgError
		return errors.As(err, &pgErr) && pgErr.Code == "23505"
	},
}

// postgresInsertActivity takes the activity lock and inserts in one round
// trip. The lock is in a MATERIALIZED CTE that the insert reads its one row
// from, so the executor must run it before it evaluates the row's identity
// default (nextval): the id is drawn under the lock. (A separate statement
// would work too, at one more round trip spent holding the lock.)
var postgresInsertActivity = fmt.Sprintf(`WITH activity_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock(%d))
INSERT INTO activities (time, type, agent_id, chat_id, worker, pid, host, data)
SELECT ?::timestamptz, ?, ?, ?, ?::integer, ?::integer, ?, ?::jsonb FROM activity_lock RETURNING id`, activityLockKey)

// postgresMigrations is the schema history; append, never edit a released
// step. Version numbers match sqliteMigrations step for step.
var postgresMigrations = []string{
	// 1: agents, chats, activities, and the trigger that notifies new
	// activity ids.
	`
CREATE TABLE agents (
	id            text PRIMARY KEY,
	name          text NOT NULL,
	system_prompt text NOT NULL,
	model         text NOT NULL DEFAULT '',
	created_at    timestamptz NOT NULL
);
CREATE INDEX agents_created ON agents (created_at, id);

-- No foreign key to agents: a chat's history outlives its agent.
CREATE TABLE chats (
	id          text PRIMARY KEY,
	agent_id    text NOT NULL,
	message     text NOT NULL,
	status      text NOT NULL CHECK (status IN ('started', 'completed', 'failed', 'cancelled')),
	worker      integer NOT NULL,
	pid         integer NOT NULL,
	host        text NOT NULL,
	created_at  timestamptz NOT NULL,
	finished_at timestamptz
);
CREATE INDEX chats_started ON chats (host, pid) WHERE status = 'started';

-- Ids come from an identity sequence and are committed in id order because
-- every inserting transaction holds the activity advisory lock (see
-- postgres.go), so a reader's "id > cursor" never misses or repeats a row.
CREATE TABLE activities (
	id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
	time     timestamptz NOT NULL,
	type     text NOT NULL,
	agent_id text NOT NULL DEFAULT '',
	chat_id  text NOT NULL DEFAULT '',
	worker   integer NOT NULL,
	pid      integer NOT NULL,
	host     text NOT NULL,
	data     jsonb
);
CREATE INDEX activities_agent ON activities (agent_id, id);
CREATE INDEX activities_type ON activities (type, id);

CREATE FUNCTION corral_notify_activity() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_notify('` + activityChannel + `', NEW.id::text);
	RETURN NULL;
END
$$;
CREATE TRIGGER activities_notify AFTER INSERT ON activities
	FOR EACH ROW EXECUTE FUNCTION corral_notify_activity();
`,
	// 2: background chats (see sqliteMigrations).
	`
ALTER TABLE chats DROP CONSTRAINT chats_status_check;
UPDATE chats SET status = 'running' WHERE status = 'started';
ALTER TABLE chats ADD CONSTRAINT chats_status_check
	CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled'));
ALTER TABLE chats
	ADD COLUMN background  boolean NOT NULL DEFAULT false,
	ADD COLUMN job_id      bigint,
	ADD COLUMN attempts    integer NOT NULL DEFAULT 0,
	ADD COLUMN started_at  timestamptz,
	ADD COLUMN reply       text,
	ADD COLUMN detail      text,
	ADD COLUMN idem_key    text,
	ADD COLUMN idem_hash   text;
UPDATE chats SET attempts = 1, started_at = created_at;
DROP INDEX chats_started;
CREATE INDEX chats_running ON chats (host, pid) WHERE status = 'running';
CREATE INDEX chats_queued ON chats (created_at) WHERE status = 'queued';
CREATE UNIQUE INDEX chats_idem ON chats (idem_key);

CREATE TABLE chat_events (
	chat_id text NOT NULL,
	seq     integer NOT NULL,
	attempt integer NOT NULL,
	text    text NOT NULL,
	PRIMARY KEY (chat_id, seq)
);
`,
	// 3: the idempotency index holds only chats with a key (see sqliteMigrations).
	`
DROP INDEX chats_idem;
CREATE UNIQUE INDEX chats_idem ON chats (idem_key) WHERE idem_key IS NOT NULL;
`,
	// 4: an index of finished chats for retention (see sqliteMigrations).
	`
UPDATE chats SET finished_at = created_at
	WHERE finished_at IS NULL AND status IN ('completed', 'failed', 'cancelled');
CREATE INDEX chats_finished ON chats (finished_at)
	WHERE status IN ('completed', 'failed', 'cancelled');
`,
}

// rebindDollar rewrites ? placeholders as $1, $2, ... The store's queries
// have no ? inside string literals, so no quoting rules are needed.
func rebindDollar(q string) string {
	if !strings.Contains(q, "?") {
		return q
	}
	var b strings.Builder
	b.Grow(len(q) + 8)
	n := 0
	for i := 0; i < len(q); i++ {
		if q[i] == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(q[i])
	}
	return b.String()
}

// postgresUnavailable reports whether err means PostgreSQL cannot serve now:
// it cannot be reached or refuses connections, a connection broke, the
// server is shutting down, starting or out of connections, or it is a
// read-only standby. Constraint violations, syntax errors and the like are
// bugs and stay 500s.
func postgresUnavailable(err error) bool {
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		switch {
		case strings.HasPrefix(pgErr.Code, "08"), // connection exception
			strings.HasPrefix(pgErr.Code, "53"),  // insufficient resources (too many connections, disk full)
			strings.HasPrefix(pgErr.Code, "57P"), // admin/crash shutdown, cannot connect now
			pgErr.Code == "25006",                // read-only transaction: a standby after failover
			pgErr.Code == "40001",                // serialization failure: retry later
			pgErr.Code == "40P01",                // deadlock detected: retry later
			pgErr.Code == "57014":                // statement timeout (a cancelled ctx is handled by wrap)
			return true
		}
		// An error the server sent while we were connecting (database not
		// accepting connections, too many clients, authentication) still
		// means "not now" for a request.
		var cerr *pgconn.ConnectError
		return errors.As(err, &cerr)
	}
	var cerr *pgconn.ConnectError
	var nerr net.Error
	return errors.As(err, &cerr) ||
		errors.As(err, &nerr) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, driver.ErrBadConn) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, pgconn.ErrConnClosed) ||
		pgconn.SafeToRetry(err) || pgconn.Timeout(err)
}

// pgDatabase is what openPostgres sets up for a Store.
type pgDatabase struct {
	pool *pgxpool.Pool
	db   *sql.DB
	// poolConfig builds the chat runner's own pool (RunChats).
	poolConfig *pgxpool.Config
	name       string          // postgres://user@host:port/database, for messages
	listen     *pgx.ConnConfig // for the LISTEN connection
}

// openPostgres parses url, builds the pool and checks that the server
// answers. Its errors name the host and database, never the password.
func openPostgres(ctx context.Context, url string, maxConns int) (*pgDatabase, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		// pgconn masks the password in its message; the URL's user info is
		// still kept out of ours.
		return nil, fmt.Errorf("open store postgres: invalid database url: %w", scrubURLError(err, url))
	}
	if maxConns <= 0 {
		maxConns = DefaultPostgresMaxConns
	}
	cfg.MaxConns = int32(maxConns)
	if cfg.ConnConfig.ConnectTimeout == 0 {
		cfg.ConnConfig.ConnectTimeout = defaultConnectTimeout
	}
	name := pgName(cfg.ConnConfig)
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", name, err)
	}
	// Answer now, with the server's own reason, rather than on the first
	// request: a server that is down, a database that does not exist, a
	// password that is refused.
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		err = fmt.Errorf("open store %s: %w", name, err)
		if postgresUnavailable(err) {
			return nil, &unavailableError{err}
		}
		return nil, err
	}
	db := stdlib.OpenDBFromPool(pool)
	db.SetMaxOpenConns(maxConns)
	return &pgDatabase{pool: pool, db: db, name: name, listen: cfg.ConnConfig.Copy(), poolConfig: cfg.Copy()}, nil
}

// pgName names a database for messages and logs: scheme, user, first host
// and port, database; no password and no parameters.
func pgName(c *pgx.ConnConfig) string {
	host := c.Host
	if strings.HasPrefix(host, "/") {
		host = "[" + host + "]" // a unix socket folder
	}
	user := ""
	if c.User != "" {
		user = c.User + "@"
	}
	return fmt.Sprintf("postgres://%s%s:%d/%s", user, host, c.Port, c.Database)
}

// scrubURLError returns err, or an error with the same text minus the URL's
// password if pgconn's masking ever missed it.
func scrubURLError(err error, url string) error {
	at := strings.LastIndex(url, "@")
	i := strings.Index(url, "://")
	if at < 0 || i < 0 || at < i {
		return err
	}
	userInfo := url[i+3 : at]
	colon := strings.IndexByte(userInfo, ':')
	if colon < 0 || colon == len(userInfo)-1 {
		return err
	}
	pw := userInfo[colon+1:]
	if !strings.Contains(err.Error(), pw) {
		return err
	}
	return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
}
