package store

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ncruces/go-sqlite3"
	"github.com/ncruces/go-sqlite3/driver"
)

// checkOpenError checks err is one line naming path and saying want.
func checkOpenError(t *testing.T, err error, path, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("Open(%s) = nil error, want one saying %q", path, want)
	}
	msg := err.Error()
	if !strings.Contains(msg, path) || !strings.Contains(msg, want) || strings.Contains(msg, "\n") {
		t.Fatalf("Open(%s) error = %q, want one line naming the file and saying %q", path, msg, want)
	}
	t.Logf("error reads: %s", msg)
}

func TestOpenURLs(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	for _, tc := range []struct{ url, want string }{
		{"sqlite:data/a.db", filepath.Join(dir, "data/a.db")},
		{"sqlite://data/b.db", filepath.Join(dir, "data/b.db")},
		{"sqlite:" + dir + "/abs/c.db", filepath.Join(dir, "abs/c.db")},
		{"sqlite://" + dir + "/abs/d.db", filepath.Join(dir, "abs/d.db")},
		{"SQLite3:e.db", filepath.Join(dir, "e.db")},
		{"file:data/f.db", filepath.Join(dir, "data/f.db")},
		{"data/g.db", filepath.Join(dir, "data/g.db")},
		{"data/with:colon h.db", filepath.Join(dir, "data/with:colon h.db")},
		// SQLite's own URI form, after the scheme or alone.
		{"sqlite:file:" + dir + "/abs/i.db", filepath.Join(dir, "abs/i.db")},
		{"sqlite:file:data/j.db", filepath.Join(dir, "data/j.db")},
		{"sqlite:file://" + dir + "/abs/k.db", filepath.Join(dir, "abs/k.db")},
		{"sqlite3:FILE:l.db", filepath.Join(dir, "l.db")},
		{"file://" + dir + "/abs/m.db", filepath.Join(dir, "abs/m.db")},
	} {
		if p, ok := FilePath(tc.url); !ok || p != tc.want {
			t.Errorf("FilePath(%q) = %q, %v, want %q, true", tc.url, p, ok, tc.want)
		}
		s, err := Open(t.Context(), tc.url, Options{})
		if err != nil {
			t.Errorf("Open(%q) = %v", tc.url, err)
			continue
		}
		if s.Path() != tc.want {
			t.Errorf("Open(%q).Path() = %q, want %q", tc.url, s.Path(), tc.want)
		}
		if err := s.Migrate(t.Context()); err != nil {
			t.Errorf("Open(%q).Migrate() = %v", tc.url, err)
		}
		s.Close()
		if _, err := os.Stat(tc.want); err != nil {
			t.Errorf("Open(%q): %v", tc.url, err)
		}
	}

	// Port 1 on loopback refuses at once: PostgreSQL down at start.
	for _, tc := range []struct {
		url         string
		unsupported bool
		unavailable bool
		names       string // the error must say this
	}{
		{"postgres://corral:s3cret@127.0.0.1:1/corral", false, true, "127.0.0.1:1/corral"},
		{"postgresql://corral:s3cret@127.0.0.1:1/corral?sslmode=disable", false, true, "127.0.0.1:1/corral"},
		{"postgres://corral:s3cret@127.0.0.1:1/corral?sslmode=bogus", false, false, "sslmode"},
		{"mysql://corral:s3cret@db.example/corral", true, false, "mysql"},
		{"sqlite:", false, false, "file path"},
		{"sqlite::memory:", false, false, "file path"},
		{"sqlite:data/x.db?mode=ro", false, false, "query parameters"},
		{"sqlite:file:data/x.db?mode=ro", false, false, "query parameters"},
		{"sqlite:file:data/x.db#x", false, false, "query parameters"},
		{"file:data/x.db?cache=shared", false, false, "query parameters"},
		{"sqlite:file::memory:", false, false, "file path"},
		{"sqlite:file:", false, false, "file path"},
		{"file::memory:", false, false, "file path"},
	} {
		if p, ok := FilePath(tc.url); ok {
			t.Errorf("FilePath(%q) = %q, true, want false as Open refuses it", tc.url, p)
		}
		s, err := Open(t.Context(), tc.url, Options{})
		if err == nil {
			s.Close()
			t.Errorf("Open(%q) = nil error", tc.url)
			continue
		}
		if errors.Is(err, ErrUnsupported) != tc.unsupported || errors.Is(err, ErrUnavailable) != tc.unavailable {
			t.Errorf("Open(%q) = %v, ErrUnsupported %v ErrUnavailable %v, want %v and %v", tc.url, err,
				errors.Is(err, ErrUnsupported), errors.Is(err, ErrUnavailable), tc.unsupported, tc.unavailable)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("Open(%q) = %v, which echoes the password", tc.url, err)
		}
		if !strings.Contains(err.Error(), tc.names) {
			t.Errorf("Open(%q) = %v, want it to say %q", tc.url, err, tc.names)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "file:")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf(`a "file:" folder was created in the working directory: %v`, err)
	}
}

func TestOpenNotADatabase(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server.db")
	content := bytes.Repeat([]byte("this is a text file, not an SQLite database\n"), 200)
	if err := os.WriteFile(path, content, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Open(t.Context(), "sqlite:"+path, Options{})
	checkOpenError(t, err, path, "file is not a database")
	if got, _ := os.ReadFile(path); !bytes.Equal(got, content) {
		t.Fatalf("Open(%s) changed the file", path)
	}
}

func TestOpenUnderRegularFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file.txt")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(file, "db.sqlite")
	_, err := Open(t.Context(), "sqlite:"+path, Options{})
	checkOpenError(t, err, path, "not a directory")
}

func TestOpenDirectory(t *testing.T) {
	path := t.TempDir()
	_, err := Open(t.Context(), "sqlite:"+path, Options{})
	checkOpenError(t, err, path, "is a directory")
}

func TestOpenUnwritableFolder(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("running as root: file permissions do not stop root (TestOpenUnderRegularFile covers an unusable path)")
	}
	dir := filepath.Join(t.TempDir(), "ro")
	if err := os.Mkdir(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
	for _, path := range []string{filepath.Join(dir, "server.db"), filepath.Join(dir, "data", "server.db")} {
		_, err := Open(t.Context(), "sqlite:"+path, Options{})
		checkOpenError(t, err, path, "")
	}
}

func TestSchemaTooNew(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server.db")
	s := openSQLiteTest(t, path, "h")
	ctx := t.Context()
	if err := s.Migrate(ctx); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	var v int
	if err := s.db.QueryRowContext(ctx, `SELECT MAX(version) FROM schema_version`).Scan(&v); err != nil || v != s.SchemaVersion() {
		t.Fatalf("schema_version after Migrate = %d, %v, want %d", v, err, s.SchemaVersion())
	}
	if _, err := s.db.ExecContext(ctx, `INSERT INTO schema_version (version, applied_at) VALUES (99, 'future')`); err != nil {
		t.Fatal(err)
	}

	err := s.Migrate(ctx)
	if !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("Migrate() on a version 99 database = %v, want ErrSchemaTooNew", err)
	}
	_, err = Open(ctx, "sqlite:"+path, Options{})
	if !errors.Is(err, ErrSchemaTooNew) {
		t.Fatalf("Open() of a version 99 database = %v, want ErrSchemaTooNew", err)
	}
	checkOpenError(t, err, path, fmt.Sprintf("schema version 99, this binary knows up to %d", s.SchemaVersion()))
}

// TestWriteHonoursContextWhileLocked holds the write lock from a plain
// connection: a write waits on the busy timeout, and its context ends it.
func TestWriteHonoursContextWhileLocked(t *testing.T) {
	s := newMigrated(t)
	raw, err := driver.Open(sqliteDSN(s.Path()))
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	tx, err := raw.BeginTx(t.Context(), nil) // BEGIN IMMEDIATE: holds the write lock
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()

	t0 := time.Now()
	_, err = s.CreateAgent(ctxTimeout(t, 200*time.Millisecond), Agent{Name: "blocked"}, Origin{})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("CreateAgent() while another connection writes = %v, want context.DeadlineExceeded", err)
	}
	if d := time.Since(t0); d > 5*time.Second {
		t.Fatalf("CreateAgent() took %v to notice its deadline", d)
	}
	// Reads go on under WAL.
	if _, _, err := s.Agents(t.Context(), AgentPage{}); err != nil {
		t.Fatalf("Agents() while another connection writes = %v", err)
	}
	tx.Rollback()
	if _, err := s.CreateAgent(t.Context(), Agent{Name: "after"}, Origin{}); err != nil {
		t.Fatalf("CreateAgent() after the lock is gone = %v", err)
	}
}

func TestUnavailableErrors(t *testing.T) {
	s := newMigrated(t)
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{sqlite3.BUSY, true},
		{sqlite3.BUSY_TIMEOUT, true},
		{sqlite3.LOCKED, true},
		{sqlite3.READONLY, true},
		{sqlite3.FULL, true},
		{sqlite3.IOERR_WRITE, true},
		{sqlite3.CONSTRAINT, false},
		{sql.ErrNoRows, false},
		{ErrNotFound, false},
	} {
		err := s.wrap(context.Background(), "op subject", tc.err)
		if errors.Is(err, ErrUnavailable) != tc.want {
			t.Errorf("wrap(%v): errors.Is(ErrUnavailable) = %v, want %v", tc.err, !tc.want, tc.want)
		}
		if !errors.Is(err, tc.err) || !strings.HasPrefix(err.Error(), "op subject: ") {
			t.Errorf("wrap(%v) = %q, want it prefixed and still matching the cause", tc.err, err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.wrap(ctx, "op", sqlite3.INTERRUPT); !errors.Is(err, context.Canceled) {
		t.Errorf("wrap(interrupted, cancelled ctx) = %v, want context.Canceled", err)
	}
}

// TestClosedStoreSaysSo: after Close, reads and writes fail with ErrClosed
// (database/sql's own "database is closed" is not something a caller can
// test for), so that a background loop knows to stop.
func TestClosedStoreSaysSo(t *testing.T) {
	ctx := t.Context()
	s, err := Open(ctx, "sqlite:"+filepath.Join(t.TempDir(), "server.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = s.LastActivityID(ctx)
	if !errors.Is(err, ErrClosed) {
		t.Errorf("LastActivityID after Close = %v, want ErrClosed", err)
	}
	_, err = s.Activities(ctx, Filter{Limit: 1})
	if !errors.Is(err, ErrClosed) {
		t.Errorf("Activities after Close = %v, want ErrClosed", err)
	}
	_, err = s.ChatByID(ctx, "c1")
	if !errors.Is(err, ErrClosed) {
		t.Errorf("ChatByID after Close = %v, want ErrClosed", err)
	}
	_, err = s.StartChat(ctx, Chat{AgentID: DefaultAgentID, Message: "m"})
	if !errors.Is(err, ErrClosed) {
		t.Errorf("StartChat after Close = %v, want ErrClosed", err)
	}
}

// TestReadOnlyFile: SQLite opens a file it may not write read-only without
// saying so; Open must.
func TestReadOnlyFile(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("running as root: file permissions do not stop root")
	}
	path := filepath.Join(t.TempDir(), "server.db")
	s := openSQLiteTest(t, path, "h")
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Chmod(path, 0o444); err != nil {
		t.Fatal(err)
	}
	_, err := Open(t.Context(), "sqlite:"+path, Options{})
	checkOpenError(t, err, path, "")
	if msg := err.Error(); !strings.Contains(msg, "permission denied") && !strings.Contains(msg, "readonly") {
		t.Fatalf("Open(read-only file) = %q, want it to say why", msg)
	}
}

// TestExistingDatabaseInUnwritableFolder: the file is writable but SQLite
// cannot create the -wal and -shm files next to it.
func TestExistingDatabaseInUnwritableFolder(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("running as root: file permissions do not stop root")
	}
	dir := filepath.Join(t.TempDir(), "ro")
	path := filepath.Join(dir, "server.db")
	s, err := Open(t.Context(), "sqlite:"+path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := os.Chmod(dir, 0o555); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(dir, 0o755) })
	_, err = Open(t.Context(), "sqlite:"+path, Options{})
	checkOpenError(t, err, path, "")
}
