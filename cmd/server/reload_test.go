package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fixture is a Go module in a temporary folder whose cmd/server is a small
// worker built on this repository's worker package (testdata/reload).
type fixture struct {
	t   *testing.T
	dir string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	mod, err := os.ReadFile(filepath.Join(root, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.SplitN(string(mod), "\n", 2)
	mod = []byte("module example.com/reloadfixture\n" + lines[1] +
		"\nrequire github.com/corralhq/corral v0.0.0-00010101000000-000000000000\n" +
		"\nreplace github.com/corralhq/corral => " + root + "\n")
	sum, err := os.ReadFile(filepath.Join(root, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "cmd", "server"), 0o755)
	os.WriteFile(filepath.Join(dir, "go.mod"), mod, 0o644)
	os.WriteFile(filepath.Join(dir, "go.sum"), sum, 0o644)
	f := &fixture{t: t, dir: dir}
	f.setText("version 1")
	return f
}

// setText rewrites the fixture's handler to answer /text with text.
func (f *fixture) setText(text string) {
	f.t.Helper()
	src, err := os.ReadFile("testdata/reload/main.go.txt")
	if err != nil {
		f.t.Fatal(err)
	}
	f.write("cmd/server/main.go", strings.Replace(string(src), "TEXT", text, 1))
}

func (f *fixture) write(rel, content string) {
	f.t.Helper()
	p := filepath.Join(f.dir, rel)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		f.t.Fatal(err)
	}
}

// startReloadServer runs the server in reload mode on the fixture. Its
// first worker is the test binary itself; the first successful build
// replaces it with the fixture.
func startReloadServer(t *testing.T, f *fixture, env ...string) *server {
	t.Helper()
	return startServer(t, append([]string{
		"RELOAD=true", "RELOAD_DIRS=" + f.dir, "RELOAD_DRAIN=1s",
		`RELOAD_BUILD=go build -mod=mod -o "$OUTPUT" ./cmd/server`,
	}, env...)...)
}

// text returns the answer to /text and the pid that gave it (0 from a
// worker that is not the fixture).
func (s *server) text() (string, int, error) {
	resp, err := fresh.Get(s.url("/text"))
	if err != nil {
		return "", 0, err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	pid, _ := strconv.Atoi(resp.Header.Get("X-Pid"))
	return string(b), pid, nil
}

// waitText waits until /text answers want and returns the pid serving it.
// The first build of a run compiles the fixture's dependencies: minutes on
// a cold cache.
func (s *server) waitText(t *testing.T, want string) int {
	t.Helper()
	var pid int
	waitFor(t, 4*time.Minute, func() error {
		got, p, err := s.text()
		if err != nil {
			return err
		}
		if got != want {
			return fmt.Errorf("/text = %q, want %q", got, want)
		}
		pid = p
		return nil
	})
	return pid
}

// waitBuildFailed waits until /health reports a failed build whose error
// holds want, then checks that /text still answers text: a worker of the
// last good build serves (a failed build cannot answer at all).
func (s *server) waitBuildFailed(t *testing.T, text, want string) {
	t.Helper()
	waitFor(t, time.Minute, func() error {
		resp, err := fresh.Get(s.url("/health"))
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		var h struct{ Reload struct{ Build, Error string } }
		json.NewDecoder(resp.Body).Decode(&h)
		if h.Reload.Build != "failed" || !strings.Contains(h.Reload.Error, want) {
			return fmt.Errorf("/health reload = %+v, want build failed with %q", h.Reload, want)
		}
		return nil
	})
	if got, _, err := s.text(); err != nil || got != text {
		t.Errorf("after a failed build /text = %q, %v; want %q from the last good build", got, err, text)
	}
}

func TestReload(t *testing.T) {
	f := newFixture(t)
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	s := startReloadServer(t, f, "CONTROL_SOCKET="+sock)
	first := s.workerPIDs()
	if len(first) != 1 {
		t.Fatalf("reload mode runs %d workers, want 1", len(first))
	}

	t.Run("edit swaps the worker", func(t *testing.T) {
		f.setText("version 2")
		pid := s.waitText(t, "version 2")
		if pid == first[0] {
			t.Fatalf("new text served by the old pid %d", pid)
		}
		waitFor(t, 10*time.Second, func() error {
			if alive(first[0]) {
				return fmt.Errorf("old worker %d still alive", first[0])
			}
			return nil
		})
	})

	t.Run("build error keeps the old worker", func(t *testing.T) {
		before := s.waitText(t, "version 2")
		f.write("cmd/server/main.go", "package main\n\nfunc main() { this is not Go }\n")
		s.waitBuildFailed(t, "version 2", "syntax error")
		if n := strings.Count(s.logs.String(), "┌─ build failed"); n != 1 {
			t.Errorf("compiler output framed %d times, want once", n)
		}
		if n := strings.Count(s.logs.String(), "syntax error"); n != 1 {
			t.Errorf("the compiler's error is on stderr %d times, want once:\n%s", n, s.logs)
		}
		f.setText("version 3")
		if pid := s.waitText(t, "version 3"); pid == before {
			t.Errorf("fixed build served by the old pid %d", pid)
		}
	})

	t.Run("a burst of saves builds once", func(t *testing.T) {
		changes := len(s.logs.find("change detected", nil))
		start := time.Now()
		for i := range 100 {
			f.setText(fmt.Sprintf("version 4 (save %d)", i))
		}
		t.Logf("100 saves took %s (debounce 250ms)", time.Since(start))
		s.waitText(t, "version 4 (save 99)")
		if n := len(s.logs.find("change detected", nil)) - changes; n != 1 {
			t.Errorf("100 saves caused %d reloads, want 1", n)
		}
	})

	t.Run("excluded files do not reload", func(t *testing.T) {
		changes := len(s.logs.find("change detected", nil))
		f.write("data/server.db", "x")
		f.write("cmd/server/.main.go.swp", "x")
		f.write("cmd/server/main_test.go", "package main\n")
		f.write("notes~", "x")
		// A watched file last: its reload is the only one there may be.
		f.write("config.json", "{}")
		waitFor(t, 30*time.Second, func() error {
			got := s.logs.find("change detected", nil)[changes:]
			if len(got) == 0 {
				return fmt.Errorf("config.json change not detected")
			}
			if len(got) > 1 || fmt.Sprint(got[0]["paths"]) != "[config.json]" {
				t.Fatalf("reloads after excluded writes: %v, want one for config.json", got)
			}
			return nil
		})
	})

	t.Run("no request fails during a reload", func(t *testing.T) {
		stop := make(chan struct{})
		results := loadLoop(s, stop)
		f.setText("version 5")
		s.waitText(t, "version 5")
		close(stop)
		if ok, failed, errs := results(); failed != 0 || ok == 0 {
			t.Errorf("during a reload: %d ok, %d failed %v", ok, failed, errs)
		}
	})

	t.Run("a long request does not hold the swap", func(t *testing.T) {
		_, old, err := s.text()
		if err != nil {
			t.Fatal(err)
		}
		go fresh.Get(s.url("/test/slow?ms=60000"))
		waitFor(t, 5*time.Second, func() error {
			if inFlight(t, s) == 0 {
				return fmt.Errorf("slow request not in flight")
			}
			return nil
		})
		f.setText("version 6")
		s.waitText(t, "version 6")
		swapped := time.Now()
		waitFor(t, 10*time.Second, func() error {
			if alive(old) {
				return fmt.Errorf("old worker %d still alive %s after the swap", old, time.Since(swapped))
			}
			return nil
		})
		if d := time.Since(swapped); d > 5*time.Second {
			t.Errorf("old worker outlived the 1s reload drain by %s", d)
		}
	})

	t.Run("a build that does not start keeps the old worker", func(t *testing.T) {
		// Not s.text(): the worker the last swap replaced may still answer
		// during its close lead-in.
		before := s.waitText(t, "version 6")
		// It compiles, and exits at once: no worker of it is ever ready.
		f.write("cmd/server/main.go", "package main\n\nimport \"os\"\n\nfunc main() { os.Exit(3) }\n")
		s.waitBuildFailed(t, "version 6", "does not start")
		f.setText("version 7")
		if pid := s.waitText(t, "version 7"); pid == before {
			t.Errorf("fixed build served by the old pid %d", pid)
		}
		if n := len(s.logs.find("new build does not start, old worker keeps serving", nil)); n != 1 {
			t.Errorf("%d rejections of the build that does not start, want 1 (no retry loop)", n)
		}
	})

	t.Run("scaling is refused", func(t *testing.T) {
		code, _, errOut := cli(t, "scale", "3", "--control-socket", sock)
		if code != 1 || !strings.Contains(errOut, "reload mode runs one worker") {
			t.Errorf("server scale 3 in reload mode: exit %d %q, want 1 saying reload mode runs one worker", code, errOut)
		}
		s.cmd.Process.Signal(syscall.SIGTTIN)
		waitFor(t, 5*time.Second, func() error {
			if len(s.logs.find("scale up refused: reload mode runs one worker", nil)) == 0 {
				return errors.New("SIGTTIN not refused")
			}
			return nil
		})
		if up := s.logs.find("scaling up", nil); len(up) != 0 {
			t.Errorf("reload mode scaled up: %v", up)
		}
	})

	t.Run("a dead worker is restarted", func(t *testing.T) {
		pids := s.workerPIDs()
		syscall.Kill(pids[0], syscall.SIGKILL)
		waitFor(t, 10*time.Second, func() error {
			got, pid, err := s.text()
			if err != nil || pid == pids[0] || got != "version 7" {
				return fmt.Errorf("/text = %q from %d (%v), want version 7 from a new worker", got, pid, err)
			}
			return nil
		})
	})
}

func TestDataDirsBelow(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		db    string
		roots []string
		want  []string
	}{
		{"/src/data", []string{"/src"}, []string{"/src/data"}},
		{"/tmp/db", []string{"/tmp/db/src"}, nil}, // holds the tree: never exclude it
		{"/var/lib/corral", []string{"/src"}, nil},
		{"/src", []string{"/src"}, nil},
	} {
		if got := dataDirsBelow(tt.db, tt.roots); fmt.Sprint(got) != fmt.Sprint(tt.want) {
			t.Errorf("dataDirsBelow(%q, %q) = %q, want %q", tt.db, tt.roots, got, tt.want)
		}
	}
}
