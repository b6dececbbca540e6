package main

import (
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/worker"
)

// option is one setting: where it comes from, how usage shows it, and how
// its value is checked and stored.
type option struct {
	group   string
	flag    string   // without dashes; "" for a setting read only from the environment
	negFlag string   // the --no-* form of a switch, or ""
	arg     string   // placeholder for the value in usage; "" for a switch
	env     []string // read in this order; the first one set wins
	def     string   // the default as usage and the docs show it
	help    string
	// repeat lets the flag be given several times; the values add up, as a
	// comma list does in the variable.
	repeat bool
	// keepEmpty makes a variable set to "" a value rather than unset.
	keepEmpty bool
	set       func(c *config, s setting) error
}

// name is the option's flag, or its first variable when it has no flag.
func (o option) name() string {
	if o.flag == "" {
		return o.env[0]
	}
	return o.flag
}

// pick returns the setting o takes: the flag if given, else the first of
// its variables that is set and not blank (or, with keepEmpty, set at all).
func (o option) pick(flag flagSlot, lookupEnv func(string) (string, bool)) (setting, bool) {
	if flag.set {
		return flag.s, true
	}
	for _, name := range o.env {
		if v, set := lookupEnv(name); set && (strings.TrimSpace(v) != "" || o.keepEmpty) {
			return setting{raw: v, from: name}, true
		}
	}
	return setting{}, false
}

// optionNamed returns the option whose name is name; it panics on a name
// no option has, which is a bug.
func optionNamed(name string) option {
	for _, o := range options {
		if o.name() == name {
			return o
		}
	}
	panic("no option " + name)
}

var options = []option{
	{group: groupServer, flag: "host", arg: "ADDR", env: []string{"HOST"}, def: defaultHost,
		help: "address to listen on; :: = every IPv6 and IPv4 address",
		set: func(c *config, s setting) error {
			h, ok := parseHost(s.text())
			if !ok {
				return s.invalid("an IP address or a host name")
			}
			c.Host = h
			return nil
		}},
	{group: groupServer, flag: "port", arg: "N", env: []string{"PORT"}, def: strconv.Itoa(defaultPort),
		help: "0 = pick a free port (logged)",
		set: func(c *config, s setting) (err error) {
			c.Port, err = s.whole(0, 65535, "a port number from 0 to 65535")
			return err
		}},
	{group: groupServer, flag: "uds", arg: "PATH", env: []string{"UDS"}, def: "(none)",
		help: "serve on this unix socket instead of HOST:PORT",
		set: func(c *config, s setting) error {
			t := s.text()
			switch {
			case t == "": // only a flag can be empty: it overrides the variable
				c.UDS = ""
				return nil
			case len(t) > maxSocketPath:
				return s.invalid(fmt.Sprintf("a path of at most %d bytes, the most a unix socket address holds", maxSocketPath))
			}
			c.UDS = t
			return nil
		}},
	{group: groupServer, flag: "workers", arg: "N", env: []string{"WORKERS", "WEB_CONCURRENCY"}, def: strconv.Itoa(defaultWorkers),
		help: "worker processes, 1 to 512",
		set: func(c *config, s setting) (err error) {
			c.Workers, err = s.whole(1, maxWorkers, "a whole number from 1 to 512")
			c.WorkersSet = err == nil
			return err
		}},
	{group: groupServer, flag: "reload", env: []string{"RELOAD"}, def: "false",
		help: "dev mode: one worker, restarted on code changes",
		set: func(c *config, s setting) (err error) {
			c.Reload, err = s.boolean()
			return err
		}},
	{group: groupServer, flag: "socket-mode", arg: "MODE", env: []string{"SOCKET_MODE"}, def: socketReuseport,
		help: "reuseport (a socket per worker) or shared",
		set: func(c *config, s setting) error {
			m := lowerASCII(s.text())
			if m != socketReuseport && m != socketShared {
				return s.invalid("reuseport or shared")
			}
			c.SocketMode = m
			return nil
		}},
	{group: groupServer, flag: "backlog", arg: "N", env: []string{"BACKLOG"}, def: strconv.Itoa(defaultBacklog),
		help: "listen queue per socket, 1 to 65535",
		set: func(c *config, s setting) (err error) {
			c.Backlog, err = s.whole(1, 65535, "a whole number from 1 to 65535")
			return err
		}},

	{group: groupLimits, flag: "timeout-graceful-shutdown", arg: "DUR", env: []string{"TIMEOUT_GRACEFUL_SHUTDOWN"}, def: "75s",
		help: "drain budget per worker; 0 = cut requests at once",
		set: func(c *config, s setting) (err error) {
			c.GracefulTimeout, err = s.duration(0, "0 or more")
			return err
		}},
	{group: groupLimits, flag: "timeout-keep-alive", arg: "DUR", env: []string{"TIMEOUT_KEEP_ALIVE"}, def: "5s",
		help: "idle connection lifetime; 0 = no keep-alive",
		set: func(c *config, s setting) (err error) {
			c.KeepAliveTimeout, err = s.duration(0, "0 or more")
			return err
		}},
	{group: groupLimits, flag: "timeout-worker-healthcheck", arg: "DUR", env: []string{"TIMEOUT_WORKER_HEALTHCHECK"}, def: "10s",
		help: "replace a worker silent this long; at least 100ms",
		set: func(c *config, s setting) (err error) {
			c.HealthcheckTimeout, err = s.duration(minHealthcheckTimeout, "at least 100ms")
			return err
		}},
	{group: groupLimits, flag: "timeout-read-request", arg: "DUR", env: []string{"TIMEOUT_READ_REQUEST"}, def: "30s",
		help: "time to read one request's headers and body; at least 100ms",
		set: func(c *config, s setting) (err error) {
			c.ReadTimeout, err = s.duration(100*time.Millisecond, "at least 100ms")
			return err
		}},
	{group: groupLimits, flag: "limit-concurrency", arg: "N", env: []string{"LIMIT_CONCURRENCY"}, def: "0",
		help: "requests in flight per worker, then 503; 0 = none",
		set: func(c *config, s setting) (err error) {
			c.LimitConcurrency, err = s.whole(0, math.MaxInt32, "a whole number, 0 for no limit")
			return err
		}},
	{group: groupLimits, flag: "limit-max-requests", arg: "N", env: []string{"LIMIT_MAX_REQUESTS"}, def: "0",
		help: "recycle a worker after N requests; 0 = never",
		set: func(c *config, s setting) (err error) {
			c.LimitMaxRequests, err = s.whole(0, math.MaxInt32, "a whole number, 0 for no limit")
			return err
		}},
	{group: groupLimits, flag: "limit-max-requests-jitter", arg: "N", env: []string{"LIMIT_MAX_REQUESTS_JITTER"}, def: "0",
		help: "add 0 to N to each worker's max requests",
		set: func(c *config, s setting) (err error) {
			c.LimitMaxRequestsJitter, err = s.whole(0, math.MaxInt32, "a whole number, 0 or more")
			return err
		}},

	{group: groupLimits, flag: "limit-max-memory", arg: "SIZE", env: []string{"LIMIT_MAX_MEMORY"}, def: "0",
		help: "recycle a worker whose memory (RSS) passes SIZE; 0 = none",
		set: func(c *config, s setting) (err error) {
			n, ok := parseSize(s.text())
			if !ok || n != 0 && (n < 16<<20 || n > 1<<40) {
				return s.invalid("0 or a size from 16MiB to 1TiB, such as 512MiB")
			}
			c.LimitMaxMemory = int64(n)
			return nil
		}},
	{group: groupLimits, flag: "drain-delay", arg: "DUR", env: []string{"DRAIN_DELAY"}, def: "0s",
		help: "on SIGTERM, fail /health this long before draining",
		set: func(c *config, s setting) (err error) {
			c.DrainDelay, err = s.duration(0, "0 or more")
			return err
		}},
	{group: groupServer, flag: "metrics-addr", arg: "ADDR", env: []string{"METRICS_ADDR"}, def: "(off)",
		help: "host:port for /metrics and the status page, e.g. 127.0.0.1:9100",
		set: func(c *config, s setting) error {
			host, port, err := net.SplitHostPort(s.text())
			if n, perr := strconv.Atoi(port); err != nil || perr != nil || n < 0 || n > 65535 {
				return s.invalid("host:port such as 127.0.0.1:9100")
			}
			if _, ok := parseHost(host); host != "" && !ok {
				return s.invalid("host:port such as 127.0.0.1:9100")
			}
			c.MetricsAddr = s.text()
			return nil
		}},
	{group: groupServer, env: []string{"METRICS_TOKEN"}, def: "(none)",
		help: "bearer token the metrics address requires",
		set: func(c *config, s setting) error {
			if !isVisibleASCII(s.text()) {
				return s.invalidSecret("printable ASCII without spaces")
			}
			c.MetricsToken = s.text()
			return nil
		}},
	{group: groupServer, flag: "control-socket", arg: "PATH", env: []string{"CONTROL_SOCKET"}, def: "(see docs)",
		help: "unix socket for `server status` and friends",
		set: func(c *config, s setting) error {
			t := s.text()
			switch {
			case t == "": // only a flag can be empty
				return s.invalid("a socket path (leave the flag out for the default)")
			case len(t) > maxSocketPath:
				return s.invalid(fmt.Sprintf("a path of at most %d bytes, the most a unix socket address holds", maxSocketPath))
			}
			c.ControlSocket = t
			return nil
		}},

	{group: groupLog, flag: "log-level", arg: "LEVEL", env: []string{"LOG_LEVEL"}, def: "info",
		help: "trace, debug, info, warning, error or critical",
		set: func(c *config, s setting) error {
			l, ok := map[string]zerolog.Level{
				"trace": zerolog.TraceLevel, "debug": zerolog.DebugLevel, "info": zerolog.InfoLevel,
				"warning": zerolog.WarnLevel, "warn": zerolog.WarnLevel, "error": zerolog.ErrorLevel,
				"critical": zerolog.FatalLevel, "fatal": zerolog.FatalLevel,
			}[lowerASCII(s.text())]
			if !ok {
				return s.invalid("trace, debug, info, warning, error or critical")
			}
			c.LogLevel = l
			return nil
		}},
	{group: groupLog, flag: "log-format", arg: "FORMAT", env: []string{"LOG_FORMAT"}, def: "auto",
		help: "auto (console on a terminal, else json), console, json",
		set: func(c *config, s setting) error {
			f := lowerASCII(s.text())
			if f != "auto" && f != "console" && f != "json" {
				return s.invalid("auto, console or json")
			}
			c.LogFormat = f
			return nil
		}},
	{group: groupLog, flag: "access-log", negFlag: "no-access-log", env: []string{"ACCESS_LOG"}, def: "true",
		help: "log one line per request",
		set: func(c *config, s setting) (err error) {
			c.AccessLog, err = s.boolean()
			return err
		}},
	{group: groupLog, flag: "proxy-headers", negFlag: "no-proxy-headers", env: []string{"PROXY_HEADERS"}, def: "true",
		help: "take the access log's client from X-Forwarded-For sent by a trusted proxy",
		set: func(c *config, s setting) (err error) {
			c.ProxyHeaders, err = s.boolean()
			return err
		}},
	{group: groupLog, flag: "forwarded-allow-ips", arg: "LIST", env: []string{"FORWARDED_ALLOW_IPS"}, def: "127.0.0.1",
		help: "proxies trusted with X-Forwarded-For: IPs and networks, comma-separated, or *",
		set: func(c *config, s setting) error {
			p, bad, ok := worker.ParseProxies(s.text())
			if !ok {
				return fmt.Errorf("invalid %s %q: %q is not an IP address or a network like 10.0.0.0/8 (want a comma-separated list of them, or *)", s.from, s.raw, bad)
			}
			c.ForwardedAllowIPs = p
			return nil
		}},

	{group: groupAPI, flag: "database-url", arg: "URL", env: []string{"DATABASE_URL"}, def: defaultDatabaseURL,
		help: "sqlite:PATH or postgres://user@host/db",
		set: func(c *config, s setting) error {
			t := s.text()
			lower := lowerASCII(t)
			switch {
			case strings.HasPrefix(lower, "sqlite:") && strings.ContainsAny(t, "?#"):
				return s.invalidURL("sqlite:PATH with no query parameters (no ? or #): the server sets SQLite's options itself")
			case strings.HasPrefix(lower, "sqlite:"):
				// Asking the store keeps this check and store.Open in step.
				if _, ok := store.FilePath(t); !ok {
					return s.invalidURL("sqlite:PATH naming a file, not :memory: (the workers share the database through the file)")
				}
			case strings.HasPrefix(lower, "postgres://"), strings.HasPrefix(lower, "postgresql://"):
				if _, err := url.Parse(t); err != nil {
					return s.invalidURL("sqlite:PATH or a postgres:// URL")
				}
			default:
				return s.invalidURL("sqlite:PATH or a postgres:// URL")
			}
			c.DatabaseURL = t
			return nil
		}},
	{group: groupAPI, flag: "database-max-conns", arg: "N", env: []string{"DATABASE_MAX_CONNS"}, def: "0",
		help: "database connections per worker; 0 = 4 (PostgreSQL), 6 (SQLite)",
		set: func(c *config, s setting) (err error) {
			c.DatabaseMaxConns, err = s.whole(0, 1000, "a whole number from 0 to 1000")
			return err
		}},
	{group: groupAPI, flag: "instance-id", arg: "ID", env: []string{"INSTANCE_ID"}, def: "(host name)",
		help: "names this server in the store; distinct per server sharing a database",
		set: func(c *config, s setting) error {
			t := s.text()
			if len(t) > 200 || !isVisibleASCII(t) {
				return s.invalid("printable ASCII without spaces, at most 200 bytes")
			}
			c.InstanceID = t
			return nil
		}},
	{group: groupAPI, flag: "limit-request-body", arg: "SIZE", env: []string{"LIMIT_REQUEST_BODY"}, def: "1MiB",
		help: "largest request body, 1KiB to 1GiB; over it 413",
		set: func(c *config, s setting) error {
			n, ok := parseSize(s.text())
			if !ok || n < minLimitRequestBody || n > maxLimitRequestBody {
				return s.invalid("a size from 1KiB to 1GiB in bytes or with a unit: KB, KiB, MB, MiB, GB, GiB")
			}
			c.LimitRequestBody = n
			return nil
		}},
	{group: groupAPI, flag: "llm-provider", arg: "NAME", env: []string{"LLM_PROVIDER"}, def: providerSimulated,
		help: "simulated, or openai (default with a base URL)",
		set: func(c *config, s setting) error {
			p := lowerASCII(s.text())
			if p != providerSimulated && p != providerOpenAI {
				return s.invalid("simulated or openai")
			}
			c.LLMProvider = p
			return nil
		}},
	{group: groupAPI, flag: "llm-base-url", arg: "URL", env: []string{"LLM_BASE_URL"}, def: "(none)",
		help: "OpenAI-compatible endpoint: https://host/v1",
		set: func(c *config, s setting) error {
			t := s.text()
			if t == "" { // only a flag can be empty: it overrides the variable
				c.LLMBaseURL = ""
				return nil
			}
			u, err := url.Parse(t)
			if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Opaque != "" {
				return s.invalidURL("an absolute http:// or https:// URL")
			}
			c.LLMBaseURL = t
			return nil
		}},
	{group: groupAPI, flag: "llm-model", arg: "NAME", env: []string{"LLM_MODEL"}, def: "(none)",
		help: "model name; none = the provider's default",
		set: func(c *config, s setting) error {
			c.LLMModel = s.text()
			return nil
		}},
	{group: groupAPI, flag: "llm-timeout", arg: "DUR", env: []string{"LLM_TIMEOUT"}, def: "120s",
		help: "deadline of one LLM call; at least 1s",
		set: func(c *config, s setting) (err error) {
			c.LLMTimeout, err = s.duration(minLLMTimeout, "at least 1s")
			return err
		}},
	{group: groupAPI, flag: "llm-idle-timeout", arg: "DUR", env: []string{"LLM_IDLE_TIMEOUT"}, def: "60s",
		help: "longest gap between streamed chunks; at least 1s",
		set: func(c *config, s setting) (err error) {
			c.LLMIdleTimeout, err = s.duration(minLLMTimeout, "at least 1s")
			return err
		}},
	{group: groupAPI, flag: "simulated-latency", arg: "DUR", env: []string{"SIMULATED_LATENCY"}, def: "3s",
		help: "reply time of the simulated provider",
		set: func(c *config, s setting) (err error) {
			c.SimulatedLatency, err = s.duration(0, "0 or more")
			return err
		}},
	{group: groupAPI, flag: "chat-concurrency", arg: "N", env: []string{"CHAT_CONCURRENCY"}, def: "256",
		help: "background chats each worker runs at once, 1 to 100000",
		set: func(c *config, s setting) (err error) {
			c.ChatConcurrency, err = s.whole(1, 100000, "a whole number from 1 to 100000")
			return err
		}},
	{group: groupAPI, flag: "chat-max-attempts", arg: "N", env: []string{"CHAT_MAX_ATTEMPTS"}, def: "3",
		help: "attempts a background chat gets before it fails, 1 to 100",
		set: func(c *config, s setting) (err error) {
			c.ChatMaxAttempts, err = s.whole(1, 100, "a whole number from 1 to 100")
			return err
		}},
	{group: groupAPI, flag: "chat-queue-max", arg: "N", env: []string{"CHAT_QUEUE_MAX"}, def: "10000",
		help: "queued background chats, then 503; 0 = no limit",
		set: func(c *config, s setting) (err error) {
			c.ChatQueueMax, err = s.whole(0, math.MaxInt32, "a whole number, 0 for no limit")
			return err
		}},
	{group: groupAPI, flag: "cors-origins", arg: "LIST", env: []string{"CORS_ORIGINS"}, def: "(none)",
		help: "browser origins allowed, comma-separated, or *",
		set: func(c *config, s setting) error {
			t := s.text()
			if t == "" { // only a flag can be empty: it overrides the variable
				c.CORSOrigins = nil
				return nil
			}
			want := "comma-separated origins like https://app.example.com (no path), or * alone"
			if t == "*" {
				c.CORSOrigins = []string{"*"}
				return nil
			}
			var origins []string
			for _, e := range strings.Split(t, ",") {
				o, ok := parseOrigin(strings.TrimSpace(e))
				if !ok {
					return s.invalid(want)
				}
				origins = append(origins, o)
			}
			c.CORSOrigins = origins
			return nil
		}},

	{group: groupReload, flag: "reload-dir", arg: "DIR", env: []string{"RELOAD_DIRS"}, def: ".", repeat: true,
		help: "folder to watch, recursively; repeatable",
		set: func(c *config, s setting) error {
			var dirs []string
			for _, d := range strings.Split(s.text(), ",") {
				d = strings.TrimSpace(d)
				if fi, err := os.Stat(d); d == "" || err != nil || !fi.IsDir() {
					return s.invalid("existing folders, comma-separated, none empty")
				}
				dirs = append(dirs, d)
			}
			c.ReloadDirs = dirs
			return nil
		}},
	{group: groupReload, flag: "reload-include", arg: "GLOB", env: []string{"RELOAD_INCLUDE"}, repeat: true,
		def:  "*.go go.mod go.sum *.json *.yaml *.yml *.toml .env",
		help: "more file names that trigger a reload; repeatable",
		set: func(c *config, s setting) (err error) {
			c.ReloadInclude, err = globs(s)
			return err
		}},
	{group: groupReload, flag: "reload-exclude", arg: "GLOB", env: []string{"RELOAD_EXCLUDE"}, repeat: true,
		def:  ".git data vendor node_modules .* *_test.go *.swp *.swx *~ 4913 .#*",
		help: "more names never watched; repeatable",
		set: func(c *config, s setting) (err error) {
			c.ReloadExclude, err = globs(s)
			return err
		}},
	{group: groupReload, flag: "reload-delay", arg: "DUR", env: []string{"RELOAD_DELAY"}, def: "250ms",
		help: "quiet time after the last change before reloading",
		set: func(c *config, s setting) (err error) {
			c.ReloadDelay, err = s.duration(10*time.Millisecond, "at least 10ms")
			return err
		}},
	{group: groupReload, flag: "reload-build", arg: "CMD", env: []string{"RELOAD_BUILD"}, keepEmpty: true,
		def:  `go build -o "$OUTPUT" ./cmd/server`,
		help: `build command (with go.mod in the first dir); "" = no build`,
		set: func(c *config, s setting) error {
			c.ReloadBuild, c.ReloadBuildSet = strings.TrimSpace(s.raw), true
			return nil
		}},
	{group: groupReload, flag: "reload-drain", arg: "DUR", env: []string{"RELOAD_DRAIN"}, def: "5s",
		help: "how long the old worker may finish after a reload",
		set: func(c *config, s setting) (err error) {
			c.ReloadDrain, err = s.duration(0, "0 or more")
			return err
		}},

	// Secrets have no flag: a command line is visible to every user through
	// ps and /proc, the environment only to the owner.
	{group: groupAPI, env: []string{"LLM_API_KEY"}, def: "(none)",
		help: "API key for the LLM provider",
		set: func(c *config, s setting) error {
			t := s.text()
			if !isVisibleASCII(t) {
				return s.invalidSecret("printable ASCII without spaces")
			}
			c.LLMAPIKey = t
			return nil
		}},
	{group: groupAPI, env: []string{"API_TOKEN"}, def: "(none)",
		help: "bearer tokens the API accepts, comma-separated",
		set: func(c *config, s setting) error {
			var tokens []string
			for _, e := range strings.Split(s.text(), ",") {
				tok := strings.TrimSpace(e)
				if !isVisibleASCII(tok) {
					return s.invalidSecret("comma-separated tokens of printable ASCII, none empty")
				}
				tokens = append(tokens, tok)
			}
			c.APITokens = tokens
			return nil
		}},
}
