package store

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
)

// ChatDelta is text a background chat's attempt produced, for
// AppendChatEvents.
type ChatDelta struct {
	ChatID  string
	Attempt int
	Text    string
}

// ChatEvent is one stored batch of deltas. Seq numbers a chat's events
// from 1, in order; a client resumes after the last Seq it saw.
type ChatEvent struct {
	Seq     int64
	Attempt int
	Text    string
}

// AppendChatEvents stores each delta as the next event of its chat, all in
// one transaction. Callers batch deltas (many chats, many tokens) into one
// call, so that a busy worker writes a few transactions a second rather
// than one per token.
func (s *Store) AppendChatEvents(ctx context.Context, deltas []ChatDelta) error {
	if len(deltas) == 0 {
		return nil
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		for _, d := range deltas {
			if _, err := tx.ExecContext(ctx, s.q(`INSERT INTO chat_events (chat_id, seq, attempt, text)
SELECT ?, COALESCE(MAX(seq), 0) + 1, ?, ? FROM chat_events WHERE chat_id = ?`), d.ChatID, d.Attempt, d.Text, d.ChatID); err != nil {
				return err
			}
		}
		return nil
	})
	return s.wrap(ctx, "append chat events", err)
}

// ChatEvents returns at most limit events of chatID with Seq > after, in
// order; never nil.
func (s *Store) ChatEvents(ctx context.Context, chatID string, after int64, limit int) ([]ChatEvent, error) {
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT seq, attempt, text FROM chat_events
WHERE chat_id = ? AND seq > ? ORDER BY seq LIMIT ?`), chatID, after, limit)
	if err != nil {
		return nil, s.wrap(ctx, "read chat events", err)
	}
	defer rows.Close()
	evs := []ChatEvent{}
	for rows.Next() {
		var e ChatEvent
		if err := rows.Scan(&e.Seq, &e.Attempt, &e.Text); err != nil {
			return nil, s.wrap(ctx, "read chat events", err)
		}
		evs = append(evs, e)
	}
	if err := rows.Err(); err != nil {
		return nil, s.wrap(ctx, "read chat events", err)
	}
	return evs, nil
}

// encodeData returns data as a JSON object for a text column, or NULL.
func encodeData(data map[string]any) (sql.NullString, error) {
	if len(data) == 0 {
		return sql.NullString{}, nil
	}
	b, err := json.Marshal(data)
	if err != nil {
		return sql.NullString{}, fmt.Errorf("encode data: %w", err)
	}
	return sql.NullString{String: string(b), Valid: true}, nil
}
