package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"net"
	"path/filepath"
	"strings"
	"testing"

	"github.com/corralhq/corral/supervisor"
)

// These tests run the subcommands in-process against fakeControl, a real
// unix socket that answers like a master; ops_test.go runs them against a
// real server.

// cliEnv clears the variables a subcommand reads, then sets kv (name, value
// pairs), so that the tests do not depend on the caller's environment.
func cliEnv(t *testing.T, kv ...string) {
	t.Helper()
	for _, name := range []string{"CONTROL_SOCKET", "DATABASE_URL", "RUNTIME_DIRECTORY"} {
		t.Setenv(name, "")
	}
	for i := 0; i+1 < len(kv); i += 2 {
		t.Setenv(kv[i], kv[i+1])
	}
}

// runCLIOut runs runCLI and returns its exit status, stdout and stderr.
func runCLIOut(args ...string) (int, string, string) {
	var stdout, stderr bytes.Buffer
	code := runCLI(args[0], args[1:], &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// fakeControl listens on a unix socket at path and answers every request
// with resp. It returns the requests received, buffered; the listener
// closes when the test ends, which ends the serving goroutine.
func fakeControl(t *testing.T, path string, resp supervisor.Response) <-chan supervisor.Request {
	t.Helper()
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("listen on %s: %v", path, err)
	}
	t.Cleanup(func() { ln.Close() })
	reqs := make(chan supervisor.Request, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			var req supervisor.Request
			line, _ := bufio.NewReader(c).ReadBytes('\n')
			json.Unmarshal(line, &req)
			reqs <- req
			b, _ := json.Marshal(resp)
			c.Write(append(b, '\n'))
			c.Close()
		}
	}()
	return reqs
}

// received returns the one request fakeControl got; runCLI has returned by
// then, so the request is in the buffer or was never sent.
func received(t *testing.T, reqs <-chan supervisor.Request) supervisor.Request {
	t.Helper()
	select {
	case r := <-reqs:
		return r
	default:
		t.Fatal("the control socket received no request")
		return supervisor.Request{}
	}
}

// okStatus names a master pid above Linux's largest (4194304): no process
// has it, so server stop finds it gone at once.
var okStatus = supervisor.Response{OK: true, Status: &supervisor.Status{Version: "v-test", PID: 5000000, State: "running"}}

func TestCLIHelp(t *testing.T) {
	cliEnv(t, "DATABASE_URL", "mysql://x") // help works whatever the environment holds
	for _, tt := range []struct {
		name string
		want []string // lines the usage must hold
	}{
		{"status", []string{"Usage: server status [--json] [--control-socket PATH]", "--json"}},
		{"reload", []string{"Usage: server reload [--control-socket PATH]"}},
		{"scale", []string{"Usage: server scale N [--control-socket PATH]"}},
		{"stop", []string{"Usage: server stop [--force] [--control-socket PATH]", "--force"}},
	} {
		for _, h := range []string{"--help", "-h"} {
			code, out, errOut := runCLIOut(tt.name, h)
			if code != exitOK || errOut != "" {
				t.Errorf("server %s %s: exit %d, stderr %q, want 0 and nothing", tt.name, h, code, errOut)
			}
			for _, w := range append(tt.want, "--control-socket PATH", "CONTROL_SOCKET") {
				if !strings.Contains(out, w) {
					t.Errorf("server %s %s: stdout lacks %q:\n%s", tt.name, h, w, out)
				}
			}
		}
	}
	// A flag of another command is not shown.
	if _, out, _ := runCLIOut("reload", "--help"); strings.Contains(out, "--json") || strings.Contains(out, "--force") {
		t.Errorf("server reload --help shows --json or --force:\n%s", out)
	}
}

func TestCLIScaleCount(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	cliEnv(t, "CONTROL_SOCKET", sock)
	reqs := fakeControl(t, sock, supervisor.Response{OK: true})
	for _, n := range []string{"-1", "0", "-12", "513", "x", "1.5", "+3"} {
		code, _, errOut := runCLIOut("scale", n)
		want := `server scale: invalid worker count "` + n + `": want a whole number from 1 to 512` + "\n"
		if code != exitUsage || errOut != want {
			t.Errorf("server scale %s: exit %d, stderr %q, want %d and %q", n, code, errOut, exitUsage, want)
		}
	}
	if code, _, errOut := runCLIOut("status", "-1"); code != exitUsage || errOut != `server status: unexpected argument "-1"`+"\n" {
		t.Errorf("server status -1: exit %d, stderr %q, want 2 and an unexpected argument", code, errOut)
	}
	select {
	case r := <-reqs:
		t.Fatalf("a bad command line reached the control socket: %+v", r)
	default:
	}
	if code, out, errOut := runCLIOut("scale", "8"); code != exitOK || out != "server scale: done\n" {
		t.Fatalf("server scale 8: exit %d, %q %q, want 0 and done", code, out, errOut)
	}
	if r := received(t, reqs); r.Cmd != "scale" || r.Workers != 8 {
		t.Errorf("server scale 8 sent %+v, want scale to 8", r)
	}
}

func TestCLIBooleans(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	cliEnv(t, "CONTROL_SOCKET", sock)
	reqs := fakeControl(t, sock, okStatus)
	for _, tt := range []struct {
		args []string
		want bool
	}{
		{[]string{"stop", "--force"}, true},
		{[]string{"stop", "--force=yes"}, true},
		{[]string{"stop", "--force=ON"}, true},
		{[]string{"stop", "--force=1"}, true},
		{[]string{"stop", "--force=no"}, false},
		{[]string{"stop", "--force=off"}, false},
		{[]string{"stop"}, false},
	} {
		if code, _, errOut := runCLIOut(tt.args...); code != exitOK {
			t.Errorf("server %q: exit %d %q, want 0", tt.args, code, errOut)
			continue
		}
		if r := received(t, reqs); r.Cmd != "status" {
			t.Errorf("server %q sent %+v first, want status (for the master's pid)", tt.args, r)
		}
		if r := received(t, reqs); r.Cmd != "stop" || r.Force != tt.want {
			t.Errorf("server %q sent %+v, want stop with force %v", tt.args, r, tt.want)
		}
	}
	for _, v := range []string{"on", "yes", "1", "TRUE"} {
		code, out, errOut := runCLIOut("status", "--json="+v)
		var st supervisor.Status
		if err := json.Unmarshal([]byte(out), &st); code != exitOK || err != nil || st.PID != 5000000 {
			t.Errorf("server status --json=%s: exit %d, %q %q, want 0 and the status as JSON", v, code, out, errOut)
		}
		received(t, reqs)
	}
	if code, out, _ := runCLIOut("status", "--json=off"); code != exitOK || !strings.HasPrefix(out, "server v-test  master 5000000") {
		t.Errorf("server status --json=off: exit %d, %q, want 0 and the table", code, out)
	}
	received(t, reqs)
	// --json=false is not --json, so it does not clash with reload.
	if code, out, errOut := runCLIOut("reload", "--json=false"); code != exitOK || !strings.Contains(out, "rolling restart started") {
		t.Errorf("server reload --json=false: exit %d %q %q, want 0 and the roll started", code, out, errOut)
	}
	received(t, reqs)

	for _, tt := range []struct{ args []string }{
		{[]string{"stop", "--force=maybe"}},
		{[]string{"status", "--json=2"}},
		{[]string{"status", "--json="}},
	} {
		flag, val, _ := strings.Cut(tt.args[1], "=")
		want := "server " + tt.args[0] + ": invalid " + flag + ` "` + val + `": ` + wantBool + "\n"
		if code, _, errOut := runCLIOut(tt.args...); code != exitUsage || errOut != want {
			t.Errorf("server %q: exit %d, stderr %q, want %d and %q", tt.args, code, errOut, exitUsage, want)
		}
	}
}

func TestCLIControlSocket(t *testing.T) {
	dir := t.TempDir()

	// The longest path a unix socket takes is served and found.
	const maxSocketPath = 107 // sun_path holds 108 bytes, the NUL included
	n := maxSocketPath - len(dir) - len("/")
	if n < 1 {
		t.Skipf("temporary folder %s is too long for a %d-byte socket path in it", dir, maxSocketPath)
	}
	long := filepath.Join(dir, strings.Repeat("s", n))
	cliEnv(t)
	reqs := fakeControl(t, long, okStatus)
	if code, _, errOut := runCLIOut("status", "--control-socket", long); code != exitOK {
		t.Errorf("server status --control-socket (%d bytes): exit %d %q, want 0", len(long), code, errOut)
	}
	received(t, reqs)

	tooLong := long + "x"
	for _, tt := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"status", "--control-socket", tooLong}, nil, `server status: invalid --control-socket "` + tooLong + `": ` + wantSocketPath},
		{[]string{"reload", "--control-socket=" + tooLong}, []string{"CONTROL_SOCKET", long}, `server reload: invalid --control-socket "` + tooLong + `": ` + wantSocketPath},
		{[]string{"scale", "2"}, []string{"CONTROL_SOCKET", tooLong}, `server scale: invalid CONTROL_SOCKET "` + tooLong + `": ` + wantSocketPath},
		{[]string{"stop"}, []string{"CONTROL_SOCKET", tooLong}, `server stop: invalid CONTROL_SOCKET "` + tooLong + `": ` + wantSocketPath},
		// An explicitly empty flag is a mistake, not the default.
		{[]string{"status", "--control-socket", ""}, []string{"CONTROL_SOCKET", long}, `server status: invalid --control-socket "": want a socket path (leave the flag out for the default)`},
		{[]string{"status", "--control-socket="}, nil, `server status: invalid --control-socket "": want a socket path (leave the flag out for the default)`},
		// The socket is found next to the SQLite file, so a DATABASE_URL the
		// server would refuse cannot place it.
		{[]string{"status"}, []string{"DATABASE_URL", "mysql://u:hunter2@x/db"},
			`server status: invalid DATABASE_URL "mysql://xxxxx@x/db": want sqlite:PATH or a postgres:// URL (it places the control socket; or name the socket with --control-socket)`},
		{[]string{"stop"}, []string{"DATABASE_URL", "sqlite::memory:"},
			`server stop: invalid DATABASE_URL "sqlite::memory:": ` + wantSQLiteFile + ` (it places the control socket; or name the socket with --control-socket)`},
	} {
		cliEnv(t, tt.env...)
		if code, _, errOut := runCLIOut(tt.args...); code != exitUsage || errOut != tt.want+"\n" {
			t.Errorf("server %q with %q: exit %d, stderr\n%q\nwant %d and\n%q", tt.args, tt.env, code, errOut, exitUsage, tt.want)
		}
	}
	select {
	case r := <-reqs:
		t.Fatalf("a bad socket setting reached the control socket: %+v", r)
	default:
	}
}

// TestCLIFindsSocket checks that the subcommands find the control socket
// where the server puts it (controlPath), DATABASE_URL's forms included.
func TestCLIFindsSocket(t *testing.T) {
	dir := t.TempDir()
	reqs := fakeControl(t, filepath.Join(dir, "server.sock"), okStatus)
	for _, env := range [][]string{
		{"DATABASE_URL", "sqlite:" + dir + "/x.db"},
		{"DATABASE_URL", "sqlite:file:" + dir + "/y.db"},
		{"DATABASE_URL", "sqlite:file://" + dir + "/y.db"},
		{"DATABASE_URL", "mysql://ignored", "CONTROL_SOCKET", dir + "/server.sock"},
		{"DATABASE_URL", "mysql://ignored", "RUNTIME_DIRECTORY", dir + ":/elsewhere"},
	} {
		cliEnv(t, env...)
		if code, _, errOut := runCLIOut("status"); code != exitOK {
			t.Errorf("server status with %q: exit %d %q, want 0", env, code, errOut)
			continue
		}
		received(t, reqs)
	}
	// Relative, as the server started in the same folder resolves it.
	t.Chdir(dir)
	cliEnv(t, "DATABASE_URL", "sqlite:file:z.db")
	if code, _, errOut := runCLIOut("status"); code != exitOK {
		t.Errorf("server status with DATABASE_URL=sqlite:file:z.db: exit %d %q, want 0", code, errOut)
	} else {
		received(t, reqs)
	}
}
