package supervisor

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Reload mode on fake processes: the build command is a real shell command
// that writes (or fails to write) the new binary.

func reloadHarness(t *testing.T) (*harness, string, *syncBuffer) {
	t.Helper()
	dir := t.TempDir()
	out := &syncBuffer{}
	build := `if [ -f fail ]; then echo "main.go:3:1: syntax error" >&2; exit 1; fi; printf bin > "$OUTPUT"`
	h := newHarness(t, Config{Workers: 1, Reload: &ReloadConfig{Dirs: []string{dir}, Build: build, Drain: 2 * time.Second, Output: out}})
	stop := make(chan struct{})
	if err := h.s.startReload(stop); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		close(stop)
		h.s.endReload()
	})
	h.begin()
	h.ready(h.procs[0])
	return h, dir, out
}

// build lets the loop take the change to paths and waits for the build.
func (h *harness) build(paths ...string) {
	h.t.Helper()
	h.s.onChanges(paths)
	select {
	case res := <-h.s.reload.builds:
		h.s.onBuild(res)
		h.s.woke()
	case <-time.After(10 * time.Second):
		h.t.Fatal("no build result within 10s")
	}
}

func TestReloadBuildsAndSwapsTheWorker(t *testing.T) {
	h, _, _ := reloadHarness(t)
	old := h.procs[0]
	h.build("main.go")
	wantStarted(t, h, 2)
	fresh := h.procs[1]
	if !strings.HasPrefix(fresh.cmd.Path, h.s.reload.dir) {
		t.Errorf("reloaded worker runs %s, want the build in %s", fresh.cmd.Path, h.s.reload.dir)
	}
	wantSignals(t, old)
	h.ready(fresh)
	wantSignals(t, old, syscall.SIGTERM)
	// The old worker gets the reload drain, not the graceful budget.
	h.live(2*time.Second+DefaultKillGrace, fresh)
	wantSignals(t, old, syscall.SIGTERM, syscall.SIGKILL)

	// A change that is not Go restarts without a build.
	h.s.onChanges([]string{"config.yaml"})
	wantStarted(t, h, 3)
	if h.procs[2].cmd.Path != fresh.cmd.Path {
		t.Errorf("restart without build runs %s, want %s", h.procs[2].cmd.Path, fresh.cmd.Path)
	}
}

func TestReloadAFailedBuildKeepsTheOldWorker(t *testing.T) {
	h, dir, out := reloadHarness(t)
	os.WriteFile(filepath.Join(dir, "fail"), nil, 0o644)
	h.build("main.go")
	wantStarted(t, h, 1)
	// The compiler's output is printed once, framed; the log line says how
	// the build ended.
	if l := h.log.lines("build failed, old worker keeps serving"); len(l) != 1 || l[0]["error"] != "exit status 1" {
		t.Errorf("build failure lines = %v, want one with the build's exit status", l)
	}
	if st := h.s.reload.status; st.Error != "main.go:3:1: syntax error" {
		t.Errorf("reload status error = %q, want the compiler's first error", st.Error)
	}
	if !strings.Contains(out.b.String(), "│ main.go:3:1: syntax error") {
		t.Errorf("compiler output not shown framed: %q", out.b.String())
	}
	if st := h.s.reload.status; st.Build != "failed" {
		t.Errorf("reload status = %+v, want failed", st)
	}
}

func TestReloadABuildThatDoesNotStartIsAFailedBuild(t *testing.T) {
	h, _, _ := reloadHarness(t)
	good := h.s.exe
	h.build("main.go")
	wantStarted(t, h, 2)
	h.exit(h.procs[1], "exit 2")
	if l := h.log.lines("new build does not start, old worker keeps serving"); len(l) != 1 {
		t.Errorf("%d \"new build does not start\" lines, want 1", len(l))
	}
	if h.s.exe != good {
		t.Errorf("next worker binary = %s, want the last good one %s", h.s.exe, good)
	}
	wantSignals(t, h.procs[0])
	h.live(time.Minute, h.procs[0])
	wantStarted(t, h, 2) // not retried for ever
}

func TestReloadModeRefusesScaling(t *testing.T) {
	h, _, _ := reloadHarness(t)
	h.signal(syscall.SIGTTIN)
	wantStarted(t, h, 1)
	if l := h.log.lines("scale up refused: reload mode runs one worker"); len(l) != 1 {
		t.Errorf("%d refusal lines, want 1", len(l))
	}
}
