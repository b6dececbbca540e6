package store

import (
	"context"
	"errors"
	"fmt"
)

// Sentinel errors. Callers branch with errors.Is; the text is for logs.
var (
	// ErrNotFound means the agent or chat does not exist.
	ErrNotFound = errors.New("store: not found")
	// ErrExists means a caller-chosen agent or chat id is already taken.
	ErrExists = errors.New("store: already exists")
	// ErrChatFinished means FinishChat found the chat already finished:
	// a chat finishes exactly once.
	ErrChatFinished = errors.New("store: chat already finished")
	// ErrSchemaTooNew means the database was migrated by a newer binary.
	ErrSchemaTooNew = errors.New("store: database schema is newer than this binary")
	// ErrUnsupported means the database URL names a backend this build
	// cannot open.
	ErrUnsupported = errors.New("store: unsupported database")
	// ErrUnavailable wraps errors that mean the database cannot serve right
	// now (busy or locked past the busy timeout, read-only, disk full, I/O
	// error, cannot open): the request may succeed later, so HTTP answers 503.
	ErrUnavailable = errors.New("store: database unavailable")
	// ErrClosed means the Store was closed.
	ErrClosed = errors.New("store: closed")
)

// unavailableError keeps the driver's message and adds ErrUnavailable as an
// errors.Is target, so logs read "op subject: sqlite3: database is locked"
// and not a second prefix.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string        { return e.err.Error() }
func (e *unavailableError) Unwrap() error        { return e.err }
func (e *unavailableError) Is(target error) bool { return target == ErrUnavailable }

// wrap prefixes err with op and classifies it. A cancelled ctx wins over
// whatever the driver said about being interrupted, so callers see
// context.Canceled or context.DeadlineExceeded.
func (s *Store) wrap(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%s: %w", op, cerr)
	}
	err = fmt.Errorf("%s: %w", op, err)
	if s.d.unavailable(err) {
		return &unavailableError{err}
	}
	return err
}
