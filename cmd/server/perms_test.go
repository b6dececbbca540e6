package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// umaskScript writes a shell script that runs the test binary under
// umask mask (say "000"), as a user whose shell has a permissive umask
// would start the server, and returns its path.
func umaskScript(t *testing.T, mask string) string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(t.TempDir(), "umask-"+mask+".sh")
	writeExecutable(t, script, []byte("#!/bin/sh\numask "+mask+"\nexec '"+exe+"' \"$@\"\n"))
	return script
}

// TestDataFilesPrivate starts the server under umask 000 with the default
// database, sqlite:data/server.db, writes to it, and checks that data/ is
// 0700 and that every file in it (the database, -wal, -shm, the instance
// lock, the control socket) is readable by the server's user only. A
// database file another user could already read is reported at start.
func TestDataFilesPrivate(t *testing.T) {
	t.Parallel()
	s := startExe(t, umaskScript(t, "000"), nil, "DATABASE_URL=")
	var agent struct{ ID string }
	if _, err := s.postJSON("/api/agents", map[string]any{"name": "private", "system_prompt": "a secret prompt"}, &agent); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(s.cmd.Dir, "data")
	fi, err := os.Stat(data)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o700 {
		t.Errorf("data/ mode = %04o, want 0700", got)
	}
	ents, err := os.ReadDir(data)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, e := range ents {
		fi, err := e.Info()
		if err != nil {
			t.Fatal(err)
		}
		seen[e.Name()] = true
		if got := fi.Mode().Perm(); got&0o077 != 0 {
			t.Errorf("data/%s mode = %04o, want no access for group and others", e.Name(), got)
		}
	}
	for _, want := range []string{"server.db", "server.db-wal", "server.db-shm", "server.sock"} {
		if !seen[want] {
			t.Errorf("no data/%s among %v", want, seen)
		}
	}
	if w := s.logs.find("database file readable by other local users; chmod 600 it", nil); len(w) != 0 {
		t.Errorf("warned about files the server created: %v", w)
	}
	s.stop()

	// A database an earlier version (or a hand) left readable by others.
	old := filepath.Join(t.TempDir(), "old.db")
	if err := os.WriteFile(old, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(old, 0o644); err != nil {
		t.Fatal(err)
	}
	s = startServer(t, "DATABASE_URL=sqlite:"+old)
	if w := s.logs.find("database file readable by other local users; chmod 600 it", map[string]any{"path": old, "mode": "0644"}); len(w) != 1 {
		t.Errorf("warnings about %s = %v, want one; log:\n%s", old, w, s.logs)
	}
}

// TestUDSModeFromUmask runs the master under strace and checks that the
// --uds socket (0666) and the control socket (0600) get their modes at
// bind, through the umask: no chmod ever names either path. A chmod after
// bind follows a symlink another user can put at the path meanwhile.
func TestUDSModeFromUmask(t *testing.T) {
	t.Parallel()
	strace, err := exec.LookPath("strace")
	if err != nil {
		t.Skip("strace not installed")
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sock, control, trace := filepath.Join(dir, "api.sock"), filepath.Join(dir, "control.sock"), filepath.Join(t.TempDir(), "strace.out")
	// -D: strace is the grandchild, so the process started is the master.
	s := launchExe(t, strace, []string{"-D", "-f", "-qq", "-e", "signal=none", "-e", "trace=chmod,fchmodat,bind", "-o", trace, exe},
		"UDS="+sock, "CONTROL_SOCKET="+control, "WORKERS=1")
	s.waitStarted(t)
	for path, want := range map[string]os.FileMode{sock: 0o666, control: 0o600} {
		if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != want {
			t.Errorf("socket %s: %v %v, want mode %04o", path, fi, err, want)
		}
	}
	s.stop()
	b, err := os.ReadFile(trace)
	if err != nil {
		t.Fatal(err)
	}
	binds := 0
	for _, line := range strings.Split(string(b), "\n") {
		if !strings.Contains(line, sock) && !strings.Contains(line, control) {
			continue
		}
		// With -f each line starts with the thread id, padded with spaces.
		if _, call, _ := strings.Cut(line, " "); strings.HasPrefix(strings.TrimSpace(call), "bind(") {
			binds++
		} else {
			t.Errorf("a call other than bind on a socket path: %s", line)
		}
	}
	if binds != 2 {
		t.Errorf("%d binds on the two socket paths, want 2; strace:\n%s", binds, b)
	}
}
