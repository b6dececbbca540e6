package prefork

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
	"github.com/valyala/fasthttp"

	"github.com/corralhq/corral/supervisor"
	"github.com/corralhq/corral/supervisor/protocol"
	"github.com/corralhq/corral/worker"
)

// Exit statuses of Main, as uvicorn and gunicorn use them.
const (
	ExitOK    = 0
	ExitError = 1 // the master could not start or stopped on an error
	ExitUsage = 2 // a bad command line, flag or variable
	ExitBoot  = 3 // a worker of the first generation (or App.Master) failed
)

// App is an HTTP application run by Main under the process model. Set
// Handler or FastHandler, or fill the worker's handler in Worker.
type App struct {
	// Name names the program in usage, messages ("NAME: invalid ..."),
	// process titles ("NAME: worker 2 [gen 1]") and the control socket.
	// Default: the executable's base name.
	Name string
	// Version is what --version and the status show. Default "dev".
	Version string
	// Handler is a net/http application, served through worker.RunHTTP.
	Handler http.Handler
	// FastHandler is a fasthttp application, served through worker.Run;
	// it is used when Handler is nil.
	FastHandler fasthttp.RequestHandler
	// Options are the application's own settings, read after the process
	// model's with the same precedence and listed by --help.
	Options []Option
	// Check, if set, runs after every option was read, for checks across
	// settings; its error is reported as a bad setting.
	Check func(c Config) error
	// UsageHead is printed by --help before the table of settings, and
	// UsageFoot after it. Default: "Usage: NAME [flags]".
	UsageHead, UsageFoot string
	// ReloadBuild is the build command of reload mode when --reload-build
	// is not given and the first reload folder holds go.mod. Default: go
	// build of the main package this binary was built from, by its import
	// path, when the first reload folder is inside a module.
	ReloadBuild string
	// Master, if set, runs in the master before the supervisor binds
	// anything. It may fill in sc (status hooks, OnWorkerExit,
	// ControlSocket, Reload.ExcludeDirs) and returns a function Main calls
	// once the supervisor has stopped. An error stops the server with
	// ExitBoot before any worker starts.
	Master func(c Config, log zerolog.Logger, sc *supervisor.Config) (stop func(), err error)
	// Worker, if set, runs in every worker before it serves. It may set
	// any field of wc, the handler included, and returns a function Main
	// calls after the drain. An error exits the worker with ExitBoot.
	Worker func(c Config, in worker.Info, log zerolog.Logger, wc *worker.Config) (stop func(), err error)
}

func (a App) name() string {
	if a.Name != "" {
		return a.Name
	}
	if exe, err := os.Executable(); err == nil {
		return filepath.Base(exe)
	}
	return filepath.Base(os.Args[0])
}

func (a App) version() string {
	if a.Version != "" {
		return a.Version
	}
	return "dev"
}

// reloadBuildDefault is the build command reload mode runs by default.
func (a App) reloadBuildDefault() string {
	if a.ReloadBuild != "" {
		return a.ReloadBuild
	}
	pkg := "."
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Path != "" && !strings.HasSuffix(bi.Path, ".test") {
		pkg = bi.Path
	}
	return `go build -o "$OUTPUT" ` + pkg
}

// inModule reports whether reload mode can build in dir: it holds go.mod,
// or, for the default build by import path, a folder above it does.
func (a App) inModule(dir string) bool {
	for d, _ := filepath.Abs(dir); ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return true
		}
		if a.ReloadBuild != "" || d == filepath.Dir(d) {
			return false
		}
	}
}

// Usage writes a's --help text to w.
func (a App) Usage(w io.Writer) {
	head := a.UsageHead
	if head == "" {
		head = "Usage: " + a.name() + " [flags]\n\n"
	}
	writeUsage(w, head, a.UsageFoot, a.options(new(Config)))
}

// Main runs a and returns the exit status for os.Exit. Started by hand it
// is the master: it re-executes itself once so that ps shows a readable
// title, binds the sockets and supervises workers, which are this same
// binary re-executed with the role marker of package protocol. It reads
// os.Args, so a program with subcommands dispatches them before calling
// Main.
func Main(a App) int { return a.run(os.Stdout, os.Stderr) }

func (a App) run(stdout, stderr io.Writer) int {
	name := a.name()
	if a.Handler == nil && a.FastHandler == nil && a.Worker == nil {
		// A bug of the program, said before anything binds.
		fmt.Fprintf(stderr, "%s: prefork.App has no Handler, FastHandler or Worker to serve with\n", name)
		return ExitBoot
	}
	role := os.Getenv(protocol.EnvRole)
	logOut := stderr
	if journalStream(stderr, os.Getenv("JOURNAL_STREAM")) {
		// Plain-text errors carry their priority, as log lines do.
		stderr = errorLines{stderr}
	}
	args, err := programArgs(role)
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	}
	lookupEnv := os.LookupEnv
	envPath := envFileArg(args, os.LookupEnv)
	var vars map[string]string
	if envPath != "" {
		vars, err = ReadEnvFile(envPath)
		if err != nil {
			fmt.Fprintf(stderr, "%s: %v\n", name, err)
			return ExitUsage
		}
		lookupEnv = withEnvFile(os.LookupEnv, vars)
		// A worker puts the file's variables in its own environment, so
		// the libraries it runs see them too. The master does not: its
		// workers must start from the environment the user gave, so that
		// one started after the file changed reads the new values.
		if role == protocol.RoleWorker {
			hidden := a.masterVars()
			for k, v := range vars {
				if _, set := os.LookupEnv(k); !set && !hidden[k] {
					os.Setenv(k, v)
				}
			}
		}
	}
	if role == protocol.RoleWorker {
		lookupEnv = withoutVars(lookupEnv, a.masterVars())
	}
	cfg, err := a.Load(args, lookupEnv)
	if err != nil {
		err = blameEnvFile(err, vars, envPath)
	}
	switch {
	case errors.Is(err, ErrHelp):
		a.Usage(stdout)
		return ExitOK
	case err != nil && IsUsageError(err):
		// The error and one line, not the whole usage: the error must not
		// scroll away.
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		fmt.Fprintf(stderr, "Run \"%s --help\" for every flag and variable.\n", name)
		return ExitUsage
	case err != nil:
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	}
	if cfg.ShowVersion {
		fmt.Fprintf(stdout, "%s %s (%s, %s/%s)\n", name, a.version(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
		return ExitOK
	}
	if role == protocol.RoleWorker {
		// The supervisor hands the worker its own stderr for whole log
		// lines; the worker's fd 2 is a pipe for everything else.
		if f := os.NewFile(protocol.LogFD, "log"); f != nil {
			logOut = f
		}
	}
	log := NewLogger(cfg, logOut)
	switch role {
	case protocol.RoleWorker:
		setComm(a.name(), "worker")
		return a.runWorker(cfg, log, stderr)
	case "":
		reexecMaster(a.name(), cfg, args, log) // returns only if exec failed
	}
	setComm(a.name(), "master")
	return a.runMaster(cfg, args, log, stderr)
}

// programArgs returns the command-line arguments: the process's own, or,
// in a process the master re-executed, the ones carried in EnvArgs so that
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

// masterVars names the variables of the options only the master reads.
func (a App) masterVars() map[string]bool {
	vars := map[string]bool{}
	for _, o := range a.options(new(Config)) {
		if o.Master {
			for _, e := range o.Env {
				vars[e] = true
			}
		}
	}
	return vars
}

// workerArgs returns args without the flags of master-only options, each
// remaining flag as --name=value. It never returns nil, which the
// supervisor would read as "the master's own arguments". Load parsed args
// already, so parse cannot fail here.
func (a App) workerArgs(args []string) []string {
	opts := a.options(new(Config))
	flags, _, err := parse(a.name(), args, opts)
	if err != nil {
		return []string{}
	}
	out := []string{}
	for i, o := range opts {
		if flags[i].Given && !o.Master {
			out = append(out, flags[i].From+"="+flags[i].Raw)
		}
	}
	return out
}

// withoutVars is lookupEnv with the variables in hidden unset.
func withoutVars(lookupEnv func(string) (string, bool), hidden map[string]bool) func(string) (string, bool) {
	return func(name string) (string, bool) {
		if hidden[name] {
			return "", false
		}
		return lookupEnv(name)
	}
}

// withoutEnv returns env (KEY=VALUE entries) without the variables in
// hidden.
func withoutEnv(env []string, hidden map[string]bool) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if k, _, _ := strings.Cut(kv, "="); !hidden[k] {
			out = append(out, kv)
		}
	}
	return out
}

// reexecMaster replaces the process image with itself, same pid, with argv
// holding only the master's title, so ps and htop read
// "server: master [4 workers, 0.0.0.0:8000]". The title is padded so that
// the supervisor can rewrite it in place when the worker count changes.
func reexecMaster(name string, cfg Config, args []string, log zerolog.Logger) {
	enc, _ := json.Marshal(args)
	title := supervisor.MasterTitle(name, cfg.EffectiveWorkers(), cfg.Where())
	title += strings.Repeat(" ", 24)
	env := append(os.Environ(), protocol.EnvRole+"="+protocol.RoleMaster, protocol.EnvArgs+"="+string(enc))
	// /proc/self/exe is the file this process runs, even if another was
	// installed at exe since.
	err := syscall.Exec("/proc/self/exe", []string{title}, env)
	log.Debug().Err(err).Msg("no re-exec for the process title")
}

// SupervisorConfig is the supervisor's configuration for c: what Main
// gives supervisor.New before App.Master adds to it.
func (c Config) SupervisorConfig() supervisor.Config {
	sc := supervisor.Config{
		DrainDelay:         c.DrainDelay,
		ControlSocket:      c.ControlSocket,
		MaxMemory:          uint64(c.LimitMaxMemory),
		MetricsAddr:        c.MetricsAddr,
		MetricsToken:       c.MetricsToken,
		MetricsHostAllowed: c.HostCheck(c.MetricsToken != ""),
		Addr:               c.Addr(),
		UDS:                c.UDS,
		TLS:                c.TLS(),
		Workers:            c.EffectiveWorkers(),
		SocketMode:         supervisor.SocketMode(c.SocketMode),
		Backlog:            c.Backlog,
		GracefulTimeout:    c.graceful(),
		HealthcheckTimeout: c.HealthcheckTimeout,
		UpgradeTimeout:     c.UpgradeTimeout,
		MaxRequests:        c.LimitMaxRequests,
		MaxRequestsJitter:  c.LimitMaxRequestsJitter,
	}
	if c.Reload {
		sc.Reload = &supervisor.ReloadConfig{
			Dirs:    c.ReloadDirs,
			Include: c.ReloadInclude,
			Exclude: c.ReloadExclude,
			Delay:   c.ReloadDelay,
			Build:   c.ReloadBuild,
			Drain:   max(c.ReloadDrain, time.Nanosecond),
		}
		if c.EnvFile != "" {
			// A change of the env file restarts the worker, which reads it
			// anew; its folder is watched when no reload folder holds it.
			sc.Reload.Include = append(slices.Clip(sc.Reload.Include), filepath.Base(c.EnvFile))
			if !insideAny(filepath.Dir(c.EnvFile), c.ReloadDirs) {
				sc.Reload.Dirs = append(slices.Clip(sc.Reload.Dirs), filepath.Dir(c.EnvFile))
			}
		}
	}
	return sc
}

// WorkerConfig is the worker's configuration for c, without a handler:
// what Main gives worker.Run before App.Worker adds to it.
func (c Config) WorkerConfig() worker.Config {
	wc := worker.Config{
		AccessLog:        c.AccessLog,
		GracefulTimeout:  c.graceful(),
		KeepAliveTimeout: c.KeepAliveTimeout,
		ReadTimeout:      c.ReadTimeout,
		DisableKeepAlive: c.KeepAliveTimeout == 0,
		MaxBodySize:      c.LimitRequestBody,
		MaxHeaderSize:    c.LimitRequestHead,
		MaxConcurrency:   c.LimitConcurrency,
		DrainHealth:      true,
	}
	if c.AllowedHosts.Given && !c.AllowedHosts.Any {
		wc.HostAllowed = c.AllowedHosts.Allow
	}
	if c.ProxyHeaders {
		p := c.ForwardedAllowIPs
		wc.Proxies = &p
	}
	return wc
}

// graceful is the drain budget. The libraries read a zero budget as "use
// the default", so "cut requests at once" (0) becomes the smallest budget.
func (c Config) graceful() time.Duration {
	return max(c.GracefulTimeout, time.Nanosecond)
}

func (a App) runMaster(cfg Config, args []string, log zerolog.Logger, stderr io.Writer) int {
	name := a.name()
	// The markers served the re-exec; children get fresh ones.
	os.Unsetenv(protocol.EnvRole)
	os.Unsetenv(protocol.EnvArgs)
	if cfg.MetricsOpen() {
		// Refused under --require-token by Load.
		log.Warn().Str("addr", cfg.MetricsAddr).Str("fix", "set METRICS_TOKEN, or a loopback METRICS_ADDR").
			Msg("the metrics address is open to other hosts without a token: anyone who reaches it reads the status, every worker's pid and the recent activities")
	}
	if cfg.Reload && cfg.WorkersSet && cfg.Workers > 1 {
		log.Warn().Int("workers", cfg.Workers).Msg("RELOAD/--reload runs one worker; WORKERS/--workers is ignored")
	}
	if cfg.TLS() {
		// The files are checked before anything starts, so that a bad one
		// is a usage error naming it rather than every worker failing.
		if _, err := worker.LoadTLS(cfg.TLSFiles()); err != nil {
			log.Error().Err(err).Msg("cannot serve HTTPS")
			return ExitUsage
		}
	}
	sc := cfg.SupervisorConfig()
	sc.Name, sc.Args = a.name(), args
	if cfg.MetricsOpen() {
		sc.StatusNotes = append(sc.StatusNotes, "WARNING: metrics open to other hosts, no METRICS_TOKEN")
	}
	// Workers get the settings they use and no more: no flag or variable
	// of a master-only option (the metrics token above all).
	sc.WorkerArgs = a.workerArgs(args)
	sc.Env = withoutEnv(os.Environ(), a.masterVars())
	sc.Logger = log
	sc.SetTitle = true
	sc.Version = a.version()
	if sc.ControlSocket == "" {
		if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
			sc.ControlSocket = filepath.Join(strings.Split(d, ":")[0], name+".sock")
		}
	}
	if sc.Reload != nil && !cfg.ReloadBuildSet {
		sc.Reload.Build = ""
		if a.inModule(cfg.ReloadDirs[0]) {
			sc.Reload.Build = a.reloadBuildDefault()
		}
	}
	// A master started by an upgrade inherits its sockets (and the
	// application's files) from the master it replaces, and tells it if it
	// cannot start.
	handoff, err := supervisor.Inherited()
	if err != nil {
		log.Error().Err(err).Msg("cannot start")
		return ExitUsage
	}
	sc.Upgrade = handoff
	if handoff != nil {
		log.Info().Int("old_pid", handoff.ParentPID).Str("old_version", handoff.ParentVersion).Str("version", sc.Version).Msg("upgrade: new master starting")
	} else {
		// Socket activation: systemd passed the listening socket(s).
		if lns := activation.Files(true); len(lns) > 0 {
			log.Info().Int("sockets", len(lns)).Msg("using sockets from systemd")
			sc.Listeners = lns
		}
		// A failure is printed once, as a log line in the configured format.
		// The port comes first: a second copy of the server on the same port
		// and database must hear about the port, not about what App.Master
		// found the first copy holding.
		if err := supervisor.CheckAddr(sc); err != nil {
			if _, ok := errors.AsType[*net.DNSError](err); ok {
				err = fmt.Errorf("--host (HOST): %w", err)
			}
			log.Error().Err(err).Msg("cannot start")
			return ExitError
		}
	}
	if a.Master != nil {
		stop, err := a.Master(cfg, log, &sc)
		if err != nil {
			handoff.Fail(err)
			log.Error().Err(err).Msg("cannot start")
			return ExitBoot
		}
		if stop != nil {
			defer stop()
		}
	}

	sigs := make(chan os.Signal, 16)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT, syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	sc.Signals = sigs

	sup, err := supervisor.New(sc)
	if err != nil {
		handoff.Fail(err)
		log.Error().Err(err).Msg("cannot start")
		return ExitError
	}
	if err := sup.Run(); err != nil { // Run reported it to an old master
		// A boot failure was logged by the supervisor as it happened,
		// with the worker's own error before it.
		if errors.Is(err, supervisor.ErrBoot) {
			return ExitBoot
		}
		log.Error().Err(err).Msg("stopped on an error")
		return ExitError
	}
	return ExitOK
}

func (a App) runWorker(cfg Config, log zerolog.Logger, stderr io.Writer) int {
	name := a.name()
	in, err := worker.Self()
	if err != nil {
		if errors.Is(err, worker.ErrNotWorker) {
			err = fmt.Errorf("%w (unset the CORRAL_* variables)", err)
		}
		fmt.Fprintf(stderr, "%s: %v\n", name, err)
		return ExitUsage
	}
	log = log.With().Int("worker", in.Slot).Int("pid", in.PID).Logger()
	// A worker drains on TERM and INT; HUP, TTIN, TTOU and USR2 are the
	// supervisor's to act on, so a "pkill -HUP server" must not kill workers.
	signal.Ignore(syscall.SIGHUP, syscall.SIGTTIN, syscall.SIGTTOU, syscall.SIGUSR2)
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	wc := cfg.WorkerConfig()
	if cfg.TLS() {
		// Read at every start, so a roll (SIGHUP) serves renewed files.
		tc, err := worker.LoadTLS(cfg.TLSFiles())
		if err != nil {
			log.Error().Err(err).Msg("cannot serve HTTPS")
			return ExitBoot
		}
		wc.TLS = tc
	}
	wc.Logger = log
	wc.Signals = sigs
	wc.Handler = a.FastHandler
	if a.Handler != nil {
		wc.Handler = worker.HTTPHandler(a.Handler)
	}
	if a.Worker != nil {
		stop, err := a.Worker(cfg, in, log, &wc)
		if err != nil {
			log.Error().Err(err).Msg("worker cannot start")
			return ExitBoot
		}
		if stop != nil {
			defer stop()
		}
	}
	if err := worker.Run(in, wc); err != nil {
		log.Error().Err(err).Msg("worker failed")
		return ExitBoot
	}
	return ExitOK
}

// NewLogger builds the root logger: console lines on a terminal, JSON
// otherwise, unless the configuration says which. Under systemd, when
// stderr is the journal's stream, every line starts with its syslog
// priority ("<3>" for an error), which journald records. It sets three of
// zerolog's globals, for every logger of the program: times to the
// millisecond, durations in milliseconds, floats to 3 decimals.
func NewLogger(cfg Config, stderr io.Writer) zerolog.Logger {
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
	var console *zerolog.ConsoleWriter
	if format == "console" {
		// Colours only on a terminal: a journal or a file gets plain text.
		console = &zerolog.ConsoleWriter{Out: stderr, TimeFormat: "15:04:05.000", NoColor: !terminal,
			// The access log reads as uvicorn's does: client, request, status.
			FieldsOrder: []string{"remote", "method", "path", "query", "http_version", "status", "user_agent", "request_id", "duration_ms", "bytes"}}
		w = console
	}
	if journalStream(stderr, os.Getenv("JOURNAL_STREAM")) {
		w = newJournalWriter(stderr, console)
	}
	zerolog.TimeFieldFormat = "2006-01-02T15:04:05.000Z07:00"
	// Durations in milliseconds with at most 3 decimals; every duration
	// field says so in its name (startup_ms, uptime_ms, budget_ms, ...).
	zerolog.DurationFieldUnit = time.Millisecond
	zerolog.FloatingPointPrecision = 3
	return zerolog.New(w).Level(cfg.LogLevel).With().Timestamp().Logger()
}

// setComm sets the short process name that ps -o comm, top and htop's
// tree show: "NAME-master" or "NAME-worker" (15 bytes at most).
func setComm(name, role string) {
	// The kernel keeps 15 bytes; shorten the program name, never the role.
	name = name[:min(len(name), 15-1-len(role))] + "-" + role
	// /proc/self/comm is the main thread's name, whichever thread writes it.
	_ = os.WriteFile("/proc/self/comm", []byte(name), 0)
}

// insideAny reports whether dir is one of roots or lies below one.
func insideAny(dir string, roots []string) bool {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return false
	}
	for _, r := range roots {
		ar, err := filepath.Abs(r)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(ar, abs); err == nil && !strings.HasPrefix(rel, "..") {
			return true
		}
	}
	return false
}
