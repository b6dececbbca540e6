package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
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
	t.Parallel()
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

// TestHostThatDoesNotResolve: a well-formed host name that does not
// resolve fails at start with one error naming the setting and the name
// (".invalid" never resolves, RFC 6761).
func TestHostThatDoesNotResolve(t *testing.T) {
	t.Parallel()
	s := launch(t, "WORKERS=1", "HOST=no-such-host.invalid")
	if code, want := s.wait(60*time.Second), documentedExit(t, "address is in use"); code != want {
		t.Errorf("unresolvable HOST: exit %d, want %d", code, want)
	}
	got := s.startFailure(t)
	if want := `--host (HOST): address no-such-host.invalid:`; !strings.HasPrefix(got, want) {
		t.Errorf("error = %q, want it to start with %q", got, want)
	}
	if want := `: host name "no-such-host.invalid" does not resolve (`; !strings.Contains(got, want) {
		t.Errorf("error = %q, want it to contain %q", got, want)
	}
}

// TestMissingDatabaseFolder: a folder the user named is never created; the
// error names it. The default data/ folder is created.
func TestMissingDatabaseFolder(t *testing.T) {
	t.Parallel()
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
	t.Parallel()
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
	t.Parallel()
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

// workerTitleRE matches a worker's process title, which has no worker count.
var workerTitleRE = regexp.MustCompile(`: worker [0-9]+ \[gen [0-9]+\]$`)

// processTitle returns pid's title as ps shows it.
func processTitle(pid int) string {
	b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return strings.TrimRight(strings.ReplaceAll(string(b), "\x00", " "), " ")
}

// TestTitlesAfterScaling: the master's title counts its workers in
// English ("1 worker", "2 workers") and follows scaling; worker titles
// carry no count, so none goes stale.
func TestTitlesAfterScaling(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	master := s.cmd.Process.Pid
	where := "127.0.0.1:" + strconv.Itoa(s.port)
	if got := processTitle(master); !strings.HasSuffix(got, ": master [1 worker, "+where+"]") {
		t.Errorf("master title = %q, want ...: master [1 worker, %s]", got, where)
	}
	s.cmd.Process.Signal(syscall.SIGTTIN)
	waitFor(t, 20*time.Second, func() error {
		if got := processTitle(master); !strings.HasSuffix(got, ": master [2 workers, "+where+"]") {
			return fmt.Errorf("master title = %q, want ...: master [2 workers, %s]", got, where)
		}
		pids := s.workerPIDs()
		if len(pids) != 2 {
			return fmt.Errorf("workers %v, want 2", pids)
		}
		for _, pid := range pids {
			if got := processTitle(pid); !workerTitleRE.MatchString(got) {
				return fmt.Errorf("worker title = %q, want ...: worker N [gen G]", got)
			}
		}
		return nil
	})
}

// decimalField matches a number with a fraction in a JSON line, with its
// field's name.
var decimalField = regexp.MustCompile(`"([a-z_]+)":(-?[0-9]+)\.([0-9]+)`)

// TestDurationsCarryTheirUnit: every number with a fraction in the logs
// and in status --json is a duration whose field names its unit (_ms in
// logs, _s in the status) and has at most 3 decimals.
func TestDurationsCarryTheirUnit(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "c.sock")
	s := startServer(t, "WORKERS=2", "ACCESS_LOG=true", "CONTROL_SOCKET="+sock)
	if _, err := s.health(fresh); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := cli(t, "status", "--json", "--control-socket", sock)
	if code != 0 {
		t.Fatalf("server status --json: exit %d %s", code, errOut)
	}
	check := func(where, text, unit string) {
		t.Helper()
		fields := decimalField.FindAllStringSubmatch(text, -1)
		if len(fields) == 0 {
			t.Errorf("%s: no decimal field", where)
		}
		for _, m := range fields {
			if !strings.HasSuffix(m[1], unit) || len(m[3]) > 3 {
				t.Errorf("%s: %q = %s.%s, want a field ending in %s with at most 3 decimals", where, m[1], m[2], m[3], unit)
			}
		}
	}
	check("status --json", strings.Join(strings.Fields(out), ""), "_s")
	s.stop()
	check("log", s.logs.String(), "_ms")
	for _, f := range []string{"startup_ms", "uptime_ms", "budget_ms", "duration_ms"} {
		if !strings.Contains(s.logs.String(), `"`+f+`":`) {
			t.Errorf("no %s field in the log:\n%s", f, s.logs)
		}
	}
}

// TestSignalsAndStopReasons: the master names signals as kill(1) does,
// with what they ask; a worker told to drain logs the master's reason and
// the budget the master enforces, in a HUP roll and in reload mode.
func TestSignalsAndStopReasons(t *testing.T) {
	t.Parallel()
	s := startServer(t, "WORKERS=1")
	s.cmd.Process.Signal(syscall.SIGTTIN)
	waitFor(t, 20*time.Second, func() error {
		if len(s.logs.find("signal received", map[string]any{"signal": "SIGTTIN (add a worker)"})) != 1 {
			return fmt.Errorf("no signal received line for SIGTTIN (add a worker):\n%s", s.logs)
		}
		if n := len(s.workerPIDs()); n != 2 {
			return fmt.Errorf("%d workers, want 2", n)
		}
		return nil
	})
	s.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, 20*time.Second, func() error {
		if len(s.logs.find("signal received", map[string]any{"signal": "SIGHUP (rolling restart)"})) != 1 {
			return fmt.Errorf("no signal received line for SIGHUP (rolling restart)")
		}
		if n := len(s.logs.find("drain started", map[string]any{"reason": "hup"})); n != 2 {
			return fmt.Errorf("%d workers drained with reason hup, want 2:\n%s", n, s.logs)
		}
		return nil
	})
	for _, l := range s.logs.find("drain started", nil) {
		// launch sets TIMEOUT_GRACEFUL_SHUTDOWN=10s.
		if l["budget_ms"] != 10000.0 || (l["reason"] != "hup" && l["reason"] != "rewire") {
			t.Errorf("drain started %v, want reason hup or rewire with budget_ms 10000", l)
		}
	}
	if n := strings.Count(s.logs.String(), "signal terminated"); n != 0 {
		t.Errorf("%d lines still say \"signal terminated\":\n%s", n, s.logs)
	}

	dir := t.TempDir()
	r := startServer(t, "RELOAD=true", "RELOAD_DIRS="+dir, "RELOAD_BUILD=", "RELOAD_DRAIN=2s", "RELOAD_DELAY=10ms")
	if err := os.WriteFile(filepath.Join(dir, "settings.json"), []byte("{}"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, func() error {
		lines := r.logs.find("drain started", nil)
		if len(lines) != 1 {
			return fmt.Errorf("%d drain started lines after a reload, want 1:\n%s", len(lines), r.logs)
		}
		if lines[0]["reason"] != "reload" || lines[0]["budget_ms"] != 2000.0 {
			return fmt.Errorf("drain started %v, want reason reload and budget_ms 2000 (RELOAD_DRAIN)", lines[0])
		}
		return nil
	})
}

// TestUnknownFlagIsTwoLines: a mistyped flag exits with the documented
// status, the error with a suggestion and one line pointing at --help.
func TestUnknownFlagIsTwoLines(t *testing.T) {
	t.Parallel()
	code, out, errOut := cli(t, "--wokers", "3")
	if want := documentedExit(t, "a bad flag"); code != want {
		t.Errorf("exit %d, want %d", code, want)
	}
	want := "server: unknown flag: --wokers (did you mean --workers?)\nRun \"server --help\" for every flag and variable.\n"
	if errOut != want || out != "" {
		t.Errorf("stderr %q, stdout %q; want stderr %q", errOut, out, want)
	}
}

// TestMakeInstall runs the Makefile's install recipe (its build step taken
// as done: the test binary stands in for ./server) into a PREFIX, twice,
// with a server started from the first copy in between: the second install
// puts a new file in place, so the running server keeps its own, and the
// installed server answers `server --version`.
func TestMakeInstall(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("make not installed (.ci/run installs it)")
		}
		t.Skip("make not installed")
	}
	makefile, err := filepath.Abs("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	build := t.TempDir()
	exe, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	writeExecutable(t, filepath.Join(build, "server"), exe)
	prefix := t.TempDir()
	install := func() {
		t.Helper()
		// -o build: the build step counts as done; the recipe installs ./server.
		out, err := exec.Command("make", "-s", "-f", makefile, "-C", build, "-o", "build", "install", "PREFIX="+prefix).CombinedOutput()
		if err != nil {
			t.Fatalf("make install: %v\n%s", err, out)
		}
	}
	install()
	bin := filepath.Join(prefix, "bin", "server")
	first, err := os.Stat(bin)
	if err != nil {
		t.Fatalf("make install PREFIX=%s: %v", prefix, err)
	}
	if first.Mode().Perm() != 0o755 {
		t.Errorf("installed mode %v, want 0755", first.Mode().Perm())
	}
	s := startExe(t, bin, nil, "WORKERS=1")
	install()
	second, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	if os.SameFile(first, second) {
		t.Error("the second install wrote into the running server's file; want a new file")
	}
	if target, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", s.cmd.Process.Pid)); err != nil || !strings.HasSuffix(target, "(deleted)") {
		t.Errorf("the running master's executable is %q (%v), want the first copy, now unlinked", target, err)
	}
	if h, err := s.health(&http.Client{Timeout: 5 * time.Second}); err != nil || h.Status != "ok" {
		t.Errorf("GET /health after the second install: %+v, %v", h, err)
	}
	s.stop()
	cmd := exec.Command(bin, "--version")
	cmd.Env = append(os.Environ(), envAsServer+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.HasPrefix(string(out), "server ") {
		t.Errorf("%s --version: %v\n%s", bin, err, out)
	}
}
