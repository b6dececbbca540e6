package main

import (
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/supervisor"
	"github.com/corralhq/corral/supervisor/prefork"
	"github.com/corralhq/corral/worker"
)

// config is the whole configuration of one server process: the process
// model's settings, which package prefork reads, and the agent API's. The
// master and every worker parse the same arguments and environment, so
// both see the same values. loadConfig is the only place that fills it;
// docs/configuration.md describes every field and config_test.go keeps
// that page equal to usage.
type config struct {
	prefork.Config

	DatabaseURL      string        // --database-url, default sqlite:data/server.db
	DatabaseMaxConns int           // --database-max-conns, 0 = the store's default
	InstanceID       string        // --instance-id, "" = the host name
	LLMProvider      string        // --llm-provider: "simulated" or "openai", lower case
	LLMBaseURL       string        // --llm-base-url, an absolute http(s) URL or ""
	LLMAPIKey        string        `json:"-"` // LLM_API_KEY only; never printed, see String
	LLMHeaders       http.Header   `json:"-"` // LLM_HEADERS only; nil = none; values never printed
	LLMModel         string        // --llm-model, "" = the provider's default (LLMModels[0] when that is set)
	LLMModels        []string      // --llm-models, the models agents may name; nil = LLMModel (or the provider's default) only
	LLMTimeout       time.Duration // --llm-timeout, default llm.DefaultTimeout, at least 1s
	LLMIdleTimeout   time.Duration // --llm-idle-timeout, default llm.DefaultIdleTimeout, at least 1s
	SimulatedLatency time.Duration // --simulated-latency, default llm.DefaultSimulatedLatency, 0 allowed
	APITokens        []string      `json:"-"` // API_TOKEN only; nil = none set; never printed
	CORSOrigins      []string      // --cors-origins, normalised origins or ["*"]; nil = none
	ChatConcurrency  int           // --chat-concurrency, background chats per worker, default 256
	ChatMaxAttempts  int           // --chat-max-attempts, default 3
	ChatQueueMax     int           // --chat-queue-max, default 10000, 0 = no limit
	IdemWindow       time.Duration // --idempotency-window, default 24h, at least 1s
	LimitAgents      int           // --limit-agents, default 10000, 0 = no limit
	LimitStreams     int           // --limit-streams-per-client, default 32, 0 = no limit
	Retention        time.Duration // --retention, 0 = off (the default), else at least IdemWindow
}

// Defaults and bounds of the agent API's settings; the process model's
// are corral's, and the LLM's are package llm's.
const (
	defaultDatabaseURL = "sqlite:data/server.db"
	minLLMTimeout      = time.Second
	// defaultOpenAIBaseURL is OpenAI's own API, taken when only a key is set.
	defaultOpenAIBaseURL = "https://api.openai.com/v1"
)

// Usage groups of the agent API's own settings.
const (
	groupStore = "Store and background chats"
	groupLLM   = "LLM"
)

// defaultReloadBuild builds this server into the path the supervisor gives.
const defaultReloadBuild = `go build -o "$OUTPUT" ./cmd/server`

// Exit statuses, as uvicorn and gunicorn use them.
const (
	exitOK        = prefork.ExitOK
	exitError     = prefork.ExitError
	exitUsage     = prefork.ExitUsage
	exitBootError = prefork.ExitBoot
)

// errHelp is returned by loadConfig for -h and --help; the caller prints
// usage to stdout and exits 0.
var errHelp = prefork.ErrHelp

// isUsageError reports whether err is about the shape of the command line
// rather than a value, so that the caller should print usage after it.
func isUsageError(err error) bool { return prefork.IsUsageError(err) }

// defaultConfig is the agent API's part of the defaults; loadConfig adds
// the process model's. LLMProvider is decided after the base URL is known.
func defaultConfig() config {
	return config{
		Config:           prefork.DefaultConfig(),
		DatabaseURL:      defaultDatabaseURL,
		LLMTimeout:       llm.DefaultTimeout,
		LLMIdleTimeout:   llm.DefaultIdleTimeout,
		SimulatedLatency: llm.DefaultSimulatedLatency,
		ChatConcurrency:  store.DefaultChatConcurrency,
		ChatMaxAttempts:  handlers.DefaultChatMaxAttempts,
		ChatQueueMax:     defaultChatQueueMax,
		IdemWindow:       store.DefaultIdempotencyWindow,
		LimitAgents:      defaultLimitAgents,
		LimitStreams:     defaultLimitStreams,
	}
}

// defaultChatQueueMax is --chat-queue-max's default.
const defaultChatQueueMax = 10000

// defaultLimitAgents is --limit-agents' default: room for any real use,
// and a bound on what GET /api/agents pages through and the table holds.
const defaultLimitAgents = 10000

// defaultLimitStreams is --limit-streams-per-client's default: more than a
// browser holds (six connections per host over HTTP/1.1) or a dashboard
// needs, far below what exhausts a worker's descriptors.
const defaultLimitStreams = 32

// String formats c for logs and debugging with LLMAPIKey, APITokens and
// MetricsToken hidden, so that printing a config with %v or %+v never
// shows a secret.
func (c config) String() string {
	type plain config // no methods, so Sprintf below does not recurse
	p := plain(c)
	p.Config = c.Config.Redacted()
	if p.LLMAPIKey != "" {
		p.LLMAPIKey = "(hidden)"
	}
	if len(p.LLMHeaders) > 0 {
		p.LLMHeaders = http.Header{"(hidden)": {strconv.Itoa(len(c.LLMHeaders))}}
	}
	if len(p.APITokens) > 0 {
		p.APITokens = []string{fmt.Sprintf("(%d hidden)", len(c.APITokens))}
	}
	return fmt.Sprintf("%+v", p)
}

// GoString hides the same secrets as String for %#v.
func (c config) GoString() string { return c.String() }

// loadConfig decides the configuration from args (without the program
// name) and lookupEnv (os.LookupEnv), as prefork.App.Load documents: each
// setting from its flag, else its variable, else its default, every value
// validated, and one error naming the first culprit. No error ever
// contains the value of LLM_API_KEY or API_TOKEN, or a password in a URL.
func loadConfig(args []string, lookupEnv func(string) (string, bool)) (config, error) {
	c := defaultConfig()
	pc, err := newApp(&c).Load(args, lookupEnv)
	if err != nil {
		return config{}, err
	}
	c.Config = pc
	return c, nil
}

// allOptions lists every option the server reads, in usage's order.
func allOptions() []prefork.Option {
	c := defaultConfig()
	return newApp(&c).AllOptions(&c.Config)
}

// newApp is the server as a corral application whose options write into
// c; Main runs it and loadConfig reads its configuration.
func newApp(c *config) prefork.App {
	var provider, models, retention prefork.Setting
	return prefork.App{
		Name:        "server",
		Version:     version,
		Options:     apiOptions(c, &provider, &models, &retention),
		ReloadBuild: defaultReloadBuild,
		UsageHead:   usageHead,
		UsageFoot:   usageFoot(),
		Check: func(pc prefork.Config) error {
			// A key alone means OpenAI itself, as OpenAI's own clients take it.
			switch {
			case c.LLMProvider == "" && (c.LLMBaseURL != "" || c.LLMAPIKey != ""):
				c.LLMProvider = llm.ProviderOpenAI
			case c.LLMProvider == "":
				c.LLMProvider = llm.ProviderSimulated
			case c.LLMProvider == llm.ProviderOpenAI && c.LLMBaseURL == "" && c.LLMAPIKey == "":
				return provider.Invalid("a base URL (--llm-base-url, LLM_BASE_URL or OPENAI_BASE_URL) or an API key (LLM_API_KEY or OPENAI_API_KEY) set as well, or simulated")
			}
			if c.LLMProvider == llm.ProviderOpenAI && c.LLMBaseURL == "" {
				c.LLMBaseURL = defaultOpenAIBaseURL
			}
			if c.LLMModel != "" && c.LLMModels != nil && !slices.Contains(c.LLMModels, c.LLMModel) {
				return models.Invalid("a list that holds LLM_MODEL (--llm-model) " + strconv.Quote(c.LLMModel) + ", the model of agents that name none")
			}
			if pc.RequireToken && len(c.APITokens) == 0 {
				return fmt.Errorf("invalid %s: want API_TOKEN set as well (%s refuses to start an API without a token)", pc.RequireTokenFrom, pc.RequireTokenFrom)
			}
			// A key must name its chat for the whole window: the chat
			// may not be deleted before.
			if c.Retention > 0 && c.Retention < c.IdemWindow {
				return retention.Invalid(fmt.Sprintf("at least --idempotency-window (%s), or off: an Idempotency-Key names its chat that long", prefork.FormatDuration(c.IdemWindow)))
			}
			return nil
		},
		Master: func(pc prefork.Config, log zerolog.Logger, sc *supervisor.Config) (func(), error) {
			c.Config = pc
			return prepareMaster(*c, log, sc)
		},
		Worker: func(pc prefork.Config, in worker.Info, log zerolog.Logger, wc *worker.Config) (func(), error) {
			c.Config = pc
			return prepareWorker(*c, in, log, wc)
		},
	}
}

// models returns the models agents may name and the model of an agent
// that names none: LLM_MODELS and LLM_MODEL, each defaulting to the
// other, and both to the provider's default model.
func (c config) models() (allowed []string, fallback string) {
	fallback = c.LLMModel
	if fallback == "" && len(c.LLMModels) > 0 {
		fallback = c.LLMModels[0]
	}
	if fallback == "" {
		fallback = llm.DefaultSimulatedModel
		if c.LLMProvider == llm.ProviderOpenAI {
			fallback = llm.DefaultOpenAIModel
		}
	}
	if allowed = c.LLMModels; allowed == nil {
		allowed = []string{fallback}
	}
	return allowed, fallback
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

const usageHead = `Usage: server [flags]
       server status|reload|scale N|stop|upgrade [--control-socket PATH]

Serves the Corral agent API from supervised worker processes. Each setting
comes from its flag, else its environment variable, else its default; a
variable set to "" counts as unset. Durations take 1m30s, 250ms or seconds
(75, 0.5); switches take true/false, 1/0, yes/no, on/off. A bad value exits
with status 2. See docs/configuration.md.

`

// usageFoot lists the subcommands, one line each.
func usageFoot() string {
	var b strings.Builder
	b.WriteString("\nCommands (they talk to a running server through its control socket; each\ntakes --control-socket PATH and --help):\n")
	wc := 0
	for _, c := range commands {
		wc = max(wc, len(c.name+" "+c.args))
	}
	// Meanings wrap so that the usage stays within 100 columns.
	indent := 2 + len("server ") + wc + 2
	for _, c := range commands {
		lines := prefork.Wrap(c.help, 100-indent)
		fmt.Fprintf(&b, "  server %-*s  %s\n", wc, strings.TrimSpace(c.name+" "+c.args), lines[0])
		for _, l := range lines[1:] {
			fmt.Fprintf(&b, "%*s%s\n", indent, "", l)
		}
	}
	return b.String()
}

// usage writes the --help text.
func usage(w io.Writer) {
	c := defaultConfig()
	newApp(&c).Usage(w)
}
