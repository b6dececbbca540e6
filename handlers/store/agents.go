package store

import (
	"context"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Agent is a named system prompt and model that chats run against.
type Agent struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	SystemPrompt string    `json:"system_prompt"`
	Model        string    `json:"model"` // "" means the provider's default
	CreatedAt    time.Time `json:"created_at"`
}

// Origin says who wrote a row: the worker slot (0 for the supervisor) and
// the process id.
type Origin struct {
	Worker int `json:"worker"`
	PID    int `json:"pid"`
}

// CreateAgent stores a and an "agent.created" activity in one transaction
// and returns the stored agent. An empty a.ID gets a random 16-hex-character
// id; a taken one returns ErrExists. a.CreatedAt is ignored and set now.
// When Options.MaxAgents agents exist already it returns an
// *AgentLimitError (ErrAgentLimit), counted in the same transaction, so
// concurrent creations from any number of processes never pass the limit.
// Validating names and prompts is the caller's job.
func (s *Store) CreateAgent(ctx context.Context, a Agent, by Origin) (Agent, error) {
	if a.ID == "" {
		a.ID = newID()
	}
	var act Activity
	err := s.write(ctx, func(tx *sql.Tx) error {
		if s.maxAgents > 0 {
			if s.d.lockAgents != "" {
				if _, err := tx.ExecContext(ctx, s.d.lockAgents); err != nil {
					return err
				}
			}
			var n int
			if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM agents`).Scan(&n); err != nil {
				return err
			}
			if n >= s.maxAgents {
				return &AgentLimitError{Max: s.maxAgents}
			}
		}
		var err error
		a, act, err = s.insertAgent(ctx, tx, a, by)
		return err
	})
	if err != nil {
		return Agent{}, s.wrap(ctx, "create agent "+a.ID, err)
	}
	s.feed.advance(act.ID)
	return a, nil
}

// insertAgent inserts a and its "agent.created" activity in tx.
func (s *Store) insertAgent(ctx context.Context, tx *sql.Tx, a Agent, by Origin) (Agent, Activity, error) {
	a.CreatedAt = now()
	res, err := tx.ExecContext(ctx, s.q(`INSERT INTO agents (id, name, system_prompt, model, created_at)
VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`),
		a.ID, a.Name, a.SystemPrompt, a.Model, timeArg(a.CreatedAt))
	if err != nil {
		return Agent{}, Activity{}, err
	}
	if n, err := res.RowsAffected(); err != nil {
		return Agent{}, Activity{}, err
	} else if n == 0 {
		return Agent{}, Activity{}, ErrExists
	}
	act := Activity{
		Time: a.CreatedAt, Type: "agent.created", AgentID: a.ID,
		Worker: by.Worker, PID: by.PID, Data: map[string]any{"name": a.Name},
	}
	if err := s.insertActivity(ctx, tx, &act); err != nil {
		return Agent{}, Activity{}, err
	}
	return a, act, nil
}

// Agent returns the agent with id, or an error matching ErrNotFound.
func (s *Store) Agent(ctx context.Context, id string) (Agent, error) {
	a := Agent{ID: id}
	err := s.queryRow(ctx, nil, `SELECT name, system_prompt, model, created_at FROM agents WHERE id = ?`, id).
		Scan(&a.Name, &a.SystemPrompt, &a.Model, dbTime{&a.CreatedAt})
	if errors.Is(err, sql.ErrNoRows) {
		err = ErrNotFound
	}
	if err != nil {
		return Agent{}, s.wrap(ctx, "read agent "+id, err)
	}
	return a, nil
}

// Limits of AgentPage.Limit.
const (
	DefaultAgentLimit = 100
	MaxAgentLimit     = 500
)

// AgentPage selects a page of agents, oldest first (ties by id).
type AgentPage struct {
	// After is a cursor Agents returned, or "" for the first page.
	After string
	// Limit is the most agents returned, clamped to 1..MaxAgentLimit; 0
	// means DefaultAgentLimit.
	Limit int
}

// Agents returns the page p selects (never nil) and the cursor of the page
// after it, "" when no agent follows. A cursor stays valid when its agent
// is deleted: it names a position, not a row. A cursor Agents did not
// return is an error matching ErrBadCursor.
func (s *Store) Agents(ctx context.Context, p AgentPage) ([]Agent, string, error) {
	switch {
	case p.Limit <= 0:
		p.Limit = DefaultAgentLimit
	case p.Limit > MaxAgentLimit:
		p.Limit = MaxAgentLimit
	}
	query := `SELECT id, name, system_prompt, model, created_at FROM agents`
	var args []any
	if p.After != "" {
		at, id, err := parseAgentCursor(p.After)
		if err != nil {
			return nil, "", fmt.Errorf("list agents after %q: %w", p.After, err)
		}
		// Spelled out rather than a row value, which both engines know but
		// compare with their own types; the leading >= makes it a range
		// scan of agents_created.
		query += ` WHERE created_at >= ? AND (created_at > ? OR (created_at = ? AND id > ?))`
		args = append(args, timeArg(at), timeArg(at), timeArg(at), id)
	}
	// One more than asked says whether another page follows.
	query += ` ORDER BY created_at, id LIMIT ?`
	args = append(args, p.Limit+1)
	rows, err := s.db.QueryContext(ctx, s.q(query), args...)
	if err != nil {
		return nil, "", s.wrap(ctx, "list agents", err)
	}
	defer rows.Close()
	agents := []Agent{}
	for rows.Next() {
		var a Agent
		if err := rows.Scan(&a.ID, &a.Name, &a.SystemPrompt, &a.Model, dbTime{&a.CreatedAt}); err != nil {
			return nil, "", s.wrap(ctx, "list agents", err)
		}
		agents = append(agents, a)
	}
	if err := rows.Err(); err != nil {
		return nil, "", s.wrap(ctx, "list agents", err)
	}
	next := ""
	if len(agents) > p.Limit {
		agents = agents[:p.Limit]
		last := agents[len(agents)-1]
		next = agentCursor(last.CreatedAt, last.ID)
	}
	return agents, next, nil
}

// agentCursor names the position after the agent created at with id:
// URL-safe base64 of "created_at id", opaque to clients.
func agentCursor(at time.Time, id string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(timeArg(at) + " " + id))
}

func parseAgentCursor(c string) (time.Time, string, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err != nil {
		return time.Time{}, "", ErrBadCursor
	}
	ts, id, ok := strings.Cut(string(b), " ")
	if !ok || id == "" {
		return time.Time{}, "", ErrBadCursor
	}
	at, err := time.Parse(timeLayout, ts)
	if err != nil {
		return time.Time{}, "", ErrBadCursor
	}
	return at, id, nil
}

// DeleteAgent deletes the agent with id and writes an "agent.deleted"
// activity in the same transaction; ErrNotFound if there is none. Its chats
// and activities stay: they are history.
func (s *Store) DeleteAgent(ctx context.Context, id string, by Origin) error {
	var act Activity
	err := s.write(ctx, func(tx *sql.Tx) error {
		var name string
		err := tx.QueryRowContext(ctx, s.q(`DELETE FROM agents WHERE id = ? RETURNING name`), id).Scan(&name)
		if errors.Is(err, sql.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		act = Activity{
			Time: now(), Type: "agent.deleted", AgentID: id,
			Worker: by.Worker, PID: by.PID, Data: map[string]any{"name": name},
		}
		return s.insertActivity(ctx, tx, &act)
	})
	if err != nil {
		return s.wrap(ctx, fmt.Sprintf("delete agent %s", id), err)
	}
	s.feed.advance(act.ID)
	return nil
}
