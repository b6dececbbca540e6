// Command server is Corral: a supervisor of worker processes and the
// LLM-agent API they serve, in one binary.
//
// Run without role marker it is the master: it re-executes itself once so
// that ps shows a readable title, binds the sockets and supervises workers,
// which are this same binary re-executed with the marker set (see package
// protocol).
package main

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"

	"github.com/corralhq/corral/supervisor"
	"github.com/corralhq/corral/supervisor/protocol"
)

// version is stamped by the Makefile with -ldflags "-X main.version=...".
var version = "dev"

// Exit statuses, as uvicorn and gunicorn use them.
const (
	exitOK        = 0
	exitError     = 1
	exitUsage     = 2
	exitBootError = 3
)

func main() {
	os.Exit(run(os.Stdout, os.Stderr))
}

// run is the whole program; it returns the exit status.
func run(stdout, stderr io.Writer) int {
	role := os.Getenv(protocol.EnvRole)
	if role == "" && len(os.Args) > 1 && subcommands[os.Args[1]] != "" {
		return runCLI(os.Args[1], os.Args[2:], stdout, stderr)
	}
	args, err := programArgs(role)
	if err != nil {
		fmt.Fprintln(stderr, "server:", err)
		return exitUsage
	}
	cfg, err := loadConfig(args, os.LookupEnv)
	switch {
	case errors.Is(err, errHelp):
		usage(stdout)
		return exitOK
	case err != nil && isUsageError(err):
		fmt.Fprintln(stderr, "server:", err)
		usage(stderr)
		return exitUsage
	case err != nil:
		fmt.Fprintln(stderr, "server:", err)
		return exitUsage
	}
	if cfg.ShowVersion {
		fmt.Fprintf(stdout, "server %s (%s, %s/%s)\n", version, runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return exitOK
	}
	logOut := stderr
	if role == protocol.RoleWorker {
		// The supervisor hands the worker its own stderr for whole log
		// lines; the worker's fd 2 is a pipe for everything else.
		if f := os.NewFile(protocol.LogFD, "log"); f != nil {
			logOut = f
		}
	}
	log := newLogger(cfg, logOut)
	switch role {
	case protocol.RoleWorker:
		setComm("worker")
		return runWorker(cfg, log)
	case "":
		reexecMaster(cfg, args, log) // returns only if exec failed
	}
	setComm("master")
	return runMaster(cfg, args, log)
}

// programArgs returns the command-line arguments: the process's own, or,
// in a process the server re-executed, the ones carried in EnvArgs so that
// argv can hold the title alone.
func programArgs(role string) ([]string, error) {
	enc := os.Getenv(protocol.EnvArgs)
	if role == "" || enc == "" {
		return os.Args[1:], nil
	}
	var args []string
	if err := json.Unmarshal([]byte(enc), &args); err != nil {
		return nil, fmt.Errorf("invalid %s %q: it is set by the server itself; unset it", protocol.EnvArgs, enc)
	}
	return args, nil
}

// reexecMaster replaces the process image with itself, same pid, with argv
// holding only the master's title, so ps and htop read
// "server: master [4 workers, 0.0.0.0:8000]". The title is padded so that
// the supervisor can rewrite it in place when the worker count changes.
func reexecMaster(cfg config, args []string, log zerolog.Logger) {
	exe, err := os.Executable()
	if err != nil {
		log.Debug().Err(err).Msg("no re-exec for the process title")
		return
	}
	enc, _ := json.Marshal(args)
	title := fmt.Sprintf("%s: master [%d workers, %s]", filepath.Base(exe), effectiveWorkers(cfg), cfg.where())
	title += strings.Repeat(" ", 24)
	env := append(os.Environ(), protocol.EnvRole+"="+protocol.RoleMaster, protocol.EnvArgs+"="+string(enc))
	err = syscall.Exec(exe, []string{title}, env)
	log.Debug().Err(err).Msg("no re-exec for the process title")
}

// effectiveWorkers is the worker count the master runs: reload mode runs one.
func effectiveWorkers(cfg config) int {
	if cfg.Reload {
		return 1
	}
	return cfg.Workers
}

func runMaster(cfg config, args []string, log zerolog.Logger) int {
	// The markers served the re-exec; children get fresh ones.
	os.Unsetenv(protocol.EnvRole)
	os.Unsetenv(protocol.EnvArgs)
	workers := effectiveWorkers(cfg)
	if cfg.Reload {
		if cfg.WorkersSet && cfg.Workers > 1 {
			log.Warn().Int("workers", cfg.Workers).Msg("RELOAD/--reload runs one worker; WORKERS/--workers is ignored")
		}
	}
	st, err := prepareStore(cfg, log)
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitBootError
	}
	defer st.Close()
	reaper := newOrphanReaper(st, log, cfg.ChatMaxAttempts)
	defer reaper.close()

	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU)
	defer signal.Stop(sigs)

	// Socket activation: systemd passed the listening socket(s).
	listeners := activation.Files(true)
	if len(listeners) > 0 {
		log.Info().Int("sockets", len(listeners)).Msg("using sockets from systemd")
	}
	sup, err := supervisor.New(supervisor.Config{
		Listeners:          listeners,
		DrainDelay:         cfg.DrainDelay,
		ControlSocket:      controlPath(cfg.ControlSocket, cfg.DatabaseURL),
		MaxMemory:          uint64(cfg.LimitMaxMemory),
		MetricsAddr:        cfg.MetricsAddr,
		MetricsToken:       cfg.MetricsToken,
		Recent:             recentActivities(st),
		Version:            version,
		Store:              describeStore(st.Path()),
		LLM:                describeLLM(cfg),
		Addr:               cfg.addr(),
		UDS:                cfg.UDS,
		Workers:            workers,
		SocketMode:         supervisor.SocketMode(cfg.SocketMode),
		Backlog:            cfg.Backlog,
		GracefulTimeout:    graceful(cfg),
		HealthcheckTimeout: cfg.HealthcheckTimeout,
		MaxRequests:        cfg.LimitMaxRequests,
		MaxRequestsJitter:  cfg.LimitMaxRequestsJitter,
		Args:               args,
		Signals:            sigs,
		Logger:             log,
		SetTitle:           true,
		OnWorkerExit:       reaper.workerExited,
		Reload:             reloadConfig(cfg, st.Path()),
	})
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		fmt.Fprintln(os.Stderr, "server:", err)
		return exitError
	}
	if err := sup.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		if errors.Is(err, supervisor.ErrBoot) {
			return exitBootError
		}
		return exitError
	}
	return exitOK
}

// describeStore names the database for status output: an SQLite file, or
// the PostgreSQL URL the store gives without its password.
func describeStore(path string) string {
	if strings.Contains(path, "://") {
		return path
	}
	return "sqlite:" + path
}

// describeLLM names the provider for status output, without secrets.
func describeLLM(cfg config) string {
	switch {
	case cfg.LLMProvider == "openai":
		host := cfg.LLMBaseURL
		if u, err := url.Parse(cfg.LLMBaseURL); err == nil {
			host = u.Host
		}
		return "openai at " + host + " (model " + cmp.Or(cfg.LLMModel, "default") + ")"
	case cfg.SimulatedLatency > 0:
		return "simulated (" + cfg.SimulatedLatency.String() + " per reply)"
	}
	return "simulated"
}

// reloadConfig is the supervisor's reload configuration, nil unless reload
// mode is on. The database's folder is never watched, so its writes never
// trigger a reload.
func reloadConfig(cfg config, dbPath string) *supervisor.ReloadConfig {
	if !cfg.Reload {
		return nil
	}
	build := cfg.ReloadBuild
	if !cfg.ReloadBuildSet {
		if _, err := os.Stat(filepath.Join(cfg.ReloadDirs[0], "go.mod")); err == nil {
			build = defaultReloadBuild
		}
	}
	return &supervisor.ReloadConfig{
		Dirs:        cfg.ReloadDirs,
		Include:     cfg.ReloadInclude,
		Exclude:     cfg.ReloadExclude,
		ExcludeDirs: dataDirsBelow(filepath.Dir(dbPath), cfg.ReloadDirs),
		Delay:       cfg.ReloadDelay,
		Build:       build,
		Drain:       max(cfg.ReloadDrain, time.Nanosecond),
	}
}

// dataDirsBelow returns dir when it lies inside one of the reload folders,
// so that the database's writes are never watched. A database folder that
// holds a reload folder (data/ around src/) excludes nothing: excluding it
// would silence the whole tree.
func dataDirsBelow(dir string, roots []string) []string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil
	}
	for _, r := range roots {
		ar, err := filepath.Abs(r)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(ar, abs); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			return []string{abs}
		}
	}
	return nil
}

// defaultReloadBuild builds this server into the path the supervisor gives.
const defaultReloadBuild = `go build -o "$OUTPUT" ./cmd/server`

// graceful is the drain budget. The libraries read a zero budget as "use
// the default", so "cut requests at once" (0) becomes the smallest budget.
func graceful(cfg config) time.Duration {
	return max(cfg.GracefulTimeout, time.Nanosecond)
}

// newLogger builds the root logger: console lines on a terminal, JSON
// otherwise, unless the configuration says which.
func newLogger(cfg config, stderr io.Writer) zerolog.Logger {
	var w io.Writer = stderr
	f, isFile := stderr.(*os.File)
	terminal := isFile && isatty.IsTerminal(f.Fd())
	format := cfg.LogFormat
	if format == "auto" {
		format = "json"
		if terminal {
			format = "console"
		}
	}
	if format == "console" {
		// Colours only on a terminal: a journal or a file gets plain text.
		w = zerolog.ConsoleWriter{Out: stderr, TimeFormat: "15:04:05.000", NoColor: !terminal}
	}
	zerolog.TimeFieldFormat = "2006-01-02T15:04:05.000Z07:00"
	// Durations (uptime, startup, budget, delay) in seconds, as a float.
	zerolog.DurationFieldUnit = time.Second
	return zerolog.New(w).Level(cfg.LogLevel).With().Timestamp().Logger()
}

// setComm sets the short process name that ps -o comm, top and htop's
// tree show: "server-master" or "server-worker" (15 bytes at most).
func setComm(role string) {
	exe, err := os.Executable()
	if err != nil {
		return
	}
	// The kernel keeps 15 bytes; shorten the program name, never the role.
	base := filepath.Base(exe)
	base = base[:min(len(base), 15-1-len(role))]
	name := base + "-" + role
	// /proc/self/comm is the main thread's name, whichever thread writes it.
	_ = os.WriteFile("/proc/self/comm", []byte(name), 0)
}
