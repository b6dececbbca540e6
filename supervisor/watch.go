package supervisor

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/rs/zerolog"
)

// Reload defaults, applied by New to zero fields of ReloadConfig.
var (
	// DefaultReloadInclude are the file names that trigger a reload.
	// An env file is added by the caller when it is one (--env-file).
	DefaultReloadInclude = []string{"*.go", "go.mod", "go.sum", "*.json", "*.yaml", "*.yml", "*.toml"}
	// DefaultReloadExclude are the names never watched: version control,
	// data, dependencies, hidden folders, tests and editor temporary files.
	DefaultReloadExclude = []string{".git", "data", "vendor", "node_modules", ".*", "*_test.go", "*.swp", "*.swx", "*~", "4913", ".#*"}
)

const (
	DefaultReloadDelay = 250 * time.Millisecond
	DefaultReloadDrain = 5 * time.Second
)

// matcher decides which paths a reload watches.
type matcher struct {
	include, exclude []string
	excludeDirs      []string // absolute folders never watched (the database's)
}

// watched reports whether a change to the file rel (slash-separated, relative
// to a watched root) should trigger a reload: its name matches an include
// pattern, and no exclude pattern matches its name or a folder above it. A
// literal include name (".env") wins over a wildcard exclude (".*").
func (m *matcher) watched(rel string) bool {
	base := path.Base(rel)
	included, literal := false, false
	for _, p := range m.include {
		if ok, _ := path.Match(p, base); ok {
			included = true
			literal = literal || p == base
		}
	}
	if !included {
		return false
	}
	dir := path.Dir(rel)
	if dir != "." && m.excludedDir(dir) {
		return false
	}
	for _, p := range m.exclude {
		if ok, _ := path.Match(p, base); ok && !(literal && hasWildcard(p)) {
			return false
		}
	}
	return true
}

// excludedDir reports whether any component of the folder rel is excluded.
func (m *matcher) excludedDir(rel string) bool {
	if rel == "." {
		return false
	}
	for _, c := range strings.Split(rel, "/") {
		for _, p := range m.exclude {
			if ok, _ := path.Match(p, c); ok {
				return true
			}
		}
	}
	return false
}

func hasWildcard(p string) bool { return strings.ContainsAny(p, "*?[") }

// isGoSource reports whether a change to rel needs a build.
func isGoSource(rel string) bool {
	b := path.Base(rel)
	return strings.HasSuffix(b, ".go") || b == "go.mod" || b == "go.sum"
}

// watcher follows file changes under the reload folders and sends each
// burst, once it has been quiet for the delay, to changes.
type watcher struct {
	fs    *fsnotify.Watcher
	roots []string
	m     *matcher
	delay time.Duration
	log   zerolog.Logger
}

// addWatch adds one inotify watch; tests replace it to simulate a full
// watch table.
var addWatch = (*fsnotify.Watcher).Add

// ErrWatchLimit is wrapped by the error returned when the kernel refuses
// another inotify watch.
var ErrWatchLimit = errors.New("supervisor: inotify watch limit reached (raise fs.inotify.max_user_watches)")

func newWatcher(roots []string, m *matcher, delay time.Duration, log zerolog.Logger) (*watcher, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("supervisor: start file watcher: %w", err)
	}
	w := &watcher{fs: fw, roots: roots, m: m, delay: delay, log: log}
	for _, r := range roots {
		if err := w.addTree(r); err != nil {
			fw.Close()
			return nil, err
		}
	}
	return w, nil
}

// addTree watches dir and every folder below it that is not excluded.
func (w *watcher) addTree(dir string) error {
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == dir {
				return fmt.Errorf("supervisor: watch %s: %w", p, err)
			}
			return nil // vanished while walking
		}
		if !d.IsDir() {
			return nil
		}
		if p != dir && w.skipDir(p) {
			return filepath.SkipDir
		}
		if err := addWatch(w.fs, p); err != nil {
			if errors.Is(err, syscall.ENOSPC) {
				return fmt.Errorf("watch %s: %w", p, ErrWatchLimit)
			}
			return fmt.Errorf("supervisor: watch %s: %w", p, err)
		}
		return nil
	})
}

// rel returns p relative to the root that holds it, slash-separated.
func (w *watcher) rel(p string) (string, bool) {
	for _, r := range w.roots {
		if rel, err := filepath.Rel(r, p); err == nil && !strings.HasPrefix(rel, "..") {
			return filepath.ToSlash(rel), true
		}
	}
	return "", false
}

func (w *watcher) skipDir(p string) bool {
	for _, d := range w.m.excludeDirs {
		if p == d || strings.HasPrefix(p, d+string(filepath.Separator)) {
			return true
		}
	}
	rel, ok := w.rel(p)
	return !ok || w.m.excludedDir(rel)
}

// run sends every debounced burst of changed paths to changes until stop
// closes. It closes the fsnotify watcher on return.
func (w *watcher) run(stop <-chan struct{}, changes chan<- []string) {
	defer w.fs.Close()
	var pending []string
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		select {
		case <-stop:
			return
		case err := <-w.fs.Errors:
			w.log.Error().Err(err).Msg("file watcher error")
		case ev := <-w.fs.Events:
			if ev.Has(fsnotify.Create) {
				if fi, err := os.Lstat(ev.Name); err == nil && fi.IsDir() && !w.skipDir(ev.Name) {
					if err := w.addTree(ev.Name); err != nil {
						w.log.Error().Err(err).Str("dir", ev.Name).Msg("new folder not watched")
					}
					continue
				}
			}
			if ev.Op == fsnotify.Chmod || w.skipDir(filepath.Dir(ev.Name)) {
				continue
			}
			rel, ok := w.rel(ev.Name)
			if !ok || !w.m.watched(rel) {
				continue
			}
			if !slices.Contains(pending, rel) {
				pending = append(pending, rel)
			}
			timer.Reset(w.delay)
		case <-timer.C:
			batch := pending
			pending = nil
			select {
			case changes <- batch:
			case <-stop:
				return
			}
		}
	}
}
