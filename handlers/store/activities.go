package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// Limits of Filter.Limit.
const (
	// DefaultLimit applies when Filter.Limit is 0 or less.
	DefaultLimit = 100
	// MaxLimit is the most activities one Activities call returns.
	MaxLimit = 500
)

// Activity is one entry of the activity feed. IDs strictly increase in
// commit order and are never reused, so "id > last seen" is a complete
// cursor.
type Activity struct {
	ID      int64          `json:"id"`
	Time    time.Time      `json:"time"` // UTC, RFC 3339 in JSON
	Type    string         `json:"type"` // "agent.created", "chat.completed", ...
	AgentID string         `json:"agent_id"`
	ChatID  string         `json:"chat_id"`
	Worker  int            `json:"worker"`
	PID     int            `json:"pid"`
	Data    map[string]any `json:"data,omitempty"` // JSON numbers read back as float64
}

// Filter selects activities. Zero fields select everything.
type Filter struct {
	After   int64  // only ids greater than After
	Limit   int    // at most Limit, clamped to 1..MaxLimit; 0 means DefaultLimit
	AgentID string // only this agent's
	Type    string // only this type, exactly
}

// Activities returns the activities f selects in ascending id order; never
// nil.
func (s *Store) Activities(ctx context.Context, f Filter) ([]Activity, error) {
	switch {
	case f.Limit <= 0:
		f.Limit = DefaultLimit
	case f.Limit > MaxLimit:
		f.Limit = MaxLimit
	}
	var b strings.Builder
	b.WriteString(`SELECT id, time, type, agent_id, chat_id, worker, pid, data FROM activities WHERE id > ?`)
	args := []any{f.After}
	if f.AgentID != "" {
		b.WriteString(` AND agent_id = ?`)
		args = append(args, f.AgentID)
	}
	if f.Type != "" {
		b.WriteString(` AND type = ?`)
		args = append(args, f.Type)
	}
	b.WriteString(` ORDER BY id LIMIT ?`)
	args = append(args, f.Limit)

	rows, err := s.db.QueryContext(ctx, s.q(b.String()), args...)
	if err != nil {
		return nil, s.wrap(ctx, "list activities", err)
	}
	defer rows.Close()
	acts := []Activity{}
	for rows.Next() {
		var a Activity
		var data sql.NullString
		if err := rows.Scan(&a.ID, dbTime{&a.Time}, &a.Type, &a.AgentID, &a.ChatID, &a.Worker, &a.PID, &data); err != nil {
			return nil, s.wrap(ctx, "list activities", err)
		}
		if data.Valid {
			if err := json.Unmarshal([]byte(data.String), &a.Data); err != nil {
				return nil, fmt.Errorf("list activities: data of %d: %w", a.ID, err)
			}
		}
		acts = append(acts, a)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap(ctx, "list activities", err)
	}
	if n := len(acts); n > 0 {
		s.feed.advance(acts[n-1].ID)
	}
	return acts, nil
}

// LastActivityID returns the highest activity id, 0 if there is none.
func (s *Store) LastActivityID(ctx context.Context) (int64, error) {
	id, err := s.maxActivityID(ctx)
	if err != nil {
		return 0, s.wrap(ctx, "read last activity id", err)
	}
	s.feed.advance(id)
	return id, nil
}

func (s *Store) maxActivityID(ctx context.Context) (int64, error) {
	var id sql.NullInt64
	err := s.db.QueryRowContext(ctx, `SELECT MAX(id) FROM activities`).Scan(&id)
	return id.Int64, err
}

// insertActivity inserts a in tx and sets a.ID. a.Time must be set. Call it
// last in a transaction: on PostgreSQL it takes the activity lock, held
// until the transaction ends (see postgresDialect), and whatever the
// transaction does after it lengthens every writer's wait.
func (s *Store) insertActivity(ctx context.Context, tx *sql.Tx, a *Activity) error {
	var data sql.NullString
	if len(a.Data) > 0 {
		b, err := json.Marshal(a.Data)
		if err != nil {
			return fmt.Errorf("encode %s data: %w", a.Type, err)
		}
		data = sql.NullString{String: string(b), Valid: true}
	}
	return s.queryRow(ctx, tx, s.d.insertActivity,
		timeArg(a.Time), a.Type, a.AgentID, a.ChatID, a.Worker, a.PID, s.host, data).Scan(&a.ID)
}
