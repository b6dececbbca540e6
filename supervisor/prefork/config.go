package prefork

import (
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/supervisor"
	"github.com/corralhq/corral/worker"
)

// Config is the process model's configuration, as Load reads it from flags
// and environment variables. The master and every worker parse the same
// arguments and environment, so both see the same values.
type Config struct {
	Host               string        // --host / HOST, default 0.0.0.0
	Port               int           // --port / PORT, default 8000; 0 picks a free port
	UDS                string        // --uds / UDS, a unix socket path served instead of Host:Port; "" = none
	Workers            int           // --workers / WORKERS, then WEB_CONCURRENCY, default supervisor.DefaultWorkers, 1..supervisor.MaxWorkers
	WorkersSet         bool          // Workers came from a flag or the environment, not the default
	Reload             bool          // --reload / RELOAD, default false
	GracefulTimeout    time.Duration // --timeout-graceful-shutdown, default 75s; 0 = cut in-flight requests at once
	KeepAliveTimeout   time.Duration // --timeout-keep-alive, default 5s; 0 = no keep-alive
	HealthcheckTimeout time.Duration // --timeout-worker-healthcheck, default 10s, at least 100ms
	UpgradeTimeout     time.Duration // --timeout-upgrade, default 2m, at least 1s
	ReadTimeout        time.Duration // --timeout-read-request, default 30s, at least 100ms

	LimitConcurrency       int   // --limit-concurrency, per worker, 0 = no limit; over it 503
	LimitMaxRequests       int   // --limit-max-requests, 0 = never recycle a worker
	LimitMaxRequestsJitter int   // --limit-max-requests-jitter, ignored while LimitMaxRequests is 0
	LimitMaxMemory         int64 // --limit-max-memory in bytes, 0 = none
	LimitRequestBody       int   // --limit-request-body in bytes, default 1 MiB, 1 KiB..1 GiB
	LimitRequestHead       int   // --limit-request-headers in bytes, default 16 KiB, 4 KiB..1 MiB
	Backlog                int   // --backlog, default 2048, 1..65535

	SocketMode    string        // --socket-mode: "reuseport" (default) or "shared", lower case
	DrainDelay    time.Duration // --drain-delay, default 0
	MetricsAddr   string        // --metrics-addr, host:port; "" = no metrics server
	MetricsToken  string        `json:"-"` // METRICS_TOKEN only; never printed
	ControlSocket string        // --control-socket; "" = the application's default
	// RequireToken (--require-token / REQUIRE_TOKEN) refuses to start
	// without the application's token and, on a metrics address other
	// hosts reach, without METRICS_TOKEN. RequireTokenFrom names the flag
	// or variable that set it, for messages.
	RequireToken     bool
	RequireTokenFrom string
	AllowedHosts     Hosts  // --allowed-hosts / ALLOWED_HOSTS; see Hosts and HostCheck
	EnvFile          string // --env-file / ENV_FILE, read before every other setting; "" = none

	SSLKeyFile         string // --ssl-keyfile / SSL_KEYFILE; "" = plain HTTP
	SSLCertFile        string // --ssl-certfile / SSL_CERTFILE; set with SSLKeyFile
	SSLKeyFilePassword string `json:"-"` // --ssl-keyfile-password / SSL_KEYFILE_PASSWORD; never printed
	SSLCACerts         string // --ssl-ca-certs / SSL_CA_CERTS: the CA of client certificates
	SSLCertReqs        int    // --ssl-cert-reqs / SSL_CERT_REQS: 0 none, 1 optional, 2 required client certificates

	LogLevel          zerolog.Level  // --log-level, default info
	LogFormat         string         // --log-format: "auto" (default, resolved by NewLogger), "console" or "json"
	AccessLog         bool           // --access-log / --no-access-log, default true
	ProxyHeaders      bool           // --proxy-headers / --no-proxy-headers, default true
	ForwardedAllowIPs worker.Proxies // --forwarded-allow-ips, default 127.0.0.1

	ReloadDirs     []string      // --reload-dir (repeatable) / RELOAD_DIRS, default ["."]
	ReloadInclude  []string      // --reload-include (repeatable) / RELOAD_INCLUDE, added to the defaults
	ReloadExclude  []string      // --reload-exclude (repeatable) / RELOAD_EXCLUDE, added to the defaults
	ReloadDelay    time.Duration // --reload-delay, default 250ms
	ReloadBuild    string        // --reload-build; "" = no build
	ReloadBuildSet bool          // ReloadBuild was given (even empty); else the application's default applies
	ReloadDrain    time.Duration // --reload-drain, default 5s

	// ShowVersion is set by --version. Load then returns at once with
	// every other field at its default and nothing else read or validated,
	// so that --version works whatever the environment holds.
	ShowVersion bool
}

// Bounds of the process model's settings that the libraries do not state.
const (
	minHealthcheckTimeout = 100 * time.Millisecond
	// A new master is a process start, a store's migrations and its
	// workers' start: under a second it could only fail.
	minUpgradeTimeout   = time.Second
	minReadTimeout      = 100 * time.Millisecond
	minLimitRequestBody = 1 << 10
	// fasthttp holds a whole request body in memory, so a larger limit is a
	// denial of service waiting for a client rather than a setting.
	maxLimitRequestBody = 1 << 30
	minLimitRequestHead = 4 << 10
	maxLimitRequestHead = 1 << 20
	minReloadDelay      = 10 * time.Millisecond
	// maxSocketPath is the longest unix socket path: sun_path holds 108
	// bytes on Linux, the terminating NUL included.
	maxSocketPath = 107
)

// defaultHost and defaultPort split supervisor.DefaultAddr, the one place
// that states them.
var defaultHost, defaultPort = func() (string, int) {
	h, p, _ := net.SplitHostPort(supervisor.DefaultAddr)
	n, _ := strconv.Atoi(p)
	return h, n
}()

// defaultProxies trusts a proxy on the same machine, as uvicorn does.
var defaultProxies = worker.Proxies{Nets: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}

// DefaultConfig returns the configuration with every setting at its
// default: what Load returns when no flag and no variable is given.
func DefaultConfig() Config {
	return Config{
		Host:               defaultHost,
		Port:               defaultPort,
		Workers:            supervisor.DefaultWorkers,
		GracefulTimeout:    supervisor.DefaultGracefulTimeout,
		KeepAliveTimeout:   worker.DefaultKeepAliveTimeout,
		HealthcheckTimeout: supervisor.DefaultHealthcheckTimeout,
		UpgradeTimeout:     supervisor.DefaultUpgradeTimeout,
		ReadTimeout:        worker.DefaultReadTimeout,
		Backlog:            supervisor.DefaultBacklog,
		SocketMode:         string(supervisor.Reuseport),
		LogLevel:           zerolog.InfoLevel,
		LogFormat:          "auto",
		AccessLog:          true,
		ProxyHeaders:       true,
		ForwardedAllowIPs:  defaultProxies,
		LimitRequestBody:   worker.DefaultMaxBodySize,
		LimitRequestHead:   worker.DefaultMaxHeaderSize,
		ReloadDirs:         []string{"."},
		ReloadDelay:        supervisor.DefaultReloadDelay,
		ReloadDrain:        supervisor.DefaultReloadDrain,
	}
}

// Addr returns the address to listen on, host:port, with brackets around
// an IPv6 host.
func (c Config) Addr() string {
	return net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
}

// Where is the address served as titles and logs show it: host:port, or
// unix:PATH with --uds.
func (c Config) Where() string {
	if c.UDS != "" {
		return "unix:" + c.UDS
	}
	return c.Addr()
}

// EffectiveWorkers is the worker count the master runs: reload mode runs one.
func (c Config) EffectiveWorkers() int {
	if c.Reload {
		return 1
	}
	return c.Workers
}

// Redacted returns c with its secrets (MetricsToken) replaced by
// "(hidden)", for logs and messages. Config has no String method so that
// a program embedding it keeps its own.
func (c Config) Redacted() Config {
	if c.MetricsToken != "" {
		c.MetricsToken = "(hidden)"
	}
	if c.SSLKeyFilePassword != "" {
		c.SSLKeyFilePassword = "(hidden)"
	}
	return c
}

// MetricsOpen reports whether the metrics address takes connections from
// other hosts without a token: set, not on a loopback address, and no
// METRICS_TOKEN.
func (c Config) MetricsOpen() bool {
	host, _, err := net.SplitHostPort(c.MetricsAddr)
	return c.MetricsAddr != "" && err == nil && supervisor.PublicHost(host) && c.MetricsToken == ""
}

// TLS reports whether c serves HTTPS.
func (c Config) TLS() bool { return c.SSLCertFile != "" }

// TLSFiles is what worker.LoadTLS reads for c.
func (c Config) TLSFiles() worker.TLSFiles {
	return worker.TLSFiles{
		CertFile:    c.SSLCertFile,
		KeyFile:     c.SSLKeyFile,
		KeyPassword: c.SSLKeyFilePassword,
		CAFile:      c.SSLCACerts,
		ClientAuth:  []tls.ClientAuthType{tls.NoClientCert, tls.VerifyClientCertIfGiven, tls.RequireAndVerifyClientCert}[c.SSLCertReqs],
	}
}

// checkTLS checks the TLS settings against each other: a key and a
// certificate go together, and client certificates need a CA to verify
// them. That the files load is checked by the master before any worker
// starts (worker.LoadTLS).
func checkTLS(c Config, given map[string]Setting) error {
	key, hasKey := given["ssl-keyfile"]
	cert, hasCert := given["ssl-certfile"]
	switch {
	case hasKey && !hasCert:
		return key.Invalid("--ssl-certfile or SSL_CERTFILE set as well")
	case hasCert && !hasKey:
		return cert.Invalid("--ssl-keyfile or SSL_KEYFILE set as well")
	case c.SSLCertReqs > 0 && c.SSLCACerts == "":
		return given["ssl-cert-reqs"].Invalid("--ssl-ca-certs or SSL_CA_CERTS set as well, to verify client certificates")
	case !hasCert && (c.SSLCertReqs > 0 || c.SSLCACerts != "" || c.SSLKeyFilePassword != ""):
		for _, name := range []string{"ssl-cert-reqs", "ssl-ca-certs"} {
			if s, ok := given[name]; ok {
				return s.Invalid("--ssl-certfile and --ssl-keyfile set as well (HTTPS)")
			}
		}
		return given["ssl-keyfile-password"].InvalidSecret("--ssl-certfile and --ssl-keyfile set as well (HTTPS)")
	case c.UDS != "" && hasCert:
		return cert.Invalid("no --uds: TLS is served on HOST:PORT")
	}
	return nil
}

// Load decides the configuration from args (without the program name) and
// lookupEnv (os.LookupEnv): each setting comes from its flag, else its
// environment variable, else its default, and every value is validated.
// The process model's options are read first, then a.Options, then
// a.Check runs. A variable that is empty or only white space counts as
// unset; values are trimmed.
//
// It returns ErrHelp for -h and --help, an error for which IsUsageError
// reports true for a command line that does not parse, and otherwise one
// line "invalid SOURCE "VALUE": want ..." naming the flag or the variable
// that supplied the first bad value.
func (a App) Load(args []string, lookupEnv func(string) (string, bool)) (Config, error) {
	c := DefaultConfig()
	opts := a.options(&c)
	if err := checkOptions(opts); err != nil {
		return Config{}, err
	}
	flags, version, err := parse(a.name(), args, opts)
	if err != nil {
		return Config{}, err
	}
	showVersion, err := version.On()
	if err != nil {
		return Config{}, err
	}
	if showVersion {
		c.ShowVersion = true
		return c, nil
	}
	given := map[string]Setting{} // by option name
	for i, o := range opts {
		s, ok := o.pick(flags[i], lookupEnv)
		if !ok {
			continue
		}
		if err := o.Set(s); err != nil {
			return Config{}, err
		}
		given[o.Name()] = s
	}
	if err := checkMetricsAddr(c, given); err != nil {
		return Config{}, err
	}
	if m, ok := given["metrics-addr"]; ok && c.RequireToken && c.MetricsOpen() {
		return Config{}, m.Invalid(fmt.Sprintf("a loopback address such as 127.0.0.1:9100, or METRICS_TOKEN set as well (%s refuses a metrics address other hosts reach without a token)", c.RequireTokenFrom))
	}
	if err := checkTLS(c, given); err != nil {
		return Config{}, err
	}
	if a.Check != nil {
		if err := a.Check(c); err != nil {
			return Config{}, err
		}
	}
	return c, nil
}

// checkOptions reports an App.Options entry that cannot work: one without
// Set or without a name, or a flag another option (the process model's
// included) already has.
func checkOptions(opts []Option) error {
	seen := map[string]bool{"help": true, "h": true, "version": true}
	for _, o := range opts {
		if o.Flag == "" && len(o.Env) == 0 {
			return errors.New("an option has neither a flag nor a variable")
		}
		if o.Set == nil {
			return fmt.Errorf("option %s has no Set", o.Name())
		}
		for _, f := range []string{o.Flag, o.NegFlag} {
			if f != "" && seen[f] {
				return fmt.Errorf("option %s: --%s is already a flag of the program", o.Name(), f)
			}
			seen[f] = true
		}
	}
	return nil
}

// AllOptions returns every option a reads, the process model's first, in
// the order usage and Load take them; the process model's write into c.
func (a App) AllOptions(c *Config) []Option { return a.options(c) }

func (a App) options(c *Config) []Option {
	return append(processOptions(c, a.name(), a.reloadBuildDefault()), a.Options...)
}

// processOptions are the settings of the process model, stored into c.
func processOptions(c *Config, name, reloadBuild string) []Option {
	socketPath := func(s Setting) error {
		return s.Invalid(fmt.Sprintf("a path of at most %d bytes, the most a unix socket address holds", maxSocketPath))
	}
	return []Option{
		{Group: GroupHTTP, Flag: "host", Master: true, Arg: "ADDR", Env: []string{"HOST"}, Default: defaultHost,
			Help: "address to listen on; :: = every IPv6 and IPv4 address",
			Set: func(s Setting) error {
				h, ok := parseHost(s.Text())
				if !ok {
					return s.Invalid("an IP address or a host name")
				}
				c.Host = h
				return nil
			}},
		{Group: GroupHTTP, Flag: "port", Master: true, Arg: "N", Env: []string{"PORT"}, Default: strconv.Itoa(defaultPort),
			Help: "0 = pick a free port (logged)",
			Set: func(s Setting) (err error) {
				c.Port, err = s.Whole(0, 65535, "a port number from 0 to 65535")
				return err
			}},
		{Group: GroupOps, Flag: "env-file", Arg: "PATH", Env: []string{"ENV_FILE"}, Default: "(none)",
			Help: "read variables from this file; the environment wins over it",
			Set: func(s Setting) error {
				// Main read the file before Load; here it is only recorded.
				c.EnvFile = s.Text()
				return nil
			}},
		{Group: GroupHTTP, Flag: "uds", Master: true, Arg: "PATH", Env: []string{"UDS"}, Default: "(none)",
			Help: "serve on this unix socket instead of HOST:PORT",
			Set: func(s Setting) error {
				t := s.Text()
				if len(t) > maxSocketPath {
					return socketPath(s)
				}
				c.UDS = t // only a flag can be empty: it overrides the variable
				return nil
			}},
		{Group: GroupProcess, Flag: "workers", Master: true, Arg: "N", Env: []string{"WORKERS", "WEB_CONCURRENCY"}, Default: strconv.Itoa(supervisor.DefaultWorkers),
			Help: fmt.Sprintf("worker processes, 1 to %d", supervisor.MaxWorkers),
			Set: func(s Setting) (err error) {
				c.Workers, err = s.Whole(1, supervisor.MaxWorkers, fmt.Sprintf("a whole number from 1 to %d", supervisor.MaxWorkers))
				c.WorkersSet = err == nil
				return err
			}},
		{Group: GroupProcess, Flag: "reload", Master: true, Env: []string{"RELOAD"}, Default: "false",
			Help: "dev mode: one worker, restarted on code changes",
			Set: func(s Setting) (err error) {
				c.Reload, err = s.Bool()
				return err
			}},
		{Group: GroupProcess, Flag: "socket-mode", Master: true, Arg: "MODE", Env: []string{"SOCKET_MODE"}, Default: string(supervisor.Reuseport),
			Help: "reuseport (a socket per worker) or shared",
			Set: func(s Setting) error {
				m := supervisor.SocketMode(s.Lower())
				if m != supervisor.Reuseport && m != supervisor.Shared {
					return s.Invalid("reuseport or shared")
				}
				c.SocketMode = string(m)
				return nil
			}},
		{Group: GroupProcess, Flag: "backlog", Master: true, Arg: "N", Env: []string{"BACKLOG"}, Default: strconv.Itoa(supervisor.DefaultBacklog),
			Help: "listen queue per socket, 1 to 65535",
			Set: func(s Setting) (err error) {
				c.Backlog, err = s.Whole(1, 65535, "a whole number from 1 to 65535")
				return err
			}},

		{Group: GroupTLS, Flag: "ssl-keyfile", Arg: "PATH", Env: []string{"SSL_KEYFILE"}, Default: "(none)",
			Help: "serve HTTPS with this private key (PEM)",
			Set:  func(s Setting) error { c.SSLKeyFile = s.Text(); return nil }},
		{Group: GroupTLS, Flag: "ssl-certfile", Arg: "PATH", Env: []string{"SSL_CERTFILE"}, Default: "(none)",
			Help: "and this certificate chain (PEM, leaf first)",
			Set:  func(s Setting) error { c.SSLCertFile = s.Text(); return nil }},
		{Group: GroupTLS, Flag: "ssl-keyfile-password", Arg: "PASS", Env: []string{"SSL_KEYFILE_PASSWORD"}, Default: "(none)",
			Help: "password of an encrypted key; prefer the variable (ps shows flags)",
			Set:  func(s Setting) error { c.SSLKeyFilePassword = s.Raw; return nil }},
		{Group: GroupTLS, Flag: "ssl-ca-certs", Arg: "PATH", Env: []string{"SSL_CA_CERTS"}, Default: "(none)",
			Help: "CA certificates (PEM) that client certificates must chain to",
			Set:  func(s Setting) error { c.SSLCACerts = s.Text(); return nil }},
		{Group: GroupTLS, Flag: "ssl-cert-reqs", Arg: "N", Env: []string{"SSL_CERT_REQS"}, Default: "0",
			Help: "client certificates: 0 none, 1 optional, 2 required",
			Set: func(s Setting) error {
				switch s.Lower() {
				case "0", "none", "cert_none":
					c.SSLCertReqs = 0
				case "1", "optional", "cert_optional":
					c.SSLCertReqs = 1
				case "2", "required", "cert_required":
					c.SSLCertReqs = 2
				default:
					return s.Invalid("0 (none), 1 (optional) or 2 (required)")
				}
				return nil
			}},
		{Group: GroupProcess, Flag: "timeout-graceful-shutdown", Arg: "DUR", Env: []string{"TIMEOUT_GRACEFUL_SHUTDOWN"}, Default: FormatDuration(supervisor.DefaultGracefulTimeout),
			Help: "drain budget per worker; 0 = cut requests at once",
			Set: func(s Setting) (err error) {
				c.GracefulTimeout, err = s.Duration(0, "0 or more")
				return err
			}},
		{Group: GroupHTTP, Flag: "timeout-keep-alive", Arg: "DUR", Env: []string{"TIMEOUT_KEEP_ALIVE"}, Default: FormatDuration(worker.DefaultKeepAliveTimeout),
			Help: "idle connection lifetime; 0 = no keep-alive",
			Set: func(s Setting) (err error) {
				c.KeepAliveTimeout, err = s.Duration(0, "0 or more")
				return err
			}},
		{Group: GroupProcess, Flag: "timeout-worker-healthcheck", Master: true, Arg: "DUR", Env: []string{"TIMEOUT_WORKER_HEALTHCHECK"}, Default: FormatDuration(supervisor.DefaultHealthcheckTimeout),
			Help: "replace a worker silent this long; at least 100ms",
			Set: func(s Setting) (err error) {
				c.HealthcheckTimeout, err = s.Duration(minHealthcheckTimeout, "at least 100ms")
				return err
			}},
		{Group: GroupProcess, Flag: "timeout-upgrade", Master: true, Arg: "DUR", Env: []string{"TIMEOUT_UPGRADE"}, Default: FormatDuration(supervisor.DefaultUpgradeTimeout),
			Help: "an upgrade's new master must be ready within it; at least 1s",
			Set: func(s Setting) (err error) {
				c.UpgradeTimeout, err = s.Duration(minUpgradeTimeout, "at least 1s")
				return err
			}},
		{Group: GroupHTTP, Flag: "timeout-read-request", Arg: "DUR", Env: []string{"TIMEOUT_READ_REQUEST"}, Default: FormatDuration(worker.DefaultReadTimeout),
			Help: "time to read one request's headers and body; at least 100ms",
			Set: func(s Setting) (err error) {
				c.ReadTimeout, err = s.Duration(minReadTimeout, "at least 100ms")
				return err
			}},
		{Group: GroupHTTP, Flag: "limit-concurrency", Arg: "N", Env: []string{"LIMIT_CONCURRENCY"}, Default: "0",
			Help: "requests in flight per worker, then 503; 0 = none",
			Set: func(s Setting) (err error) {
				c.LimitConcurrency, err = s.Whole(0, math.MaxInt32, "a whole number, 0 for no limit")
				return err
			}},
		{Group: GroupProcess, Flag: "limit-max-requests", Master: true, Arg: "N", Env: []string{"LIMIT_MAX_REQUESTS"}, Default: "0",
			Help: "recycle a worker after N requests; 0 = never",
			Set: func(s Setting) (err error) {
				c.LimitMaxRequests, err = s.Whole(0, math.MaxInt32, "a whole number, 0 for no limit")
				return err
			}},
		{Group: GroupProcess, Flag: "limit-max-requests-jitter", Master: true, Arg: "N", Env: []string{"LIMIT_MAX_REQUESTS_JITTER"}, Default: "0",
			Help: "add 0 to N to each worker's max requests",
			Set: func(s Setting) (err error) {
				c.LimitMaxRequestsJitter, err = s.Whole(0, math.MaxInt32, "a whole number, 0 or more")
				return err
			}},
		{Group: GroupProcess, Flag: "limit-max-memory", Master: true, Arg: "SIZE", Env: []string{"LIMIT_MAX_MEMORY"}, Default: "0",
			Help: "recycle a worker whose memory (RSS) passes SIZE; 0 = none",
			Set: func(s Setting) error {
				n, ok := s.Size()
				if !ok || n != 0 && (n < 16<<20 || n > 1<<40) {
					return s.Invalid("0 or a size from 16MiB to 1TiB, such as 512MiB")
				}
				c.LimitMaxMemory = int64(n)
				return nil
			}},
		{Group: GroupProcess, Flag: "drain-delay", Master: true, Arg: "DUR", Env: []string{"DRAIN_DELAY"}, Default: "0s",
			Help: "on SIGTERM, fail /health this long before draining",
			Set: func(s Setting) (err error) {
				c.DrainDelay, err = s.Duration(0, "0 or more")
				return err
			}},
		{Group: GroupHTTP, Flag: "limit-request-body", Arg: "SIZE", Env: []string{"LIMIT_REQUEST_BODY"}, Default: "1MiB",
			Help: "largest request body, 1KiB to 1GiB; over it 413",
			Set: func(s Setting) error {
				n, ok := s.Size()
				if !ok || n < minLimitRequestBody || n > maxLimitRequestBody {
					return s.Invalid("a size from 1KiB to 1GiB in bytes or with a unit: KB, KiB, MB, MiB, GB, GiB")
				}
				c.LimitRequestBody = n
				return nil
			}},
		{Group: GroupHTTP, Flag: "limit-request-headers", Arg: "SIZE", Env: []string{"LIMIT_REQUEST_HEADERS"}, Default: "16KiB",
			Help: "largest request line plus headers, 4KiB to 1MiB; over it 431",
			Set: func(s Setting) error {
				n, ok := s.Size()
				if !ok || n < minLimitRequestHead || n > maxLimitRequestHead {
					return s.Invalid("a size from 4KiB to 1MiB in bytes or with a unit: KB, KiB, MB, MiB")
				}
				c.LimitRequestHead = n
				return nil
			}},
		{Group: GroupOps, Flag: "metrics-addr", Master: true, Arg: "ADDR", Env: []string{"METRICS_ADDR"}, Default: "(off)",
			Help: "host:port for /metrics and the status page, e.g. 127.0.0.1:9100",
			Set: func(s Setting) error {
				host, port, err := net.SplitHostPort(s.Text())
				if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
					return s.Invalid("host:port such as 127.0.0.1:9100")
				}
				if _, ok := parseHost(host); host != "" && !ok {
					return s.Invalid("host:port such as 127.0.0.1:9100")
				}
				c.MetricsAddr = s.Text()
				return nil
			}},
		{Group: GroupOps, Env: []string{"METRICS_TOKEN"}, Master: true, Default: "(none)",
			Help: "bearer token the metrics address requires",
			Set: func(s Setting) error {
				if !IsVisibleASCII(s.Text()) {
					return s.InvalidSecret("printable ASCII without spaces")
				}
				c.MetricsToken = s.Text()
				return nil
			}},
		{Group: GroupOps, Flag: "require-token", Master: true, Env: []string{"REQUIRE_TOKEN"}, Default: "false",
			Help: "refuse to start without API_TOKEN, or with a public metrics address and no METRICS_TOKEN",
			Set: func(s Setting) (err error) {
				c.RequireToken, err = s.Bool()
				c.RequireTokenFrom = s.From
				return err
			}},
		{Group: GroupOps, Flag: "allowed-hosts", Arg: "LIST", Env: []string{"ALLOWED_HOSTS"}, Default: "(see docs)",
			Help: "Host names answered, comma-separated (.example.com for subdomains, * for any); others get 421",
			Set: func(s Setting) error {
				h, bad, ok := parseHosts(s.Text())
				if !ok {
					return fmt.Errorf("invalid %s %q: %q is not a host name (want host names such as api.example.com or .example.com, comma-separated, or *)", s.From, s.Raw, bad)
				}
				c.AllowedHosts = h
				return nil
			}},
		{Group: GroupOps, Flag: "control-socket", Master: true, Arg: "PATH", Env: []string{"CONTROL_SOCKET"}, Default: "(see docs)",
			Help: "unix socket for `" + name + " status` and friends",
			Set: func(s Setting) error {
				t := s.Text()
				switch {
				case t == "": // only a flag can be empty
					return s.Invalid("a socket path (leave the flag out for the default)")
				case len(t) > maxSocketPath:
					return socketPath(s)
				}
				c.ControlSocket = t
				return nil
			}},

		{Group: GroupOps, Flag: "log-level", Arg: "LEVEL", Env: []string{"LOG_LEVEL"}, Default: "info",
			Help: "trace, debug, info, warning, error or critical",
			Set: func(s Setting) error {
				l, ok := map[string]zerolog.Level{
					"trace": zerolog.TraceLevel, "debug": zerolog.DebugLevel, "info": zerolog.InfoLevel,
					"warning": zerolog.WarnLevel, "warn": zerolog.WarnLevel, "error": zerolog.ErrorLevel,
					"critical": zerolog.FatalLevel, "fatal": zerolog.FatalLevel,
				}[s.Lower()]
				if !ok {
					return s.Invalid("trace, debug, info, warning, error or critical")
				}
				c.LogLevel = l
				return nil
			}},
		{Group: GroupOps, Flag: "log-format", Arg: "FORMAT", Env: []string{"LOG_FORMAT"}, Default: "auto",
			Help: "auto (console on a terminal, else json), console, json",
			Set: func(s Setting) error {
				f := s.Lower()
				if f != "auto" && f != "console" && f != "json" {
					return s.Invalid("auto, console or json")
				}
				c.LogFormat = f
				return nil
			}},
		{Group: GroupOps, Flag: "access-log", NegFlag: "no-access-log", Env: []string{"ACCESS_LOG"}, Default: "true",
			Help: "log one line per request",
			Set: func(s Setting) (err error) {
				c.AccessLog, err = s.Bool()
				return err
			}},
		{Group: GroupHTTP, Flag: "proxy-headers", NegFlag: "no-proxy-headers", Env: []string{"PROXY_HEADERS"}, Default: "true",
			Help: "take the access log's client from X-Forwarded-For sent by a trusted proxy",
			Set: func(s Setting) (err error) {
				c.ProxyHeaders, err = s.Bool()
				return err
			}},
		{Group: GroupHTTP, Flag: "forwarded-allow-ips", Arg: "LIST", Env: []string{"FORWARDED_ALLOW_IPS"}, Default: "127.0.0.1",
			Help: "proxies trusted with X-Forwarded-For: IPs and networks, comma-separated, or *",
			Set: func(s Setting) error {
				p, bad, ok := worker.ParseProxies(s.Text())
				if !ok {
					return fmt.Errorf("invalid %s %q: %q is not an IP address or a network like 10.0.0.0/8 (want a comma-separated list of them, or *)", s.From, s.Raw, bad)
				}
				c.ForwardedAllowIPs = p
				return nil
			}},

		{Group: GroupReload, Flag: "reload-dir", Master: true, Arg: "DIR", Env: []string{"RELOAD_DIRS"}, Default: ".", Repeat: true,
			Help: "folder to watch, recursively; repeatable",
			Set: func(s Setting) error {
				var dirs []string
				for _, d := range strings.Split(s.Text(), ",") {
					d = strings.TrimSpace(d)
					if fi, err := os.Stat(d); d == "" || err != nil || !fi.IsDir() {
						return s.Invalid("existing folders, comma-separated, none empty")
					}
					dirs = append(dirs, d)
				}
				c.ReloadDirs = dirs
				return nil
			}},
		{Group: GroupReload, Flag: "reload-include", Master: true, Arg: "GLOB", Env: []string{"RELOAD_INCLUDE"}, Repeat: true,
			Default: strings.Join(supervisor.DefaultReloadInclude, " "),
			Help:    "more file names that trigger a reload; repeatable",
			Set: func(s Setting) (err error) {
				c.ReloadInclude, err = globs(s)
				return err
			}},
		{Group: GroupReload, Flag: "reload-exclude", Master: true, Arg: "GLOB", Env: []string{"RELOAD_EXCLUDE"}, Repeat: true,
			Default: strings.Join(supervisor.DefaultReloadExclude, " "),
			Help:    "more names never watched; repeatable",
			Set: func(s Setting) (err error) {
				c.ReloadExclude, err = globs(s)
				return err
			}},
		{Group: GroupReload, Flag: "reload-delay", Master: true, Arg: "DUR", Env: []string{"RELOAD_DELAY"}, Default: FormatDuration(supervisor.DefaultReloadDelay),
			Help: "quiet time after the last change before reloading",
			Set: func(s Setting) (err error) {
				c.ReloadDelay, err = s.Duration(minReloadDelay, "at least 10ms")
				return err
			}},
		{Group: GroupReload, Flag: "reload-build", Master: true, Arg: "CMD", Env: []string{"RELOAD_BUILD"}, KeepEmpty: true,
			Default: reloadBuild,
			Help:    `build command (with go.mod in the first dir); "" = no build`,
			Set: func(s Setting) error {
				c.ReloadBuild, c.ReloadBuildSet = strings.TrimSpace(s.Raw), true
				return nil
			}},
		{Group: GroupReload, Flag: "reload-drain", Master: true, Arg: "DUR", Env: []string{"RELOAD_DRAIN"}, Default: FormatDuration(supervisor.DefaultReloadDrain),
			Help: "how long the old worker may finish after a reload",
			Set: func(s Setting) (err error) {
				c.ReloadDrain, err = s.Duration(0, "0 or more")
				return err
			}},
	}
}

// globs parses a comma list of file name patterns. An empty entry is an
// error: it is usually a variable that expanded to nothing. An empty list,
// which only a flag can give, adds no pattern.
func globs(s Setting) ([]string, error) {
	if s.Text() == "" {
		return nil, nil
	}
	var out []string
	for _, g := range strings.Split(s.Text(), ",") {
		g = strings.TrimSpace(g)
		if _, err := path.Match(g, ""); g == "" || err != nil {
			return nil, s.Invalid("file name patterns such as *.tmpl, comma-separated, none empty")
		}
		out = append(out, g)
	}
	return out, nil
}

// checkMetricsAddr refuses a metrics address on the API's port and on an
// address the API listens on too. The master would bind the API first and
// then fail on the metrics address with a message naming neither setting.
// Port 0 lets the kernel pick a free port, so it never clashes.
func checkMetricsAddr(c Config, given map[string]Setting) error {
	m, ok := given["metrics-addr"]
	if !ok {
		return nil
	}
	host, port, _ := net.SplitHostPort(c.MetricsAddr)
	if n, _ := strconv.Atoi(port); c.UDS != "" || c.Port == 0 || n != c.Port || !sameListenAddr(host, c.Host) {
		return nil
	}
	from := func(name, value string) string {
		if s, ok := given[name]; ok {
			return s.From + " " + value
		}
		return "default " + name + " " + value
	}
	return m.Invalid(fmt.Sprintf("a port other than the API's (%s, %s)", from("host", c.Host), from("port", strconv.Itoa(c.Port))))
}

// sameListenAddr reports whether listening on hosts a and b, on one port,
// takes the same address: they are equal, or either is every address
// ("" in host:port, 0.0.0.0 or ::). Host names are compared, not resolved.
func sameListenAddr(a, b string) bool {
	ipA, errA := netip.ParseAddr(a)
	ipB, errB := netip.ParseAddr(b)
	switch {
	case a == "" || b == "" || errA == nil && ipA.Unmap().IsUnspecified() || errB == nil && ipB.Unmap().IsUnspecified():
		return true
	case errA == nil && errB == nil:
		return ipA.Unmap() == ipB.Unmap()
	}
	return LowerASCII(strings.TrimSuffix(a, ".")) == LowerASCII(strings.TrimSuffix(b, "."))
}
