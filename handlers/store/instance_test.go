package store

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestTakeOverInstanceSQLite: a new master keeps the claim it inherits
// while the old one lets go, and claims its own instance id when the old
// master's claim was another id's.
func TestTakeOverInstanceSQLite(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "server.db")
	// handOver shares a claim's open file description, as the upgrade's
	// file passing does.
	handOver := func(s *Store) *os.File {
		t.Helper()
		fd, err := syscall.Dup(int(s.InstanceClaim().Fd()))
		if err != nil {
			t.Fatal(err)
		}
		return os.NewFile(uintptr(fd), "claim")
	}
	old := openSQLiteTest(t, path, "host-a")
	if err := old.ClaimInstance(ctx); err != nil {
		t.Fatalf("ClaimInstance(host-a) = %v", err)
	}
	heir := openSQLiteTest(t, path, "host-a")
	if err := heir.TakeOverInstance(handOver(old)); err != nil {
		t.Fatalf("TakeOverInstance(host-a's claim) = %v", err)
	}
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	if err := openSQLiteTest(t, path, "host-a").ClaimInstance(ctx); !errors.Is(err, ErrInstanceInUse) {
		t.Errorf("ClaimInstance(host-a) after the old master closed = %v, want ErrInstanceInUse: the heir holds it", err)
	}

	other := openSQLiteTest(t, path, "host-z")
	if err := other.TakeOverInstance(handOver(heir)); err != nil {
		t.Fatalf("TakeOverInstance(host-a's claim) by host-z = %v, want host-z's own claim", err)
	}
	if err := openSQLiteTest(t, path, "host-z").ClaimInstance(ctx); !errors.Is(err, ErrInstanceInUse) {
		t.Errorf("ClaimInstance(host-z) after host-z took over host-a's claim = %v, want ErrInstanceInUse", err)
	}
	if err := other.TakeOverInstance(nil); err != nil {
		t.Errorf("TakeOverInstance again = %v, want nil (claimed already)", err)
	}
	if err := openSQLiteTest(t, path, "host-b").TakeOverInstance(nil); err != nil {
		t.Errorf("TakeOverInstance(nothing) of a free id = %v, want a claim of its own", err)
	}
	if err := openSQLiteTest(t, path, "host-a").TakeOverInstance(nil); !errors.Is(err, ErrInstanceInUse) {
		t.Errorf("TakeOverInstance(nothing) of a held id = %v, want ErrInstanceInUse", err)
	}
}
