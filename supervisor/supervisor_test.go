package supervisor

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/fsnotify/fsnotify"
	"github.com/rs/zerolog"
)

func TestMatcherWatched(t *testing.T) {
	m := &matcher{include: DefaultReloadInclude, exclude: DefaultReloadExclude}
	for _, tt := range []struct {
		rel  string
		want bool
	}{
		{"main.go", true},
		{"cmd/server/main.go", true},
		{"go.mod", true},
		{"config/app.yaml", true},
		{".env", false}, // watched only when it is the env file
		{"handlers/handlers_test.go", false},
		{"handlers/.handlers.go.swp", false},
		{"handlers/handlers.go~", false},
		{"4913", false},
		{".#main.go", false},
		{"data/server.db", false},
		{"data/config.json", false},
		{".git/HEAD", false},
		{".idea/workspace.json", false},
		{"vendor/x/y.go", false},
		{"node_modules/a/package.json", false},
		{"README.md", false},
		{"server.db-wal", false},
	} {
		if got := m.watched(tt.rel); got != tt.want {
			t.Errorf("watched(%q) = %v, want %v", tt.rel, got, tt.want)
		}
	}
}

func TestIsGoSource(t *testing.T) {
	for rel, want := range map[string]bool{"a.go": true, "x/go.mod": true, "go.sum": true, "a.json": false, ".env": false} {
		if got := isGoSource(rel); got != want {
			t.Errorf("isGoSource(%q) = %v, want %v", rel, got, want)
		}
	}
}

func TestProbeAddrRefusesABusyPort(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	_, err = probeAddr(addr)
	var ae *AddrError
	if !errors.As(err, &ae) || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("probeAddr(%s) = %v, want an *AddrError matching EADDRINUSE", addr, err)
	}
	if want := "address " + addr + " already in use"; err.Error() != want {
		t.Errorf("error = %q, want %q", err, want)
	}
}

func TestProbeAddrRefusesAReuseportGroup(t *testing.T) {
	// Another copy of the server: a SO_REUSEPORT socket on the port, which a
	// plain SO_REUSEPORT bind would silently join.
	free, err := probeAddr("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := listenSocket(free, true, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := probeAddr(free.String()); !errors.Is(err, syscall.EADDRINUSE) {
		t.Errorf("probeAddr(%s) with a reuseport group on it = %v, want EADDRINUSE", free, err)
	}
}

func TestAddrErrorMessages(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{syscall.EACCES, "address 0.0.0.0:80: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"},
		{syscall.EADDRNOTAVAIL, "address 10.9.9.9:80: not an address of this machine"},
	} {
		addr := "0.0.0.0:80"
		if errors.Is(tt.err, syscall.EADDRNOTAVAIL) {
			addr = "10.9.9.9:80"
		}
		err := &AddrError{Addr: addr, Err: tt.err}
		if err.Error() != tt.want || !errors.Is(err, tt.err) {
			t.Errorf("AddrError{%s, %v} = %q, want %q and errors.Is its cause", addr, tt.err, err, tt.want)
		}
	}
}

func TestWorkerEnvOverwritesMarkers(t *testing.T) {
	base := []string{"PATH=/bin", "CORRAL_SLOT=9", "CORRAL_ROLE=master", "NOTIFY_SOCKET=/run/x", "LISTEN_FDS=1", "LISTEN_PID=1", "HOME=/root"}
	env := workerEnv(base, map[string]string{"CORRAL_SLOT": "2", "CORRAL_ROLE": "worker"})
	for _, bad := range []string{"CORRAL_SLOT=9", "CORRAL_ROLE=master", "NOTIFY_SOCKET=/run/x", "LISTEN_FDS=1", "LISTEN_PID=1"} {
		if slices.Contains(env, bad) {
			t.Errorf("worker env keeps %s: %v", bad, env)
		}
	}
	for _, good := range []string{"PATH=/bin", "HOME=/root", "CORRAL_SLOT=2", "CORRAL_ROLE=worker"} {
		if !slices.Contains(env, good) {
			t.Errorf("worker env lacks %s: %v", good, env)
		}
	}
}

func TestBootErrorIsErrBoot(t *testing.T) {
	err := error(&BootError{Slot: 2, PID: 42, Status: "exit 3"})
	if !errors.Is(err, ErrBoot) {
		t.Errorf("errors.Is(%v, ErrBoot) = false", err)
	}
	if !strings.Contains(err.Error(), "worker 2 (pid 42) failed to boot: exit 3") {
		t.Errorf("BootError = %q", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, cfg := range []Config{
		{Addr: "127.0.0.1:0", Workers: MaxWorkers + 1},
		{Addr: "127.0.0.1:0", SocketMode: "mesh"},
	} {
		if s, err := New(cfg); err == nil {
			s.closeSockets()
			t.Errorf("New(%+v) = nil error", cfg)
		}
	}
}

func TestServingGatesTheWatchdog(t *testing.T) {
	now := time.Now()
	s := &Supervisor{cfg: Config{HealthcheckTimeout: time.Second}}
	fresh := &proc{state: ready, lastBeat: now.Add(-100 * time.Millisecond)}
	stale := &proc{state: ready, lastBeat: now.Add(-2 * time.Second)}
	s.slots = []*slot{{n: 1, current: stale}, {n: 2}}
	if !s.serving(now) {
		t.Errorf("serving() before boot = false, want true (systemd's start timeout covers boot)")
	}
	s.booted = true
	if s.serving(now) {
		t.Errorf("serving() with only a silent worker = true, want false")
	}
	s.slots[1].current = fresh
	if !s.serving(now) {
		t.Errorf("serving() with one heartbeating worker = false, want true")
	}
}

func TestNewRefusesAPortAnotherGroupJoined(t *testing.T) {
	// Another process of the same user already listening with SO_REUSEPORT
	// on the port the probe found free: simulated by binding one ourselves
	// after the probe, which is what a racing second server does.
	free, err := probeAddr("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	other, err := listenSocket(free, true, 16)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if n := foreignListeners(free.Port, nil); n != 1 {
		t.Errorf("foreignListeners(%d, none of ours) = %d, want 1", free.Port, n)
	}
	if n := foreignListeners(free.Port, []*os.File{other}); n != 0 {
		t.Errorf("foreignListeners(%d, ours) = %d, want 0", free.Port, n)
	}
}

func TestWatchLimitNamesTheSysctlAndTheFolder(t *testing.T) {
	root := t.TempDir()
	full := filepath.Join(root, "a", "b")
	if err := os.MkdirAll(full, 0o755); err != nil {
		t.Fatal(err)
	}
	real := addWatch
	t.Cleanup(func() { addWatch = real })
	addWatch = func(w *fsnotify.Watcher, p string) error {
		if p == full {
			return syscall.ENOSPC // what inotify_add_watch says past max_user_watches
		}
		return real(w, p)
	}
	m := &matcher{include: DefaultReloadInclude, exclude: DefaultReloadExclude}
	_, err := newWatcher([]string{root}, m, DefaultReloadDelay, zerolog.Nop())
	if !errors.Is(err, ErrWatchLimit) || !strings.Contains(err.Error(), "fs.inotify.max_user_watches") || !strings.Contains(err.Error(), full) {
		t.Errorf("newWatcher with a full watch table = %v; want ErrWatchLimit naming fs.inotify.max_user_watches and %s", err, full)
	}
}
