package store

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// helperEnv, when set, makes the test binary a helper process (see
// process_test.go) instead of running tests: the multi-process tests
// re-execute it, so "another worker" is a real other process.
const helperEnv = "CORRAL_STORE_TEST_HELPER"

func TestMain(m *testing.M) {
	switch mode := os.Getenv(helperEnv); mode {
	case "":
		os.Exit(m.Run())
	case "writer":
		os.Exit(runWriter())
	case "waker":
		os.Exit(runWaker())
	default:
		fmt.Fprintf(os.Stderr, "unknown %s %q\n", helperEnv, mode)
		os.Exit(2)
	}
}

// openSQLiteTest opens the database at path with host and closes it when
// the test ends.
func openSQLiteTest(t testing.TB, path, host string) *Store {
	t.Helper()
	s, err := Open(t.Context(), "sqlite:"+path, Options{Host: host})
	if err != nil {
		t.Fatalf("Open(%s) = %v", path, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close() = %v", err)
		}
	})
	return s
}

// newMigrated returns a migrated store on a new file in t.TempDir().
func newMigrated(t testing.TB) *Store {
	t.Helper()
	s := openSQLiteTest(t, filepath.Join(t.TempDir(), "data", "server.db"), "test-host")
	if err := s.Migrate(t.Context()); err != nil {
		t.Fatalf("Migrate() = %v", err)
	}
	return s
}

// waitFor polls cond until it returns nil or d passes, then fails with
// cond's last error, which says what was expected.
func waitFor(t *testing.T, d time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v: %v", d, err)
		}
		time.Sleep(5 * time.Millisecond) // polling interval, not synchronization
	}
}

// ctxTimeout returns a context that ends with the test or after d.
func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
