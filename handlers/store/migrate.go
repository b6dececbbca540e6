package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"

	"github.com/jackc/pgx/v5"
)

// Default agent, created by Migrate when absent.
const (
	DefaultAgentID           = "default"
	DefaultAgentName         = "Default agent"
	DefaultAgentSystemPrompt = "You are a helpful assistant. Answer clearly and concisely, say so when you are not sure, and ask a short question when a request is ambiguous."
)

// SchemaVersion is the schema version this binary migrates to.
func (s *Store) SchemaVersion() int { return len(s.d.migrations) }

// Migrate brings the schema to SchemaVersion and creates the default agent
// if it is absent (so deleting it lasts until the next Migrate). It runs in
// one read-write transaction: a concurrent Migrate from another process
// waits (SQLite's write lock; on PostgreSQL an advisory lock taken first, so
// several hosts starting at once migrate exactly once), then finds nothing
// to do, and running it twice is harmless. A
// database migrated by a newer binary returns an error matching
// ErrSchemaTooNew and is left untouched.
//
// Migrate belongs to the supervisor, once, before workers start: workers
// only Open.
func (s *Store) Migrate(ctx context.Context) error {
	var from int
	var created bool
	err := s.write(ctx, func(tx *sql.Tx) error {
		if s.d.lockMigrate != "" {
			if _, err := tx.ExecContext(ctx, s.d.lockMigrate); err != nil {
				return err
			}
		}
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (
	version    INTEGER PRIMARY KEY,
	applied_at TEXT NOT NULL
)`); err != nil {
			return err
		}
		var err error
		if from, err = s.schemaVersion(ctx, tx); err != nil {
			return err
		}
		if err := s.checkVersion(from); err != nil {
			return err
		}
		for v := from; v < len(s.d.migrations); v++ {
			if _, err := tx.ExecContext(ctx, s.d.migrations[v]); err != nil {
				return fmt.Errorf("schema version %d: %w", v+1, err)
			}
			if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO schema_version (version, applied_at) VALUES (?, ?)`),
				v+1, timeArg(now())); err != nil {
				return fmt.Errorf("schema version %d: %w", v+1, err)
			}
		}
		created, err = s.ensureDefaultAgent(ctx, tx)
		return err
	})
	if errors.Is(err, ErrSchemaTooNew) {
		return err
	}
	if err == nil {
		var lockConn *pgx.ConnConfig
		if s.pg != nil {
			lockConn = s.pg.listen
		}
		err = s.jobs.migrate(ctx, s.db, lockConn, s.log)
	}
	if err != nil {
		return s.wrap(ctx, "migrate store "+s.path, err)
	}
	if from != s.SchemaVersion() {
		s.log.Info().Str("path", s.path).Int("from", from).Int("to", s.SchemaVersion()).Msg("schema migrated")
	}
	if created {
		s.log.Info().Str("agent_id", DefaultAgentID).Msg("default agent created")
	}
	return nil
}

// ensureDefaultAgent creates the default agent unless it exists and reports
// whether it did. The supervisor writes it: worker 0, its own pid.
func (s *Store) ensureDefaultAgent(ctx context.Context, tx *sql.Tx) (bool, error) {
	a := Agent{ID: DefaultAgentID, Name: DefaultAgentName, SystemPrompt: DefaultAgentSystemPrompt}
	_, _, err := s.insertAgent(ctx, tx, a, Origin{PID: os.Getpid()})
	if errors.Is(err, ErrExists) {
		return false, nil
	}
	return err == nil, err
}

type queryer interface {
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// schemaVersion returns the highest applied version, 0 for a new database.
func (s *Store) schemaVersion(ctx context.Context, q queryer) (int, error) {
	var n int
	if err := q.QueryRowContext(ctx, s.q(s.d.hasTable), "schema_version").Scan(&n); err != nil || n == 0 {
		return 0, err
	}
	var v sql.NullInt64
	err := q.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_version`).Scan(&v)
	return int(v.Int64), err
}

// checkVersion refuses a schema this binary does not know.
func (s *Store) checkVersion(v int) error {
	if v > s.SchemaVersion() {
		return fmt.Errorf("database %s has schema version %d, this binary knows up to %d: %w",
			s.path, v, s.SchemaVersion(), ErrSchemaTooNew)
	}
	return nil
}
