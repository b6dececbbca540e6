package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"net/url"
	"path"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/pflag"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/worker"
)

// config is the whole configuration of one server process. The master and
// every worker parse the same arguments and environment, so both see the same
// values. loadConfig is the only place that fills it; docs/configuration.md
// describes every field and config_test.go keeps that page equal to usage.
type config struct {
	Host               string        // --host / HOST, default 0.0.0.0
	Port               int           // --port / PORT, default 8000; 0 picks a free port
	UDS                string        // --uds / UDS, a unix socket path served instead of Host:Port; "" = none
	Workers            int           // --workers / WORKERS, then WEB_CONCURRENCY, default 4, 1..512
	WorkersSet         bool          // Workers came from a flag or the environment, not the default
	Reload             bool          // --reload / RELOAD, default false
	GracefulTimeout    time.Duration // --timeout-graceful-shutdown, default 75s; 0 = cut in-flight requests at once
	KeepAliveTimeout   time.Duration // --timeout-keep-alive, default 5s; 0 = no keep-alive
	HealthcheckTimeout time.Duration // --timeout-worker-healthcheck, default 10s, at least 100ms
	ReadTimeout        time.Duration // --timeout-read-request, default 30s, at least 100ms

	LimitConcurrency       int // --limit-concurrency, per worker, 0 = no limit; over it 503
	LimitMaxRequests       int // --limit-max-requests, 0 = never recycle a worker
	LimitMaxRequestsJitter int // --limit-max-requests-jitter, ignored while LimitMaxRequests is 0
	Backlog                int // --backlog, default 2048, 1..65535

	ChatConcurrency int // --chat-concurrency, background chats per worker, default 256
	ChatMaxAttempts int // --chat-max-attempts, default 3
	ChatQueueMax    int // --chat-queue-max, default 10000, 0 = no limit

	SocketMode string        // --socket-mode: "reuseport" (default) or "shared", lower case
	LogLevel   zerolog.Level // --log-level, default info
	LogFormat  string        // --log-format: "auto" (default, main resolves it), "console" or "json"
	AccessLog  bool          // --access-log / --no-access-log, default true

	ProxyHeaders      bool           // --proxy-headers / --no-proxy-headers, default true
	ForwardedAllowIPs worker.Proxies // --forwarded-allow-ips, default 127.0.0.1

	DatabaseURL      string        // --database-url, default sqlite:data/server.db
	LimitRequestBody int           // --limit-request-body in bytes, default 1 MiB, 1 KiB..1 GiB
	LLMProvider      string        // --llm-provider: "simulated" or "openai", lower case
	LLMBaseURL       string        // --llm-base-url, an absolute http(s) URL or ""
	LLMAPIKey        string        `json:"-"` // LLM_API_KEY only; never printed, see String
	LLMModel         string        // --llm-model, "" = the provider's default
	LLMTimeout       time.Duration // --llm-timeout, default 120s, at least 1s
	LLMIdleTimeout   time.Duration // --llm-idle-timeout, default 60s, at least 1s
	SimulatedLatency time.Duration // --simulated-latency, default 3s, 0 allowed
	APITokens        []string      `json:"-"` // API_TOKEN only; nil = none set; never printed
	CORSOrigins      []string      // --cors-origins, normalised origins or ["*"]; nil = none

	MetricsAddr      string        // --metrics-addr, host:port; "" = no metrics server
	MetricsToken     string        `json:"-"` // METRICS_TOKEN only; never printed
	DatabaseMaxConns int           // --database-max-conns, 0 = the store's default
	InstanceID       string        // --instance-id, "" = the host name
	DrainDelay       time.Duration // --drain-delay, default 0
	ControlSocket    string        // --control-socket; "" = $RUNTIME_DIRECTORY/server.sock or the data folder's
	LimitMaxMemory   int64         // --limit-max-memory in bytes, 0 = none

	ReloadDirs     []string      // --reload-dir (repeatable) / RELOAD_DIRS, default ["."]
	ReloadInclude  []string      // --reload-include (repeatable) / RELOAD_INCLUDE, added to the defaults
	ReloadExclude  []string      // --reload-exclude (repeatable) / RELOAD_EXCLUDE, added to the defaults
	ReloadDelay    time.Duration // --reload-delay, default 250ms
	ReloadBuild    string        // --reload-build; "" = no build
	ReloadBuildSet bool          // ReloadBuild was given (even empty); else main picks the default
	ReloadDrain    time.Duration // --reload-drain, default 5s

	// ShowVersion is set by --version. loadConfig then returns at once with
	// every other field at its default and nothing else read or validated,
	// so that --version works whatever the environment holds.
	ShowVersion bool
}

// Defaults and bounds. Each is stated once here and shown by usage.
const (
	defaultHost               = "0.0.0.0"
	defaultPort               = 8000
	defaultWorkers            = 4
	maxWorkers                = 512
	defaultGracefulTimeout    = 75 * time.Second
	defaultKeepAliveTimeout   = 5 * time.Second
	defaultHealthcheckTimeout = 10 * time.Second
	minHealthcheckTimeout     = 100 * time.Millisecond
	defaultReadTimeout        = 30 * time.Second
	defaultBacklog            = 2048
	defaultDatabaseURL        = "sqlite:data/server.db"
	defaultLimitRequestBody   = 1 << 20
	minLimitRequestBody       = 1 << 10
	// fasthttp holds a whole request body in memory, so a larger limit is a
	// denial of service waiting for a client rather than a setting.
	maxLimitRequestBody     = 1 << 30
	defaultReloadDelay      = 250 * time.Millisecond
	defaultReloadDrain      = 5 * time.Second
	defaultLLMTimeout       = 120 * time.Second
	defaultLLMIdleTimeout   = 60 * time.Second
	minLLMTimeout           = time.Second
	defaultSimulatedLatency = 3 * time.Second
	// maxSocketPath is the longest unix socket path: sun_path holds 108
	// bytes on Linux, the terminating NUL included.
	maxSocketPath = 107

	providerSimulated = "simulated"
	providerOpenAI    = "openai"
	socketReuseport   = "reuseport"
	socketShared      = "shared"
)

// errHelp is returned by loadConfig for -h and --help; the caller prints
// usage to stdout and exits 0.
var errHelp = pflag.ErrHelp

// defaultProxies trusts a proxy on the same machine, as uvicorn does.
var defaultProxies = worker.Proxies{Nets: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}}

// defaultChatQueueMax is --chat-queue-max's default.
const defaultChatQueueMax = 10000

func defaultConfig() config {
	return config{
		Host:               defaultHost,
		Port:               defaultPort,
		Workers:            defaultWorkers,
		GracefulTimeout:    defaultGracefulTimeout,
		KeepAliveTimeout:   defaultKeepAliveTimeout,
		HealthcheckTimeout: defaultHealthcheckTimeout,
		ReadTimeout:        defaultReadTimeout,
		Backlog:            defaultBacklog,
		SocketMode:         socketReuseport,
		LogLevel:           zerolog.InfoLevel,
		LogFormat:          "auto",
		AccessLog:          true,
		ProxyHeaders:       true,
		ForwardedAllowIPs:  defaultProxies,
		DatabaseURL:        defaultDatabaseURL,
		LimitRequestBody:   defaultLimitRequestBody,
		LLMTimeout:         defaultLLMTimeout,
		LLMIdleTimeout:     defaultLLMIdleTimeout,
		SimulatedLatency:   defaultSimulatedLatency,
		ReloadDirs:         []string{"."},
		ReloadDelay:        defaultReloadDelay,
		ReloadDrain:        defaultReloadDrain,
		ChatConcurrency:    store.DefaultChatConcurrency,
		ChatMaxAttempts:    handlers.DefaultChatMaxAttempts,
		ChatQueueMax:       defaultChatQueueMax,
		// LLMProvider is decided after the base URL is known.
	}
}

// addr returns the address to listen on, host:port, with brackets around
// an IPv6 host.
func (c config) addr() string {
	return net.JoinHostPort(c.Host, strconv.Itoa(c.Port))
}

// where is the address the server serves, as its title shows it.
func (c config) where() string {
	if c.UDS != "" {
		return "unix:" + c.UDS
	}
	return c.addr()
}

// String formats c for logs and debugging with LLMAPIKey and APITokens
// hidden, so that printing a config with %v or %+v never shows a secret.
func (c config) String() string {
	type plain config // no methods, so Sprintf below does not recurse
	p := plain(c)
	if p.LLMAPIKey != "" {
		p.LLMAPIKey = "(hidden)"
	}
	if len(p.APITokens) > 0 {
		p.APITokens = []string{fmt.Sprintf("(%d hidden)", len(c.APITokens))}
	}
	if p.MetricsToken != "" {
		p.MetricsToken = "(hidden)"
	}
	return fmt.Sprintf("%+v", p)
}

// GoString hides the same secrets as String for %#v.
func (c config) GoString() string { return c.String() }

// setting is one value as the user supplied it.
type setting struct {
	raw    string // exactly as given; messages quote it
	from   string // "--port" or "PORT": the only culprit an error names
	negate bool   // it came from a --no-* form of a switch
}

// text is the value with surrounding white space removed: " 4" from a
// hand-edited env file means 4.
func (s setting) text() string { return strings.TrimSpace(s.raw) }

func (s setting) invalid(want string) error {
	return fmt.Errorf("invalid %s %q: want %s", s.from, s.raw, want)
}

// invalidSecret is invalid for a value that must never be echoed.
func (s setting) invalidSecret(want string) error {
	return fmt.Errorf("invalid %s (value not shown): want %s", s.from, want)
}

// invalidURL is invalid for a URL that may carry a password.
func (s setting) invalidURL(want string) error {
	return fmt.Errorf("invalid %s %q: want %s", s.from, redact(s.raw), want)
}

// whole parses a whole number in [lo, hi]. Only digits are accepted, so
// "+4", "4x", "0x10" and "" are all errors.
func (s setting) whole(lo, hi int, want string) (int, error) {
	t := s.text()
	if t == "" || strings.TrimLeft(t, "0123456789") != "" {
		return 0, s.invalid(want)
	}
	n, err := strconv.ParseUint(t, 10, 63)
	if err != nil || n < uint64(lo) || n > uint64(hi) {
		return 0, s.invalid(want)
	}
	return int(n), nil
}

func (s setting) boolean() (bool, error) {
	var b bool
	switch lowerASCII(s.text()) {
	case "true", "1", "yes", "on":
		b = true
	case "false", "0", "no", "off":
	default:
		return false, s.invalid("true or false (or 1/0, yes/no, on/off)")
	}
	return b != s.negate, nil
}

// duration parses a Go duration ("1m30s") or a number of seconds ("75",
// "0.5", as uvicorn takes them) that is at least lo.
func (s setting) duration(lo time.Duration, atLeast string) (time.Duration, error) {
	t := s.text()
	d, ok := parseDuration(t)
	if !ok || d < lo {
		return 0, s.invalid("a duration like 1m30s, 250ms or 75 (seconds), " + atLeast)
	}
	// 0 means "off" or "at once" for several settings, so a typo such as
	// 0.0000000001 must not quietly become it. No unit holds a digit, so
	// any non-zero digit means a non-zero duration.
	if d == 0 && strings.ContainsAny(t, "123456789") {
		return 0, s.invalid("0 or at least 1ns (a shorter duration would become 0)")
	}
	return d, nil
}

// parseDuration parses a Go duration or a decimal number of seconds and
// drops any fraction of a nanosecond. Dropping rather than rounding means
// that d < lo holds exactly when the value written is below lo, for any
// whole-nanosecond lo.
func parseDuration(t string) (time.Duration, bool) {
	if isDecimal(t) {
		// Done in integers: a float64 rounds 0.09999999999 s up to 100ms.
		whole, frac, _ := strings.Cut(t, ".")
		sec, err := strconv.ParseInt("0"+whole, 10, 64)
		ns, _ := strconv.ParseInt((frac + "000000000")[:9], 10, 64)
		if err != nil || sec > (math.MaxInt64-ns)/int64(time.Second) {
			return 0, false
		}
		return time.Duration(sec)*time.Second + time.Duration(ns), true
	}
	d, err := time.ParseDuration(t)
	if err != nil || d < 0 {
		return 0, false
	}
	return d, true
}

// isDecimal reports whether t is digits with at most one decimal point,
// which keeps ParseFloat's "1e3", "inf" and "0x1p4" out.
func isDecimal(t string) bool {
	digits, dots := 0, 0
	for _, r := range t {
		switch {
		case r >= '0' && r <= '9':
			digits++
		case r == '.':
			dots++
		default:
			return false
		}
	}
	return digits > 0 && dots <= 1
}

var sizeUnits = map[string]float64{
	"": 1, "b": 1,
	"kb": 1e3, "kib": 1 << 10,
	"mb": 1e6, "mib": 1 << 20,
	"gb": 1e9, "gib": 1 << 30,
}

// parseSize parses a byte count, a number with an optional unit (KB is
// 1000 bytes, KiB 1024), any case, spaces allowed before the unit.
func parseSize(t string) (int, bool) {
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	mult, ok := sizeUnits[lowerASCII(strings.TrimSpace(t[i:]))]
	if !ok || !isDecimal(t[:i]) {
		return 0, false
	}
	f, err := strconv.ParseFloat(t[:i], 64)
	n := math.Floor(f * mult)
	if err != nil || n > math.MaxInt32 {
		return 0, false
	}
	return int(n), true
}

// parseHost accepts an IP address (an IPv6 one with or without brackets)
// or a DNS host name, and returns it without brackets.
func parseHost(t string) (string, bool) {
	if strings.HasPrefix(t, "[") && strings.HasSuffix(t, "]") {
		a, err := netip.ParseAddr(t[1 : len(t)-1])
		return a.String(), err == nil && a.Is6()
	}
	if _, err := netip.ParseAddr(t); err == nil {
		return t, true
	}
	if t == "" || len(t) > 253 {
		return "", false
	}
	labels := strings.Split(strings.TrimSuffix(t, "."), ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return "", false
		}
		for _, r := range l {
			// Underscores are not DNS but container and compose service
			// names use them and resolvers accept them.
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return "", false
			}
		}
	}
	// An all-digit last label is a mistyped IPv4 address such as
	// 10.0.0.300, never a host name (RFC 3696 section 2).
	if strings.TrimLeft(labels[len(labels)-1], "0123456789") == "" {
		return "", false
	}
	return t, true
}

// secretParam matches query or key=value parameters that carry secrets.
var secretParam = regexp.MustCompile(`(?i)(password|passwd|secret|token|api[-_]?key|key)=[^&\s]*`)

// redact masks the user information of a URL and secret-looking parameters,
// so that a message about a bad DATABASE_URL does not leak its password. It
// masks up to the last "@" because a password may itself hold "/" or "?".
func redact(s string) string {
	if i := strings.Index(s, "://"); i >= 0 {
		if at := strings.LastIndex(s[i+3:], "@"); at >= 0 {
			s = s[:i+3] + "xxxxx" + s[i+3+at:]
		}
	}
	return secretParam.ReplaceAllString(s, "${1}=xxxxx")
}

// lowerASCII lowers the letters A to Z and nothing else. Names are matched
// with it rather than strings.ToLower, which maps the Turkish İ to i and
// the Kelvin sign to k, so that "İNFO" would pass for "info".
func lowerASCII(t string) string {
	return strings.Map(func(r rune) rune {
		if 'A' <= r && r <= 'Z' {
			return r + 'a' - 'A'
		}
		return r
	}, t)
}

// isVisibleASCII reports whether t is non-empty and only printable ASCII
// other than space: what an Authorization header value can carry.
func isVisibleASCII(t string) bool {
	for i := 0; i < len(t); i++ {
		if t[i] <= ' ' || t[i] > '~' {
			return false
		}
	}
	return t != ""
}

// parseOrigin returns an origin the way a browser sends it in Origin: lower
// case scheme and host, no default port, no path.
func parseOrigin(t string) (string, bool) {
	u, err := url.Parse(t)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" || strings.HasSuffix(u.Host, ":") ||
		u.User != nil || u.Opaque != "" || u.Path != "" || u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return "", false
	}
	host := strings.ToLower(u.Host)
	if u.Scheme == "https" && u.Port() == "443" || u.Scheme == "http" && u.Port() == "80" {
		host = strings.ToLower(u.Hostname())
		if strings.Contains(host, ":") {
			host = "[" + host + "]"
		}
	}
	return u.Scheme + "://" + host, true
}

// Usage groups, in the order usage prints them.
const (
	groupServer = "Server"
	groupLimits = "Timeouts and limits"
	groupLog    = "Logging"
	groupAPI    = "Agent API"
	groupReload = "Reload (development)"
)

// flagSlot holds the last value given on the command line for one option;
// a switch and its --no-* form share one slot, so the later one wins.
type flagSlot struct {
	s   setting
	set bool
}

// on returns the value of a switch's slot, false if the switch was not given.
func (f flagSlot) on() (bool, error) {
	if !f.set {
		return false, nil
	}
	return f.s.boolean()
}

// flagValue is the pflag.Value of one flag name. Set only records: every
// check happens in loadConfig, which words the errors itself.
type flagValue struct {
	slot     *flagSlot
	name     string
	negate   bool
	isSwitch bool
	repeat   bool
}

func (v *flagValue) Set(raw string) error {
	if v.repeat && v.slot.set {
		raw = v.slot.s.raw + "," + raw
	}
	*v.slot = flagSlot{s: setting{raw: raw, from: "--" + v.name, negate: v.negate}, set: true}
	return nil
}

func (v *flagValue) String() string { return "" }

func (v *flagValue) Type() string {
	if v.isSwitch {
		return "bool"
	}
	return "string"
}

func addFlag(fs *pflag.FlagSet, slot *flagSlot, name string, negate, isSwitch, repeat bool) {
	f := fs.VarPF(&flagValue{slot: slot, name: name, negate: negate, isSwitch: isSwitch, repeat: repeat}, name, "", "")
	if isSwitch {
		f.NoOptDefVal = "true"
	}
}

// usageError is a command line that does not parse: an unknown flag, a
// missing flag value or a positional argument. main prints usage after it.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }

// oneLine keeps pflag's message on one line: it quotes an unknown flag
// raw, control characters included.
type oneLine struct{ err error }

func (e oneLine) Error() string {
	return strings.NewReplacer("\n", `\n`, "\r", `\r`).Replace(strings.TrimRight(e.err.Error(), "\n"))
}

func (e oneLine) Unwrap() error    { return e.err }
func (e usageError) Unwrap() error { return e.err }

// isUsageError reports whether err is about the shape of the command line
// rather than a value, so that the caller should print usage after it.
func isUsageError(err error) bool {
	var u usageError
	return errors.As(err, &u)
}

// loadConfig decides the configuration from args (without the program name)
// and lookupEnv (os.LookupEnv): each setting comes from its flag, else its environment
// variable, else its default, and every value is validated. A variable that
// is empty or only white space counts as unset; values are trimmed.
//
// It returns errHelp for -h and --help, an error for which isUsageError
// reports true for a command line that does not parse, and otherwise one
// line "invalid SOURCE "VALUE": want ..." naming the flag or the variable
// that supplied the first bad value. No error ever contains the value of
// LLM_API_KEY or API_TOKEN, or a password in a URL.
func loadConfig(args []string, lookupEnv func(string) (string, bool)) (config, error) {
	fs := pflag.NewFlagSet("server", pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.SortFlags = false
	slots := make([]flagSlot, len(options))
	for i, o := range options {
		if o.flag != "" {
			addFlag(fs, &slots[i], o.flag, false, o.arg == "", o.repeat)
		}
		if o.negFlag != "" {
			addFlag(fs, &slots[i], o.negFlag, true, true, false)
		}
	}
	var version flagSlot
	addFlag(fs, &version, "version", false, true, false)

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return config{}, errHelp
		}
		var ne *pflag.NotExistError
		if errors.As(err, &ne) && (ne.GetSpecifiedName() == "llm-api-key" || ne.GetSpecifiedName() == "api-token") {
			env := strings.ToUpper(strings.ReplaceAll(ne.GetSpecifiedName(), "-", "_"))
			err = fmt.Errorf("%w (set %s in the environment instead: a command line shows in ps)", err, env)
		}
		return config{}, usageError{oneLine{err}}
	}
	if rest := fs.Args(); len(rest) > 0 {
		return config{}, usageError{fmt.Errorf("unexpected argument %q: server takes flags only", rest[0])}
	}

	c := defaultConfig()
	showVersion, err := version.on()
	if err != nil {
		return config{}, err
	}
	if showVersion {
		c.ShowVersion = true
		return c, nil
	}
	given := map[string]setting{} // by option name
	for i, o := range options {
		s, ok := o.pick(slots[i], lookupEnv)
		if !ok {
			continue
		}
		if err := o.set(&c, s); err != nil {
			return config{}, err
		}
		given[o.name()] = s
	}

	if err := checkMetricsAddr(c, given); err != nil {
		return config{}, err
	}
	switch provider := given["llm-provider"]; {
	case c.LLMProvider == "" && c.LLMBaseURL != "":
		c.LLMProvider = providerOpenAI
	case c.LLMProvider == "":
		c.LLMProvider = providerSimulated
	case c.LLMProvider == providerOpenAI && c.LLMBaseURL == "":
		return config{}, provider.invalid("--llm-base-url or LLM_BASE_URL set as well, or simulated")
	}
	return c, nil
}

// globs parses a comma list of file name patterns. An empty entry is an
// error, as in API_TOKEN: it is usually a variable that expanded to
// nothing. An empty list, which only a flag can give, adds no pattern.
func globs(s setting) ([]string, error) {
	if s.text() == "" {
		return nil, nil
	}
	var out []string
	for _, g := range strings.Split(s.text(), ",") {
		g = strings.TrimSpace(g)
		if _, err := path.Match(g, ""); g == "" || err != nil {
			return nil, s.invalid("file name patterns such as *.tmpl, comma-separated, none empty")
		}
		out = append(out, g)
	}
	return out, nil
}

// checkMetricsAddr refuses a metrics address on the API's port and on an
// address the API listens on too. The master would bind the API first and
// then fail on the metrics address with a message naming neither setting.
// Port 0 lets the kernel pick a free port, so it never clashes.
func checkMetricsAddr(c config, given map[string]setting) error {
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
			return s.from + " " + value
		}
		return "default " + name + " " + value
	}
	return m.invalid(fmt.Sprintf("a port other than the API's (%s, %s)", from("host", c.Host), from("port", strconv.Itoa(c.Port))))
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
	return lowerASCII(strings.TrimSuffix(a, ".")) == lowerASCII(strings.TrimSuffix(b, "."))
}

// usage writes the --help text: one line per flag with its variable and
// default, grouped, with the variables that have no flag, then one line
// per subcommand.
func usage(w io.Writer) {
	type row struct{ flag, env, def, help string }
	var rows []row
	var groups []string
	byGroup := map[string][]row{}
	add := func(group string, r row) {
		if _, ok := byGroup[group]; !ok {
			groups = append(groups, group)
		}
		byGroup[group] = append(byGroup[group], r)
		rows = append(rows, r)
	}
	for _, o := range options {
		f := "(no flag)"
		if o.flag != "" {
			f = strings.TrimSpace("--" + o.flag + " " + o.arg)
		}
		add(o.group, row{f, strings.Join(o.env, ", "), o.def, o.help})
		if o.negFlag != "" {
			add(o.group, row{"--" + o.negFlag, "", "", "same as --" + o.flag + "=false"})
		}
	}
	add("Other", row{"-h, --help", "", "", "print this help and exit"})
	add("Other", row{"--version", "", "", "print the version and exit"})

	wf, we, wd := len("FLAG"), len("VARIABLE"), len("DEFAULT")
	for _, r := range rows {
		wf, we, wd = max(wf, len(r.flag)), max(we, len(r.env)), max(wd, len(r.def))
	}
	line := func(r row) {
		fmt.Fprintf(w, "  %-*s  %-*s  %-*s  %s\n", wf, r.flag, we, r.env, wd, r.def, r.help)
	}

	fmt.Fprint(w, `Usage: server [flags]
       server status|reload|scale N|stop [--control-socket PATH]

Serves the Corral agent API from supervised worker processes. Each setting
comes from its flag, else its environment variable, else its default; a
variable set to "" counts as unset. Durations take 1m30s, 250ms or seconds
(75, 0.5); switches take true/false, 1/0, yes/no, on/off. A bad value exits
with status 2. See docs/configuration.md.

`)
	line(row{"FLAG", "VARIABLE", "DEFAULT", "MEANING"})
	for _, g := range groups {
		fmt.Fprintf(w, "\n%s:\n", g)
		for _, r := range byGroup[g] {
			line(r)
		}
	}

	fmt.Fprint(w, "\nCommands (they talk to a running server through its control socket; each\ntakes --control-socket PATH and --help):\n")
	wc := 0
	for _, c := range commands {
		wc = max(wc, len(c.name+" "+c.args))
	}
	for _, c := range commands {
		fmt.Fprintf(w, "  server %-*s  %s\n", wc, strings.TrimSpace(c.name+" "+c.args), c.help)
	}
}
