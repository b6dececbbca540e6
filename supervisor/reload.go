package supervisor

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/corralhq/corral/supervisor/protocol"
)

// ReloadConfig turns on development reload: the supervisor watches source
// files, rebuilds the worker binary when Go sources change and swaps the
// worker through the restart engine. The zero value watches the current
// folder with the default patterns and restarts without building.
type ReloadConfig struct {
	// Dirs are the folders watched recursively. Default ".".
	Dirs []string
	// Include adds name patterns to DefaultReloadInclude.
	Include []string
	// Exclude adds name patterns to DefaultReloadExclude.
	Exclude []string
	// ExcludeDirs are folders never watched, such as the database's.
	ExcludeDirs []string
	// Delay is the quiet time after the last change before a reload: a
	// burst of saves gives one reload. Default DefaultReloadDelay.
	Delay time.Duration
	// Build is a shell command run in Dirs[0] when Go sources change; "" means
	// no build, the same binary restarts. The command finds the path to
	// write the new binary to in $OUTPUT; if it writes none, the server's own
	// executable is started again (for commands such as "make build").
	Build string
	// Drain is how long the old worker may finish its requests after the
	// new one is ready. Default DefaultReloadDrain.
	Drain time.Duration
	// Output receives the framed compiler output of a failed build.
	// Default os.Stderr.
	Output io.Writer
}

// reloadState is the supervisor's side of reload mode; the loop owns it.
type reloadState struct {
	cfg     ReloadConfig
	changes chan []string
	builds  chan buildResult
	dir     string // temporary folder for built binaries

	building   context.CancelFunc // non-nil while a build runs
	queued     []string           // changes seen while building
	n          int                // builds started
	status     protocol.Message   // last build status, sent to every new worker
	good       string             // the last binary that started a worker; s.exe until a build proves itself
	lastChange time.Time
	stop       <-chan struct{} // closed when Run returns
}

type buildResult struct {
	n      int
	exe    string // new binary; "" when the build wrote none
	output []byte
	err    error
	took   time.Duration
	paths  []string
}

func (c *ReloadConfig) setDefaults() {
	dirs := c.Dirs
	if len(dirs) == 0 {
		dirs = []string{"."}
	}
	// A new slice: the caller's Config is never written to.
	c.Dirs = make([]string, len(dirs))
	for i, d := range dirs {
		c.Dirs[i] = d
		if abs, err := filepath.Abs(d); err == nil {
			c.Dirs[i] = abs
		}
	}
	c.Include = append(append([]string(nil), DefaultReloadInclude...), c.Include...)
	c.Exclude = append(append([]string(nil), DefaultReloadExclude...), c.Exclude...)
	if c.Delay <= 0 {
		c.Delay = DefaultReloadDelay
	}
	if c.Drain <= 0 {
		c.Drain = DefaultReloadDrain
	}
	if c.Output == nil {
		c.Output = os.Stderr
	}
}

// startReload starts the file watcher; its goroutine ends when stop closes.
func (s *Supervisor) startReload(stop <-chan struct{}) error {
	r := s.reload
	m := &matcher{include: r.cfg.Include, exclude: r.cfg.Exclude, excludeDirs: r.cfg.ExcludeDirs}
	w, err := newWatcher(r.cfg.Dirs, m, r.cfg.Delay, s.log)
	if err != nil {
		return err
	}
	r.stop = stop
	go w.run(stop, r.changes)
	dir, err := os.MkdirTemp("", "corral-reload-")
	if err != nil {
		return fmt.Errorf("supervisor: reload build folder: %w", err)
	}
	r.dir = dir
	s.log.Info().Strs("dirs", r.cfg.Dirs).Str("build", r.cfg.Build).Dur("delay_ms", r.cfg.Delay).Msg("watching for changes")
	return nil
}

// endReload cancels a running build and removes the built binaries.
func (s *Supervisor) endReload() {
	r := s.reload
	if r.building != nil {
		r.building()
	}
	os.RemoveAll(r.dir)
}

// onChanges acts on a burst of changed files: build when Go sources
// changed, restart otherwise.
func (s *Supervisor) onChanges(paths []string) {
	r := s.reload
	if s.stopping {
		return
	}
	r.lastChange = s.env.now()
	build := r.cfg.Build != "" && anyGo(paths)
	s.log.Info().Strs("paths", paths).Bool("build", build).Msg("change detected")
	if r.building != nil {
		r.building() // superseded: its result is dropped
		r.building = nil
		r.queued = append(r.queued, paths...)
		build = true
	}
	if !build {
		s.replaceAll("reload")
		return
	}
	paths = append(r.queued, paths...)
	r.queued = nil
	r.n++
	ctx, cancel := context.WithCancel(context.Background())
	r.building = cancel
	go func(n int) {
		res := s.runBuild(ctx, n, paths)
		select {
		case r.builds <- res:
		case <-r.stop:
		}
	}(r.n)
}

func anyGo(paths []string) bool {
	for _, p := range paths {
		if isGoSource(p) {
			return true
		}
	}
	return false
}

// runBuild runs the build command for build number n. It never touches the
// supervisor's state; its result goes back to the loop.
func (s *Supervisor) runBuild(ctx context.Context, n int, paths []string) buildResult {
	r := s.reload
	out := filepath.Join(r.dir, "server-"+strconv.Itoa(n))
	cmd := exec.CommandContext(ctx, "/bin/sh", "-c", r.cfg.Build)
	cmd.Dir = r.cfg.Dirs[0]
	cmd.Env = append(os.Environ(), "OUTPUT="+out)
	// Its own group, so cancelling kills the compiler processes too.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	start := time.Now()
	err := cmd.Run()
	res := buildResult{n: n, output: buf.Bytes(), err: err, took: time.Since(start), paths: paths}
	if _, serr := os.Stat(out); serr == nil {
		res.exe = out
	}
	return res
}

// onBuild swaps the worker onto a fresh binary, or keeps the old worker
// serving and reports a failed build.
func (s *Supervisor) onBuild(res buildResult) {
	r := s.reload
	if res.n != r.n || s.stopping {
		if res.exe != "" {
			os.Remove(res.exe)
		}
		return // superseded by a newer build
	}
	r.building = nil
	if res.err != nil {
		first := firstLine(res.output, res.err)
		// The compiler's output is printed once, framed below; the log
		// line says only how the build ended.
		s.log.Error().Strs("paths", res.paths).Dur("build_time_ms", res.took).Str("error", res.err.Error()).Msg("build failed, old worker keeps serving")
		printFramed(r.cfg.Output, fmt.Sprintf("build failed (%s)", res.took.Round(time.Millisecond)), res.output)
		r.status = protocol.Message{Type: protocol.TypeReload, Build: "failed", Error: first}
		s.tellWorkers(r.status)
		return
	}
	if res.exe != "" {
		prev := s.exe
		s.exe = res.exe
		if strings.HasPrefix(prev, r.dir) && prev != r.good {
			defer os.Remove(prev) // running processes keep their image
		}
	}
	r.status = protocol.Message{Type: protocol.TypeReload, Build: "ok"}
	s.log.Info().Strs("paths", res.paths).Dur("build_time_ms", res.took).Str("binary", s.exe).Msg("build succeeded, swapping worker")
	s.replaceAll("reload")
}

// proven records that exe started a worker: it becomes the binary to
// fall back on, and the one it replaces is no longer needed.
func (r *reloadState) proven(exe string) {
	if exe == r.good {
		return
	}
	if strings.HasPrefix(r.good, r.dir) {
		os.Remove(r.good) // running processes keep their image
	}
	r.good = exe
}

// rejectBuild handles a new build whose binary cannot start a worker (it
// does not execute, exits before it is ready, or is not ready in time):
// in reload mode, rather than retrying it for ever with backoff, it is
// reported as a failed build and the last binary that started is used
// again until the next change. It reports whether it took the case.
func (s *Supervisor) rejectBuild(sl *slot, exe, detail string) bool {
	r := s.reload
	if r == nil || exe != s.exe || exe == r.good || s.stopping {
		return false
	}
	s.log.Error().Str("binary", exe).Str("error", detail).Msg("new build does not start, old worker keeps serving")
	r.status = protocol.Message{Type: protocol.TypeReload, Build: "failed", Error: "the new build does not start: " + detail}
	s.tellWorkers(r.status)
	if strings.HasPrefix(exe, r.dir) {
		os.Remove(exe)
	}
	s.exe = r.good
	sl.failures = 0
	if sl.current == nil && sl.next == nil {
		s.spawn(sl, "restart")
	}
	return true
}

// replaceAll replaces every slot's worker.
func (s *Supervisor) replaceAll(why string) {
	for _, sl := range s.slots {
		s.replace(sl, why)
	}
}

// tellWorkers writes m to the lifeline of every live worker.
func (s *Supervisor) tellWorkers(m protocol.Message) {
	for _, p := range s.procs {
		p.tell(m)
	}
}

// tell writes m on p's lifeline. The write is small and the worker reads
// continuously, so it does not block the loop; a worker that is gone just
// fails the write.
func (p *proc) tell(m protocol.Message) {
	if p.lifeline == nil {
		return
	}
	p.lifeline.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	p.lifeline.Write(m.Encode())
}

func firstLine(out []byte, err error) string {
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			return l
		}
	}
	return err.Error()
}

// printFramed writes out between two rules, once, for a human to read.
func printFramed(w io.Writer, title string, out []byte) {
	var b strings.Builder
	b.WriteString("┌─ " + title + " " + strings.Repeat("─", max(0, 60-len(title))) + "\n")
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		b.WriteString("│ " + l + "\n")
	}
	b.WriteString("└" + strings.Repeat("─", 64) + "\n")
	io.WriteString(w, b.String())
}
