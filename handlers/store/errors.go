package store

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"
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
	// ErrInstanceInUse means another running server holds this Store's
	// host name (--instance-id) on the same database; see ClaimInstance.
	ErrInstanceInUse = errors.New("store: instance id in use")
	// ErrQueueFull means a background chat was refused because
	// Chat.QueueMax chats are already queued.
	ErrQueueFull = errors.New("store: chat queue full")
	// ErrDuplicate means an idempotency key already names a chat with the
	// same request; errors.As gives the *DuplicateError naming it.
	ErrDuplicate = errors.New("store: idempotency key already used")
	// ErrKeyReused means an idempotency key already names a chat with a
	// different request.
	ErrKeyReused = errors.New("store: idempotency key reused with another request")
	// ErrNoFolder means the SQLite file's folder does not exist and
	// Options.CreateFolder was not set.
	ErrNoFolder = errors.New("store: database folder does not exist")
	// ErrClosed means the Store was closed.
	ErrClosed = errors.New("store: closed")
)

// AgentLimitError is CreateAgent's error when Options.MaxAgents agents
// already exist. It matches ErrAgentLimit.
type AgentLimitError struct{ Max int }

// ErrAgentLimit matches every *AgentLimitError.
var ErrAgentLimit = errors.New("store: agent limit reached")

func (e *AgentLimitError) Error() string {
	return fmt.Sprintf("store: agent limit reached: %d agents exist", e.Max)
}
func (e *AgentLimitError) Is(target error) bool { return target == ErrAgentLimit }

// ErrBadCursor means an agent cursor (AgentPage.After) is not one that
// Agents returned.
var ErrBadCursor = errors.New("store: not a cursor this store returned")

// unavailableError keeps the driver's message and adds ErrUnavailable as an
// errors.Is target, so logs read "op subject: sqlite3: database is locked"
// and not a second prefix.
type unavailableError struct{ err error }

func (e *unavailableError) Error() string        { return e.err.Error() }
func (e *unavailableError) Unwrap() error        { return e.err }
func (e *unavailableError) Is(target error) bool { return target == ErrUnavailable }

// wrap prefixes err with op and classifies it. After Close every error is
// ErrClosed. A cancelled ctx wins over whatever the driver said about being
// interrupted, so callers see context.Canceled or context.DeadlineExceeded.
func (s *Store) wrap(ctx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	select {
	case <-s.done: // database/sql's own "database is closed", and the like
		return fmt.Errorf("%s: %w", op, ErrClosed)
	default:
	}
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%s: %w", op, cerr)
	}
	err = fmt.Errorf("%s: %w", op, err)
	if s.d.unavailable(err) {
		if s.d.diskError != nil && s.d.diskError(err) {
			err = s.probe.explain(filepath.Dir(s.path), err)
			s.diskFault.Store(&err)
		}
		return &unavailableError{err}
	}
	return err
}

// diskProbe explains a database's disk errors. SQLite answers "disk I/O
// error" for a read-only filesystem, a full disk and a failing one alike
// (the operating system's error is gone by the time the statement
// returns); a small synced write beside the database gets the operating
// system's own answer, such as "read-only file system" or "no space left
// on device". It probes at most once a second and reuses the answer.
type diskProbe struct {
	mu   sync.Mutex
	at   time.Time
	last error
}

func (p *diskProbe) explain(dir string, err error) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if time.Since(p.at) >= time.Second {
		p.last, p.at = probeWrite(dir), time.Now()
	}
	if p.last == nil {
		return err
	}
	return fmt.Errorf("%w (a test write beside the database failed: %v)", err, p.last)
}

// errProbeRunning is writable's answer while an earlier probe has not
// returned: on a disk that hangs, probes must not pile up.
var errProbeRunning = errors.New("a test write beside the database has not returned yet")

// writable probes dir now, unless a probe is running already.
func (p *diskProbe) writable(dir string) error {
	if !p.mu.TryLock() {
		return errProbeRunning
	}
	defer p.mu.Unlock()
	p.last, p.at = probeWrite(dir), time.Now()
	return p.last
}

// probeWrite creates, writes, syncs and removes a one-byte file in dir.
func probeWrite(dir string) error {
	f, err := os.CreateTemp(dir, ".corral-probe-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err = f.Write([]byte{'\n'}); err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
