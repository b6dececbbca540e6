package main

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// startFailure returns the error of the one "cannot start" line a server
// that failed to start logged, and fails the test unless that error is on
// stderr exactly once: a start-up failure is printed once, in the format
// of the logs.
func (s *server) startFailure(t *testing.T) string {
	t.Helper()
	lines := s.logs.find("cannot start", nil)
	if len(lines) != 1 {
		t.Fatalf("%d 'cannot start' lines, want 1; stderr:\n%s", len(lines), s.logs)
	}
	msg, _ := lines[0]["error"].(string)
	if msg == "" || lines[0]["level"] != "error" {
		t.Fatalf("'cannot start' line %v lacks an error at level error", lines[0])
	}
	enc, _ := json.Marshal(msg) // as the JSON line holds it
	if n := strings.Count(s.logs.String(), strings.Trim(string(enc), `"`)); n != 1 {
		t.Errorf("the start-up error %q is on stderr %d times, want once:\n%s", msg, n, s.logs)
	}
	return msg
}

// TestSecondCopySameDatabaseNamesThePort: a second copy of the server on
// the first one's port and database fails on the port, with the port in
// its one error line, and never reaches the store (whose instance-id
// advice would send the user the wrong way).
func TestSecondCopySameDatabaseNamesThePort(t *testing.T) {
	db := filepath.Join(t.TempDir(), "server.db")
	first := startServer(t, "WORKERS=1", "DATABASE_URL=sqlite:"+db)
	second := launch(t, "WORKERS=1", "DATABASE_URL=sqlite:"+db, "PORT="+strconv.Itoa(first.port),
		"CONTROL_SOCKET="+filepath.Join(t.TempDir(), "c.sock"))
	if code, want := second.wait(20*time.Second), documentedExit(t, "address is in use"); code != want {
		t.Errorf("second copy on the same port and database: exit %d, want %d", code, want)
	}
	want := "address 127.0.0.1:" + strconv.Itoa(first.port) + " already in use"
	if got := second.startFailure(t); got != want {
		t.Errorf("second copy's error = %q, want %q", got, want)
	}
	if out := second.logs.String(); strings.Contains(out, "instance") || len(second.logs.find("store ready", nil)) != 0 {
		t.Errorf("second copy reached the store:\n%s", out)
	}
}

// TestMissingDatabaseFolder: a folder the user named is never created; the
// error names it. The default data/ folder is created.
func TestMissingDatabaseFolder(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no", "such")
	s := launch(t, "WORKERS=1", "DATABASE_URL=sqlite:"+filepath.Join(missing, "x.db"))
	if code, want := s.wait(20*time.Second), documentedExit(t, "the store cannot be opened"); code != want {
		t.Errorf("missing folder: exit %d, want %d", code, want)
	}
	if got, want := s.startFailure(t), "folder "+missing+" does not exist"; !strings.Contains(got, want) {
		t.Errorf("error = %q, want it to contain %q", got, want)
	}
	if _, err := os.Stat(missing); !os.IsNotExist(err) {
		t.Errorf("the folder was created: %v", err)
	}

	d := startServer(t, "WORKERS=1", "DATABASE_URL="+defaultDatabaseURL)
	if _, err := os.Stat(filepath.Join(d.cmd.Dir, "data", "server.db")); err != nil {
		t.Errorf("default database: %v", err)
	}
}

// TestBusyPortFailurePrintedOnce: the busy-port error is one log line, also
// in the console format.
func TestBusyPortFailurePrintedOnce(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	s := launch(t, "PORT="+port, "LOG_FORMAT=console")
	s.wait(10 * time.Second)
	out := s.logs.String()
	want := "address 127.0.0.1:" + port + " already in use"
	if n := strings.Count(out, want); n != 1 || !strings.Contains(out, "ERR cannot start") {
		t.Errorf("console stderr has %q %d times, want once on an ERR cannot start line:\n%s", want, n, out)
	}
}

// TestMigrateReqNoticeOnlyWhereItMatters: the tcp_migrate_req notice is
// one info line with the sysctl command, only with several workers on
// per-slot sockets outside reload mode.
func TestMigrateReqNoticeOnlyWhereItMatters(t *testing.T) {
	const msg = "net.ipv4.tcp_migrate_req is 0: scaling down resets the connections queued on the removed worker's socket"
	off := tcpMigrateReq() == "0"
	for _, tc := range []struct {
		env  []string
		want bool
	}{
		{[]string{"WORKERS=2"}, off},
		{[]string{"WORKERS=1"}, false},
		{[]string{"WORKERS=2", "SOCKET_MODE=shared"}, false},
		{[]string{"WORKERS=2", "RELOAD=true", "RELOAD_DIRS=" + t.TempDir(), "RELOAD_BUILD="}, false},
	} {
		s := startServer(t, tc.env...)
		got := s.logs.find(msg, map[string]any{"level": "info", "fix": "sysctl -w net.ipv4.tcp_migrate_req=1"})
		if want := map[bool]int{true: 1, false: 0}[tc.want]; len(got) != want || strings.Count(s.logs.String(), "tcp_migrate_req is 0") != want {
			t.Errorf("%v (tcp_migrate_req %q): %d notices, want %d:\n%s", tc.env, tcpMigrateReq(), len(got), want, s.logs)
		}
		s.stop()
	}
}
