package main

import (
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/supervisor/prefork"
)

// apiOptions are the agent API's settings, stored into c; the process
// model's come from package prefork. provider, models and retention
// receive the --llm-provider, --llm-models and --retention settings for
// the checks across settings in newApp.
func apiOptions(c *config, provider, models, retention *prefork.Setting) []prefork.Option {
	return []prefork.Option{
		{Group: groupStore, Flag: "database-url", Arg: "URL", Env: []string{"DATABASE_URL"}, Default: defaultDatabaseURL,
			Help: "sqlite:PATH or postgres://user@host/db",
			Set: func(s prefork.Setting) error {
				t := s.Text()
				lower := prefork.LowerASCII(t)
				switch {
				case strings.HasPrefix(lower, "sqlite:") && strings.ContainsAny(t, "?#"):
					return s.InvalidURL("sqlite:PATH with no query parameters (no ? or #): the server sets SQLite's options itself")
				case strings.HasPrefix(lower, "sqlite:"):
					// Asking the store keeps this check and store.Open in step.
					if _, ok := store.FilePath(t); !ok {
						return s.InvalidURL("sqlite:PATH naming a file, not :memory: (the workers share the database through the file)")
					}
				case strings.HasPrefix(lower, "postgres://"), strings.HasPrefix(lower, "postgresql://"):
					if unescapedUserinfo(t) {
						return s.InvalidURL(`a postgres:// URL whose user name and password are percent-encoded (@ is %40, / is %2F, : is %3A, ? is %3F, # is %23), or the password in PGPASSWORD`)
					}
					if _, err := url.Parse(t); err != nil {
						return s.InvalidURL("sqlite:PATH or a postgres:// URL")
					}
				default:
					return s.InvalidURL("sqlite:PATH or a postgres:// URL")
				}
				c.DatabaseURL = t
				return nil
			}},
		{Group: groupStore, Flag: "database-max-conns", Arg: "N", Env: []string{"DATABASE_MAX_CONNS"}, Default: "0",
			Help: "database connections per worker; 0 = 4 (PostgreSQL), 6 (SQLite)",
			Set: func(s prefork.Setting) (err error) {
				c.DatabaseMaxConns, err = s.Whole(0, 1000, "a whole number from 0 to 1000")
				return err
			}},
		{Group: groupStore, Flag: "instance-id", Arg: "ID", Env: []string{"INSTANCE_ID"}, Default: "(host name)",
			Help: "names this server in the store; distinct per server sharing a database",
			Set: func(s prefork.Setting) error {
				t := s.Text()
				if len(t) > 200 || !prefork.IsVisibleASCII(t) {
					return s.Invalid("printable ASCII without spaces, at most 200 bytes")
				}
				c.InstanceID = t
				return nil
			}},
		{Group: groupLLM, Flag: "llm-provider", Arg: "NAME", Env: []string{"LLM_PROVIDER"}, Default: llm.ProviderSimulated,
			Help: "simulated, or openai (default with a base URL)",
			Set: func(s prefork.Setting) error {
				p := s.Lower()
				if p != llm.ProviderSimulated && p != llm.ProviderOpenAI {
					return s.Invalid("simulated or openai")
				}
				c.LLMProvider, *provider = p, s
				return nil
			}},
		{Group: groupLLM, Flag: "llm-base-url", Arg: "URL", Env: []string{"LLM_BASE_URL", "OPENAI_BASE_URL"}, Default: "(none)",
			Help: "OpenAI-compatible endpoint: https://host/v1",
			Set: func(s prefork.Setting) error {
				t := s.Text()
				if t == "" { // only a flag can be empty: it overrides the variable
					c.LLMBaseURL = ""
					return nil
				}
				u, err := url.Parse(t)
				if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Opaque != "" {
					return s.InvalidURL("an absolute http:// or https:// URL")
				}
				if u.User != nil || u.Fragment != "" {
					return s.InvalidURL("a URL without user info or fragment (the key goes in LLM_API_KEY)")
				}
				c.LLMBaseURL = t
				return nil
			}},
		{Group: groupLLM, Flag: "llm-model", Arg: "NAME", Env: []string{"LLM_MODEL"}, Default: "(none)",
			Help: "model name; none = the provider's default",
			Set: func(s prefork.Setting) error {
				c.LLMModel = s.Text()
				return nil
			}},
		{Group: groupLLM, Flag: "llm-models", Arg: "LIST", Env: []string{"LLM_MODELS"}, Default: "(the model)",
			Help: "models agents may name, comma-separated; others 422",
			Set: func(s prefork.Setting) error {
				var list []string
				for _, e := range strings.Split(s.Text(), ",") {
					m := strings.TrimSpace(e)
					if m == "" || len(m) > 200 || !prefork.IsVisibleASCII(m) {
						return s.Invalid("model names of printable ASCII without spaces, comma-separated, none empty")
					}
					list = append(list, m)
				}
				c.LLMModels, *models = list, s
				return nil
			}},
		{Group: groupLLM, Flag: "llm-timeout", Arg: "DUR", Env: []string{"LLM_TIMEOUT"}, Default: prefork.FormatDuration(llm.DefaultTimeout),
			Help: "deadline of one LLM call; at least 1s",
			Set: func(s prefork.Setting) (err error) {
				c.LLMTimeout, err = s.Duration(minLLMTimeout, "at least 1s")
				return err
			}},
		{Group: groupLLM, Flag: "llm-idle-timeout", Arg: "DUR", Env: []string{"LLM_IDLE_TIMEOUT"}, Default: prefork.FormatDuration(llm.DefaultIdleTimeout),
			Help: "longest gap between streamed chunks; at least 1s",
			Set: func(s prefork.Setting) (err error) {
				c.LLMIdleTimeout, err = s.Duration(minLLMTimeout, "at least 1s")
				return err
			}},
		{Group: groupLLM, Flag: "simulated-latency", Arg: "DUR", Env: []string{"SIMULATED_LATENCY"}, Default: prefork.FormatDuration(llm.DefaultSimulatedLatency),
			Help: "reply time of the simulated provider",
			Set: func(s prefork.Setting) (err error) {
				c.SimulatedLatency, err = s.Duration(0, "0 or more")
				return err
			}},
		{Group: groupStore, Flag: "chat-concurrency", Arg: "N", Env: []string{"CHAT_CONCURRENCY"}, Default: strconv.Itoa(store.DefaultChatConcurrency),
			Help: "background chats each worker runs at once, 1 to 100000",
			Set: func(s prefork.Setting) (err error) {
				c.ChatConcurrency, err = s.Whole(1, 100000, "a whole number from 1 to 100000")
				return err
			}},
		{Group: groupStore, Flag: "chat-max-attempts", Arg: "N", Env: []string{"CHAT_MAX_ATTEMPTS"}, Default: strconv.Itoa(handlers.DefaultChatMaxAttempts),
			Help: "attempts a background chat gets before it fails, 1 to 100",
			Set: func(s prefork.Setting) (err error) {
				c.ChatMaxAttempts, err = s.Whole(1, 100, "a whole number from 1 to 100")
				return err
			}},
		{Group: groupStore, Flag: "chat-queue-max", Arg: "N", Env: []string{"CHAT_QUEUE_MAX"}, Default: strconv.Itoa(defaultChatQueueMax),
			Help: "queued background chats, then 503; 0 = no limit",
			Set: func(s prefork.Setting) (err error) {
				c.ChatQueueMax, err = s.Whole(0, math.MaxInt32, "a whole number, 0 for no limit")
				return err
			}},
		{Group: groupStore, Flag: "limit-agents", Arg: "N", Env: []string{"LIMIT_AGENTS"}, Default: strconv.Itoa(defaultLimitAgents),
			Help: "agents the store keeps, then 409; 0 = no limit",
			Set: func(s prefork.Setting) (err error) {
				c.LimitAgents, err = s.Whole(0, math.MaxInt32, "a whole number, 0 for no limit")
				return err
			}},
		{Group: groupStore, Flag: "retention", Arg: "DUR", Env: []string{"RETENTION"}, Default: "off", Master: true,
			Help: "delete chats and activities older than this, such as 30d; off = keep all",
			Set: func(s prefork.Setting) error {
				*retention = s
				d, ok := parseRetention(s.Text())
				if !ok {
					return s.Invalid("off, or a duration with its unit such as 30d, 12h or 90m (a bare number is refused: it would mean seconds)")
				}
				c.Retention = d
				return nil
			}},
		{Group: groupStore, Flag: "idempotency-window", Arg: "DUR", Env: []string{"IDEMPOTENCY_WINDOW"}, Default: "24h",
			Help: "how long an Idempotency-Key names its chat; at least 1s",
			Set: func(s prefork.Setting) (err error) {
				c.IdemWindow, err = s.Duration(time.Second, "at least 1s")
				return err
			}},
		{Group: prefork.GroupHTTP, Flag: "limit-streams-per-client", Arg: "N", Env: []string{"LIMIT_STREAMS_PER_CLIENT"}, Default: strconv.Itoa(defaultLimitStreams),
			Help: "event streams and long-polls per client and worker, then 429; 0 = none",
			Set: func(s prefork.Setting) (err error) {
				c.LimitStreams, err = s.Whole(0, math.MaxInt32, "a whole number, 0 for no limit")
				return err
			}},
		{Group: prefork.GroupHTTP, Flag: "cors-origins", Arg: "LIST", Env: []string{"CORS_ORIGINS"}, Default: "(none)",
			Help: "browser origins allowed, comma-separated, or *",
			Set: func(s prefork.Setting) error {
				t := s.Text()
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
						return s.Invalid(want)
					}
					origins = append(origins, o)
				}
				c.CORSOrigins = origins
				return nil
			}},

		// Secrets have no flag: a command line is visible to every user
		// through ps and /proc, the environment only to the owner.
		{Group: groupLLM, Env: []string{"LLM_API_KEY", "OPENAI_API_KEY"}, Default: "(none)",
			Help: "API key for the LLM provider",
			Set: func(s prefork.Setting) error {
				t := s.Text()
				if !prefork.IsVisibleASCII(t) {
					return s.InvalidSecret("printable ASCII without spaces")
				}
				c.LLMAPIKey = t
				return nil
			}},
		{Group: groupLLM, Env: []string{"LLM_HEADERS"}, Default: "(none)",
			Help: "extra upstream headers: Name: value, comma-separated",
			Set: func(s prefork.Setting) (err error) {
				c.LLMHeaders, err = parseHeaders(s)
				return err
			}},
		{Group: prefork.GroupHTTP, Env: []string{"API_TOKEN"}, Default: "(none)",
			Help: "bearer tokens the API accepts, comma-separated",
			Set: func(s prefork.Setting) error {
				var tokens []string
				for _, e := range strings.Split(s.Text(), ",") {
					tok := strings.TrimSpace(e)
					if !prefork.IsVisibleASCII(tok) {
						return s.InvalidSecret("comma-separated tokens of printable ASCII, none empty")
					}
					tokens = append(tokens, tok)
				}
				c.APITokens = tokens
				return nil
			}},
	}
}

// unescapedUserinfo reports whether the PostgreSQL URL u holds an @ that
// is not the one ending its user info: an unescaped @, or a / before the
// @, in the password. Such a URL splits in the wrong place, and the piece
// of the password that lands in the host or the database name is printed
// in the connection error. A ? or # in the password makes the URL
// unparsable with an @ after it. The query string alone may hold an @
// (application_name=me@host).
func unescapedUserinfo(u string) bool {
	rest := u[strings.Index(u, "://")+3:]
	head, tail := rest, ""
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		head, tail = rest[:i], rest[i:]
	}
	at, slash := strings.IndexByte(head, '@'), strings.IndexByte(head, '/')
	switch {
	case strings.Count(head, "@") > 1, at >= 0 && slash >= 0 && slash < at:
		return true
	case at < 0 && strings.Contains(tail, "@"):
		_, err := url.Parse(u)
		return err != nil
	}
	return false
}

// parseRetention reads --retention: "off" or "0" (off), whole days ("30d"),
// or a Go duration with a unit of at least one second ("12h", "90m").
func parseRetention(t string) (time.Duration, bool) {
	switch t = strings.TrimSpace(t); {
	case t == "off" || t == "0":
		return 0, true
	case strings.HasSuffix(t, "d"):
		n, err := strconv.Atoi(strings.TrimSuffix(t, "d"))
		if err != nil || n < 1 || n > 100*365 {
			return 0, false
		}
		return time.Duration(n) * 24 * time.Hour, true
	}
	d, err := time.ParseDuration(t)
	if err != nil || d < time.Second {
		return 0, false
	}
	return d, true
}

// parseHeaders parses LLM_HEADERS: "Name: value" (or "Name=value")
// entries separated by commas or new lines. A value may percent-encode a
// comma or any other byte (%2C), as OTEL_EXPORTER_OTLP_HEADERS does. Values
// are secrets (Azure's api-key): no message shows one.
func parseHeaders(s prefork.Setting) (http.Header, error) {
	const want = `"Name: value" entries separated by commas or new lines, names of letters, digits and -, values percent-encoded where they hold a comma`
	h := http.Header{}
	for _, e := range strings.FieldsFunc(s.Text(), func(r rune) bool { return r == ',' || r == '\n' }) {
		i := strings.IndexAny(e, ":=")
		if strings.TrimSpace(e) == "" || i < 0 {
			return nil, s.InvalidSecret(want)
		}
		name, raw := strings.TrimSpace(e[:i]), strings.TrimSpace(e[i+1:])
		value, err := url.PathUnescape(raw)
		if name == "" || strings.TrimLeft(prefork.LowerASCII(name), "abcdefghijklmnopqrstuvwxyz0123456789-") != "" || err != nil || strings.ContainsAny(value, "\r\n\x00") {
			return nil, s.InvalidSecret(want)
		}
		switch k := http.CanonicalHeaderKey(name); k {
		case "Host", "Content-Length", "Transfer-Encoding", "Connection", "Content-Type":
			return nil, s.InvalidSecret("no header " + k + ": the server sets it itself")
		}
		h.Add(name, value)
	}
	return h, nil
}
