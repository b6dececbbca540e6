package store

import (
	"context"
	"database/sql"
	"sync"
)

// Prepared statements of the hot paths on SQLite. database/sql prepares a
// query on every call; SQLite's parser and planner then cost a chat about
// as much as its writes (a third of the store's CPU under load, measured in
// docs/benchmarks.md). A statement prepared once on the pool is prepared
// once per connection and reused by every transaction on that connection
// (Tx.StmtContext). PostgreSQL needs none of it: pgx caches its statements
// itself.
type stmts struct {
	mu sync.Mutex
	m  map[string]*sql.Stmt
}

// stmt returns query prepared on the pool, or nil when it cannot be (the
// caller then runs it unprepared, and any error shows there).
func (s *Store) stmt(ctx context.Context, query string) *sql.Stmt {
	s.stmts.mu.Lock()
	st := s.stmts.m[query]
	s.stmts.mu.Unlock()
	if st != nil {
		return st
	}
	st, err := s.db.PrepareContext(ctx, query)
	if err != nil {
		return nil
	}
	s.stmts.mu.Lock()
	defer s.stmts.mu.Unlock()
	if prev := s.stmts.m[query]; prev != nil {
		st.Close()
		return prev
	}
	if s.stmts.m == nil {
		s.stmts.m = map[string]*sql.Stmt{}
	}
	s.stmts.m[query] = st
	return st
}

// queryRow runs query (with ? placeholders) in tx, or on the pool when tx
// is nil, prepared once on SQLite.
func (s *Store) queryRow(ctx context.Context, tx *sql.Tx, query string, args ...any) *sql.Row {
	query = s.q(query)
	if s.pg == nil {
		if st := s.stmt(ctx, query); st != nil {
			if tx != nil {
				st = tx.StmtContext(ctx, st)
			}
			return st.QueryRowContext(ctx, args...)
		}
	}
	if tx != nil {
		return tx.QueryRowContext(ctx, query, args...)
	}
	return s.db.QueryRowContext(ctx, query, args...)
}

// exec runs query in tx (never nil), prepared once on SQLite.
func (s *Store) exec(ctx context.Context, tx *sql.Tx, query string, args ...any) (sql.Result, error) {
	query = s.q(query)
	if s.pg == nil {
		if st := s.stmt(ctx, query); st != nil {
			return tx.StmtContext(ctx, st).ExecContext(ctx, args...)
		}
	}
	return tx.ExecContext(ctx, query, args...)
}
