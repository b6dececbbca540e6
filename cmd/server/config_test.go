package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/supervisor/prefork"
	"github.com/corralhq/corral/worker"
)

// fakeEnv returns a getenv over the given name, value pairs.
func fakeEnv(kv ...string) func(string) (string, bool) {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(name string) (string, bool) {
		v, ok := m[name]
		return v, ok
	}
}

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	got, err := loadConfig(nil, fakeEnv())
	if err != nil {
		t.Fatalf("loadConfig(nil, no env) error: %v", err)
	}
	want := config{
		Config: prefork.Config{
			Host:               "0.0.0.0",
			Port:               8000,
			Workers:            4,
			GracefulTimeout:    75 * time.Second,
			KeepAliveTimeout:   5 * time.Second,
			HealthcheckTimeout: 10 * time.Second,
			UpgradeTimeout:     2 * time.Minute,
			ReadTimeout:        30 * time.Second,
			Backlog:            2048,
			SocketMode:         "reuseport",
			LogLevel:           zerolog.InfoLevel,
			LogFormat:          "auto",
			AccessLog:          true,
			ProxyHeaders:       true,
			ForwardedAllowIPs:  worker.Proxies{Nets: []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}},
			LimitRequestBody:   1 << 20,
			LimitRequestHead:   16 << 10,
			ReloadDirs:         []string{"."},
			ReloadDelay:        250 * time.Millisecond,
			ReloadDrain:        5 * time.Second,
		},
		DatabaseURL:      "sqlite:data/server.db",
		LLMProvider:      "simulated",
		LLMTimeout:       120 * time.Second,
		LLMIdleTimeout:   60 * time.Second,
		SimulatedLatency: 3 * time.Second,
		ChatConcurrency:  256,
		ChatMaxAttempts:  3,
		ChatQueueMax:     10000,
		IdemWindow:       24 * time.Hour,
		LimitAgents:      10000,
		LimitStreams:     32,
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("loadConfig(nil, no env) =\n%+v\nwant\n%+v", got, want)
	}
	if got.Addr() != "0.0.0.0:8000" {
		t.Errorf("addr() = %q, want %q", got.Addr(), "0.0.0.0:8000")
	}
}

// TestConfigPrecedence checks, for every option, that the variable beats the
// default and that the flag beats the variable.
func TestConfigPrecedence(t *testing.T) {
	t.Parallel()
	field := func(name string) func(config) any {
		return func(c config) any { return reflect.ValueOf(c).FieldByName(name).Interface() }
	}
	tests := []struct {
		option   string // flag name, or variable for an env-only option
		env      []string
		args     []string
		get      func(config) any
		envWant  any
		flagWant any
	}{
		{"host", []string{"HOST", "127.0.0.1"}, []string{"--host", "::1"}, field("Host"), "127.0.0.1", "::1"},
		{"port", []string{"PORT", "9001"}, []string{"--port=9002"}, field("Port"), 9001, 9002},
		{"workers", []string{"WORKERS", "8"}, []string{"--workers", "16"}, field("Workers"), 8, 16},
		{"reload", []string{"RELOAD", "true"}, []string{"--reload=false"}, field("Reload"), true, false},
		{"uds", []string{"UDS", "/run/a.sock"}, []string{"--uds", "/run/b.sock"}, field("UDS"), "/run/a.sock", "/run/b.sock"},
		{"socket-mode", []string{"SOCKET_MODE", "shared"}, []string{"--socket-mode", "reuseport"}, field("SocketMode"), "shared", "reuseport"},
		{"backlog", []string{"BACKLOG", "100"}, []string{"--backlog", "200"}, field("Backlog"), 100, 200},
		{"timeout-graceful-shutdown", []string{"TIMEOUT_GRACEFUL_SHUTDOWN", "30"}, []string{"--timeout-graceful-shutdown", "1m"}, field("GracefulTimeout"), 30 * time.Second, time.Minute},
		{"timeout-keep-alive", []string{"TIMEOUT_KEEP_ALIVE", "0"}, []string{"--timeout-keep-alive", "2s"}, field("KeepAliveTimeout"), time.Duration(0), 2 * time.Second},
		{"timeout-worker-healthcheck", []string{"TIMEOUT_WORKER_HEALTHCHECK", "500ms"}, []string{"--timeout-worker-healthcheck", "2"}, field("HealthcheckTimeout"), 500 * time.Millisecond, 2 * time.Second},
		{"timeout-upgrade", []string{"TIMEOUT_UPGRADE", "30"}, []string{"--timeout-upgrade", "5m"}, field("UpgradeTimeout"), 30 * time.Second, 5 * time.Minute},
		{"timeout-read-request", []string{"TIMEOUT_READ_REQUEST", "5"}, []string{"--timeout-read-request", "2s"}, field("ReadTimeout"), 5 * time.Second, 2 * time.Second},
		{"limit-concurrency", []string{"LIMIT_CONCURRENCY", "10"}, []string{"--limit-concurrency", "20"}, field("LimitConcurrency"), 10, 20},
		{"limit-max-requests", []string{"LIMIT_MAX_REQUESTS", "1000"}, []string{"--limit-max-requests", "2000"}, field("LimitMaxRequests"), 1000, 2000},
		{"limit-max-requests-jitter", []string{"LIMIT_MAX_REQUESTS_JITTER", "50"}, []string{"--limit-max-requests-jitter", "60"}, field("LimitMaxRequestsJitter"), 50, 60},
		{"log-level", []string{"LOG_LEVEL", "debug"}, []string{"--log-level", "error"}, field("LogLevel"), zerolog.DebugLevel, zerolog.ErrorLevel},
		{"log-format", []string{"LOG_FORMAT", "json"}, []string{"--log-format", "console"}, field("LogFormat"), "json", "console"},
		{"access-log", []string{"ACCESS_LOG", "false"}, []string{"--access-log"}, field("AccessLog"), false, true},
		{"access-log", []string{"ACCESS_LOG", "true"}, []string{"--no-access-log"}, field("AccessLog"), true, false},
		{"proxy-headers", []string{"PROXY_HEADERS", "false"}, []string{"--proxy-headers"}, field("ProxyHeaders"), false, true},
		{"proxy-headers", []string{"PROXY_HEADERS", "true"}, []string{"--no-proxy-headers"}, field("ProxyHeaders"), true, false},
		{"forwarded-allow-ips", []string{"FORWARDED_ALLOW_IPS", "10.0.0.0/8, ::1"}, []string{"--forwarded-allow-ips", "*"}, field("ForwardedAllowIPs"),
			worker.Proxies{Nets: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("::1/128")}}, worker.Proxies{All: true}},
		{"database-url", []string{"DATABASE_URL", "postgres://u@db/x"}, []string{"--database-url", "sqlite:/tmp/x.db"}, field("DatabaseURL"), "postgres://u@db/x", "sqlite:/tmp/x.db"},
		{"database-max-conns", []string{"DATABASE_MAX_CONNS", "8"}, []string{"--database-max-conns", "2"}, field("DatabaseMaxConns"), 8, 2},
		{"instance-id", []string{"INSTANCE_ID", "web-1"}, []string{"--instance-id", "web-2"}, field("InstanceID"), "web-1", "web-2"},
		{"limit-request-body", []string{"LIMIT_REQUEST_BODY", "2MiB"}, []string{"--limit-request-body", "4096"}, field("LimitRequestBody"), 2 << 20, 4096},
		{"ssl-keyfile", []string{"SSL_KEYFILE", "k.pem", "SSL_CERTFILE", "c.pem"}, []string{"--ssl-keyfile", "k2.pem"}, field("SSLKeyFile"), "k.pem", "k2.pem"},
		{"ssl-certfile", []string{"SSL_CERTFILE", "c.pem", "SSL_KEYFILE", "k.pem"}, []string{"--ssl-certfile", "c2.pem"}, field("SSLCertFile"), "c.pem", "c2.pem"},
		{"ssl-keyfile-password", []string{"SSL_KEYFILE_PASSWORD", "pw 1", "SSL_CERTFILE", "c.pem", "SSL_KEYFILE", "k.pem"}, []string{"--ssl-keyfile-password", "pw2"}, field("SSLKeyFilePassword"), "pw 1", "pw2"},
		{"ssl-ca-certs", []string{"SSL_CA_CERTS", "ca.pem", "SSL_CERTFILE", "c.pem", "SSL_KEYFILE", "k.pem"}, []string{"--ssl-ca-certs", "ca2.pem"}, field("SSLCACerts"), "ca.pem", "ca2.pem"},
		{"ssl-cert-reqs", []string{"SSL_CERT_REQS", "required", "SSL_CA_CERTS", "ca.pem", "SSL_CERTFILE", "c.pem", "SSL_KEYFILE", "k.pem"}, []string{"--ssl-cert-reqs", "1"}, field("SSLCertReqs"), 2, 1},
		{"env-file", []string{"ENV_FILE", "/etc/a.env"}, []string{"--env-file", "b.env"}, field("EnvFile"), "/etc/a.env", "b.env"},
		{"limit-request-headers", []string{"LIMIT_REQUEST_HEADERS", "32KiB"}, []string{"--limit-request-headers", "8192"}, field("LimitRequestHead"), 32 << 10, 8192},
		{"llm-provider", []string{"LLM_PROVIDER", "openai", "LLM_BASE_URL", "http://llm:8080/v1"}, []string{"--llm-provider", "simulated"}, field("LLMProvider"), "openai", "simulated"},
		{"llm-base-url", []string{"LLM_BASE_URL", "http://a:1/v1"}, []string{"--llm-base-url", "https://b/v1"}, field("LLMBaseURL"), "http://a:1/v1", "https://b/v1"},
		{"llm-model", []string{"LLM_MODEL", "m1"}, []string{"--llm-model", "m2"}, field("LLMModel"), "m1", "m2"},
		{"llm-models", []string{"LLM_MODELS", "m1, m2"}, []string{"--llm-models", "m3"}, field("LLMModels"), []string{"m1", "m2"}, []string{"m3"}},
		{"require-token", []string{"REQUIRE_TOKEN", "true", "API_TOKEN", "t"}, []string{"--require-token=false"}, field("RequireToken"), true, false},
		{"allowed-hosts", []string{"ALLOWED_HOSTS", "API.example.com., .example.org"}, []string{"--allowed-hosts", "*"}, field("AllowedHosts"),
			prefork.Hosts{Given: true, Names: []string{"api.example.com", ".example.org"}}, prefork.Hosts{Given: true, Any: true}},
		{"llm-timeout", []string{"LLM_TIMEOUT", "30s"}, []string{"--llm-timeout", "45"}, field("LLMTimeout"), 30 * time.Second, 45 * time.Second},
		{"llm-idle-timeout", []string{"LLM_IDLE_TIMEOUT", "10s"}, []string{"--llm-idle-timeout", "20s"}, field("LLMIdleTimeout"), 10 * time.Second, 20 * time.Second},
		{"simulated-latency", []string{"SIMULATED_LATENCY", "0"}, []string{"--simulated-latency", "250ms"}, field("SimulatedLatency"), time.Duration(0), 250 * time.Millisecond},
		{"chat-concurrency", []string{"CHAT_CONCURRENCY", "10"}, []string{"--chat-concurrency", "20"}, field("ChatConcurrency"), 10, 20},
		{"chat-max-attempts", []string{"CHAT_MAX_ATTEMPTS", "1"}, []string{"--chat-max-attempts", "5"}, field("ChatMaxAttempts"), 1, 5},
		{"chat-queue-max", []string{"CHAT_QUEUE_MAX", "0"}, []string{"--chat-queue-max", "50"}, field("ChatQueueMax"), 0, 50},
		{"idempotency-window", []string{"IDEMPOTENCY_WINDOW", "1h"}, []string{"--idempotency-window", "90s"}, field("IdemWindow"), time.Hour, 90 * time.Second},
		{"limit-agents", []string{"LIMIT_AGENTS", "0"}, []string{"--limit-agents", "20"}, field("LimitAgents"), 0, 20},
		{"retention", []string{"RETENTION", "30d"}, []string{"--retention", "off"}, field("Retention"), 30 * 24 * time.Hour, time.Duration(0)},
		{"limit-streams-per-client", []string{"LIMIT_STREAMS_PER_CLIENT", "0"}, []string{"--limit-streams-per-client", "8"}, field("LimitStreams"), 0, 8},
		{"cors-origins", []string{"CORS_ORIGINS", "https://a.example.com"}, []string{"--cors-origins", "*"}, field("CORSOrigins"), []string{"https://a.example.com"}, []string{"*"}},
		{"limit-max-memory", []string{"LIMIT_MAX_MEMORY", "512MiB"}, []string{"--limit-max-memory", "1GiB"}, field("LimitMaxMemory"), int64(512 << 20), int64(1 << 30)},
		{"drain-delay", []string{"DRAIN_DELAY", "5s"}, []string{"--drain-delay", "0"}, field("DrainDelay"), 5 * time.Second, time.Duration(0)},
		{"metrics-addr", []string{"METRICS_ADDR", "127.0.0.1:9100"}, []string{"--metrics-addr", ":9200"}, field("MetricsAddr"), "127.0.0.1:9100", ":9200"},
		{"METRICS_TOKEN", []string{"METRICS_TOKEN", "tok"}, nil, field("MetricsToken"), "tok", nil},
		{"control-socket", []string{"CONTROL_SOCKET", "/run/a.sock"}, []string{"--control-socket", "/tmp/b.sock"}, field("ControlSocket"), "/run/a.sock", "/tmp/b.sock"},
		{"reload-dir", []string{"RELOAD_DIRS", "/tmp, /"}, []string{"--reload-dir", "/", "--reload-dir=/tmp"}, field("ReloadDirs"), []string{"/tmp", "/"}, []string{"/", "/tmp"}},
		{"reload-include", []string{"RELOAD_INCLUDE", "*.tmpl"}, []string{"--reload-include", "*.html", "--reload-include", "*.css"}, field("ReloadInclude"), []string{"*.tmpl"}, []string{"*.html", "*.css"}},
		{"reload-exclude", []string{"RELOAD_EXCLUDE", "gen,*.pb.go"}, []string{"--reload-exclude", "tmp"}, field("ReloadExclude"), []string{"gen", "*.pb.go"}, []string{"tmp"}},
		{"reload-delay", []string{"RELOAD_DELAY", "100ms"}, []string{"--reload-delay", "1"}, field("ReloadDelay"), 100 * time.Millisecond, time.Second},
		{"reload-build", []string{"RELOAD_BUILD", ""}, []string{"--reload-build", "make build"}, field("ReloadBuild"), "", "make build"},
		{"reload-drain", []string{"RELOAD_DRAIN", "0"}, []string{"--reload-drain", "10s"}, field("ReloadDrain"), time.Duration(0), 10 * time.Second},
		{"LLM_API_KEY", []string{"LLM_API_KEY", "sk-test"}, nil, field("LLMAPIKey"), "sk-test", nil},
		{"LLM_HEADERS", []string{"LLM_HEADERS", "api-key: k1, X-Team=a%2Cb"}, nil, field("LLMHeaders"), http.Header{"Api-Key": {"k1"}, "X-Team": {"a,b"}}, nil},
		{"API_TOKEN", []string{"API_TOKEN", "a, b"}, nil, field("APITokens"), []string{"a", "b"}, nil},
	}
	covered := map[string]bool{}
	for _, tt := range tests {
		covered[tt.option] = true
		got, err := loadConfig(nil, fakeEnv(tt.env...))
		if err != nil {
			t.Errorf("loadConfig(nil, %q) error: %v", tt.env, err)
		} else if v := tt.get(got); !reflect.DeepEqual(v, tt.envWant) {
			t.Errorf("loadConfig(nil, %q) = %v, want %v", tt.env, v, tt.envWant)
		}
		if tt.args == nil {
			continue
		}
		got, err = loadConfig(tt.args, fakeEnv(tt.env...))
		if err != nil {
			t.Errorf("loadConfig(%q, %q) error: %v", tt.args, tt.env, err)
		} else if v := tt.get(got); !reflect.DeepEqual(v, tt.flagWant) {
			t.Errorf("loadConfig(%q, %q) = %v, want %v (the flag)", tt.args, tt.env, v, tt.flagWant)
		}
	}
	for _, o := range allOptions() {
		name := o.Flag
		if name == "" {
			name = o.Env[0]
		}
		if !covered[name] {
			t.Errorf("option %s has no precedence case", name)
		}
	}
}

func TestConfigWorkers(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args    []string
		env     []string
		want    int
		wantSet bool
	}{
		{nil, nil, 4, false},
		{nil, []string{"WEB_CONCURRENCY", "3"}, 3, true},
		{nil, []string{"WORKERS", "2", "WEB_CONCURRENCY", "3"}, 2, true},
		{nil, []string{"WORKERS", "", "WEB_CONCURRENCY", "3"}, 3, true},
		{[]string{"--workers", "5"}, []string{"WORKERS", "2", "WEB_CONCURRENCY", "3"}, 5, true},
		{[]string{"--workers", "4"}, nil, 4, true},
		{nil, []string{"WORKERS", "512"}, 512, true},
		// WEB_CONCURRENCY is not read at all once WORKERS is set.
		{nil, []string{"WORKERS", "1", "WEB_CONCURRENCY", "junk"}, 1, true},
	}
	for _, tt := range tests {
		c, err := loadConfig(tt.args, fakeEnv(tt.env...))
		if err != nil {
			t.Errorf("loadConfig(%q, %q) error: %v", tt.args, tt.env, err)
			continue
		}
		if c.Workers != tt.want || c.WorkersSet != tt.wantSet {
			t.Errorf("loadConfig(%q, %q) = Workers %d, WorkersSet %v, want %d, %v", tt.args, tt.env, c.Workers, c.WorkersSet, tt.want, tt.wantSet)
		}
	}
}

func TestConfigBooleans(t *testing.T) {
	t.Parallel()
	for _, v := range []string{"true", "TRUE", "True", "1", "yes", "YES", "on", "On", " true "} {
		for _, args := range [][]string{{"--reload=" + v}, nil} {
			c, err := loadConfig(args, fakeEnv("RELOAD", v))
			if err != nil || !c.Reload {
				t.Errorf("loadConfig(%q, RELOAD=%q) = Reload %v, %v, want true, nil", args, v, c.Reload, err)
			}
		}
		c, err := loadConfig([]string{"--no-access-log=" + v}, fakeEnv())
		if err != nil || c.AccessLog {
			t.Errorf("loadConfig(--no-access-log=%q) = AccessLog %v, %v, want false, nil", v, c.AccessLog, err)
		}
	}
	for _, v := range []string{"false", "FALSE", "0", "no", "No", "off", "OFF"} {
		c, err := loadConfig(nil, fakeEnv("ACCESS_LOG", v))
		if err != nil || c.AccessLog {
			t.Errorf("loadConfig(ACCESS_LOG=%q) = AccessLog %v, %v, want false, nil", v, c.AccessLog, err)
		}
		c, err = loadConfig([]string{"--access-log=" + v}, fakeEnv())
		if err != nil || c.AccessLog {
			t.Errorf("loadConfig(--access-log=%q) = AccessLog %v, %v, want false, nil", v, c.AccessLog, err)
		}
		c, err = loadConfig([]string{"--no-access-log=" + v}, fakeEnv())
		if err != nil || !c.AccessLog {
			t.Errorf("loadConfig(--no-access-log=%q) = AccessLog %v, %v, want true, nil", v, c.AccessLog, err)
		}
	}
	// A switch and its --no-* form: the later one on the command line wins.
	for _, tt := range []struct {
		args []string
		want bool
	}{
		{[]string{"--access-log", "--no-access-log"}, false},
		{[]string{"--no-access-log", "--access-log"}, true},
		{[]string{"--no-access-log", "--access-log=false"}, false},
	} {
		c, err := loadConfig(tt.args, fakeEnv("ACCESS_LOG", "true"))
		if err != nil || c.AccessLog != tt.want {
			t.Errorf("loadConfig(%q) = AccessLog %v, %v, want %v, nil", tt.args, c.AccessLog, err, tt.want)
		}
	}
}

func TestConfigDurations(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want time.Duration
	}{
		{"75", 75 * time.Second},
		{"0.5", 500 * time.Millisecond},
		{".25", 250 * time.Millisecond},
		{"2.", 2 * time.Second},
		{"1m30s", 90 * time.Second},
		{"250ms", 250 * time.Millisecond},
		{"1h", time.Hour},
		{"0", 0},
		{"0s", 0},
		{" 10 ", 10 * time.Second},
		{"0.3", 300 * time.Millisecond},
		{"0.000000001", time.Nanosecond},
		{"0.0000000019", time.Nanosecond}, // a fraction of a nanosecond is dropped
		{"0.0000000000", 0},
		{"0h0m0.0s", 0},
		{"9223372036.854775807", time.Duration(math.MaxInt64)},
	}
	for _, tt := range tests {
		c, err := loadConfig([]string{"--timeout-graceful-shutdown", tt.in}, fakeEnv())
		if err != nil || c.GracefulTimeout != tt.want {
			t.Errorf("loadConfig(--timeout-graceful-shutdown %q) = %v, %v, want %v, nil", tt.in, c.GracefulTimeout, err, tt.want)
		}
		c, err = loadConfig(nil, fakeEnv("SIMULATED_LATENCY", tt.in))
		if err != nil || c.SimulatedLatency != tt.want {
			t.Errorf("loadConfig(SIMULATED_LATENCY=%q) = %v, %v, want %v, nil", tt.in, c.SimulatedLatency, err, tt.want)
		}
	}
}

func TestConfigSizes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want int
	}{
		{"1024", 1024},
		{"1KiB", 1024},
		{"1kib", 1024},
		{"2KB", 2000},
		{"2 kb", 2000},
		{"1MB", 1000000},
		{"1MiB", 1 << 20},
		{"1.5MiB", 3 << 19},
		{"1GiB", 1 << 30},
		{"1GB", 1000000000},
		{"4096B", 4096},
		{" 8MiB ", 8 << 20},
	}
	for _, tt := range tests {
		c, err := loadConfig(nil, fakeEnv("LIMIT_REQUEST_BODY", tt.in))
		if err != nil || c.LimitRequestBody != tt.want {
			t.Errorf("loadConfig(LIMIT_REQUEST_BODY=%q) = %d, %v, want %d, nil", tt.in, c.LimitRequestBody, err, tt.want)
		}
	}
}

func TestConfigValues(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args  []string
		env   []string
		get   func(config) any
		want  any
		about string
	}{
		{nil, []string{"PORT", " 8080 "}, func(c config) any { return c.Port }, 8080, "env values are trimmed"},
		{nil, []string{"PORT", "  "}, func(c config) any { return c.Port }, 8000, "a blank variable is unset"},
		{nil, []string{"PORT", "0"}, func(c config) any { return c.Port }, 0, "port 0 picks a free port"},
		{nil, []string{"PORT", "08080"}, func(c config) any { return c.Port }, 8080, "leading zeros"},
		{nil, []string{"HOST", "[::]"}, func(c config) any { return c.Addr() }, "[::]:8000", "bracketed IPv6"},
		{nil, []string{"HOST", "localhost"}, func(c config) any { return c.Addr() }, "localhost:8000", "host name"},
		{nil, []string{"HOST", "my_service.internal"}, func(c config) any { return c.Host }, "my_service.internal", "underscore"},
		{nil, []string{"SOCKET_MODE", "SHARED"}, func(c config) any { return c.SocketMode }, "shared", "enums ignore case"},
		{nil, []string{"LOG_LEVEL", "WARNING"}, func(c config) any { return c.LogLevel }, zerolog.WarnLevel, "warning"},
		{nil, []string{"LOG_LEVEL", "warn"}, func(c config) any { return c.LogLevel }, zerolog.WarnLevel, "warn"},
		{nil, []string{"LOG_LEVEL", "critical"}, func(c config) any { return c.LogLevel }, zerolog.FatalLevel, "critical"},
		{nil, []string{"LOG_LEVEL", "fatal"}, func(c config) any { return c.LogLevel }, zerolog.FatalLevel, "fatal"},
		{nil, []string{"LOG_LEVEL", "trace"}, func(c config) any { return c.LogLevel }, zerolog.TraceLevel, "trace"},
		{nil, []string{"LIMIT_MAX_REQUESTS_JITTER", "100"}, func(c config) any { return c.LimitMaxRequestsJitter }, 100, "jitter without max requests is accepted"},
		{nil, []string{"CORS_ORIGINS", "HTTPS://App.Example.com:443, http://localhost:3000,http://x:80"}, func(c config) any { return c.CORSOrigins },
			[]string{"https://app.example.com", "http://localhost:3000", "http://x"}, "origins are normalised"},
		{[]string{"--cors-origins="}, []string{"CORS_ORIGINS", "*"}, func(c config) any { return c.CORSOrigins }, []string(nil), "an empty flag clears the variable"},
		{nil, []string{"DATABASE_URL", "postgresql://u:p@db:5432/x?sslmode=disable"}, func(c config) any { return c.DatabaseURL }, "postgresql://u:p@db:5432/x?sslmode=disable", "postgresql"},
		{nil, []string{"DATABASE_URL", "postgres://u:hun%40ter2@db/x?application_name=me@host"}, func(c config) any { return c.DatabaseURL }, "postgres://u:hun%40ter2@db/x?application_name=me@host", "an encoded @, and one in the query"},
		{nil, []string{"DATABASE_URL", "postgres://u@/x?host=/run/postgresql"}, func(c config) any { return c.DatabaseURL }, "postgres://u@/x?host=/run/postgresql", "unix socket"},
		{nil, []string{"API_TOKEN", "t1"}, func(c config) any { return c.APITokens }, []string{"t1"}, "one token"},
		{nil, []string{"LLM_MODEL", " gpt-4o-mini "}, func(c config) any { return c.LLMModel }, "gpt-4o-mini", "trimmed model"},
		{nil, []string{"LOG_LEVEL", "INFO"}, func(c config) any { return c.LogLevel }, zerolog.InfoLevel, "ASCII case"},
		{nil, []string{"TIMEOUT_WORKER_HEALTHCHECK", "0.1"}, func(c config) any { return c.HealthcheckTimeout }, 100 * time.Millisecond, "the minimum itself"},
		{nil, []string{"DATABASE_URL", "sqlite:file:/tmp/x/y.db"}, func(c config) any { return c.DatabaseURL }, "sqlite:file:/tmp/x/y.db", "SQLite's file: URI"},
		{[]string{"--database-url", "sqlite:file:rel.db"}, nil, func(c config) any { return c.DatabaseURL }, "sqlite:file:rel.db", "relative file: URI"},
		{nil, []string{"CONTROL_SOCKET", longPath(107)}, func(c config) any { return c.ControlSocket }, longPath(107), "the longest socket path"},
		{nil, []string{"HOST", "127.0.0.1", "PORT", "0", "METRICS_ADDR", "127.0.0.1:0"}, func(c config) any { return c.MetricsAddr }, "127.0.0.1:0", "port 0 never clashes"},
		{nil, []string{"PORT", "0", "METRICS_ADDR", ":0"}, func(c config) any { return c.MetricsAddr }, ":0", "port 0 on every address"},
		{nil, []string{"HOST", "127.0.0.1", "METRICS_ADDR", "127.0.0.2:8000"}, func(c config) any { return c.MetricsAddr }, "127.0.0.2:8000", "another address, same port"},
		{nil, []string{"HOST", "127.0.0.1", "METRICS_ADDR", "[::1]:8000"}, func(c config) any { return c.MetricsAddr }, "[::1]:8000", "IPv6 loopback beside IPv4 loopback"},
		{nil, []string{"METRICS_ADDR", "127.0.0.1:8001"}, func(c config) any { return c.MetricsAddr }, "127.0.0.1:8001", "another port"},
		{[]string{"--reload-include="}, []string{"RELOAD_INCLUDE", "*.tmpl"}, func(c config) any { return c.ReloadInclude }, []string(nil), "an empty flag clears the variable's patterns"},
		{nil, []string{"FORWARDED_ALLOW_IPS", "10.1.2.3/8,::ffff:192.0.2.1"}, func(c config) any { return c.ForwardedAllowIPs },
			worker.Proxies{Nets: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32")}}, "networks masked, mapped IPv4 unmapped"},
	}
	for _, tt := range tests {
		c, err := loadConfig(tt.args, fakeEnv(tt.env...))
		if err != nil {
			t.Errorf("%s: loadConfig(%q, %q) error: %v", tt.about, tt.args, tt.env, err)
			continue
		}
		if got := tt.get(c); !reflect.DeepEqual(got, tt.want) {
			t.Errorf("%s: loadConfig(%q, %q) = %v, want %v", tt.about, tt.args, tt.env, got, tt.want)
		}
	}
}

func TestConfigLLMProvider(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args     []string
		env      []string
		want     string
		wantBase string
		wantErr  string
	}{
		{nil, nil, "simulated", "", ""},
		{nil, []string{"LLM_BASE_URL", "http://localhost:11434/v1"}, "openai", "http://localhost:11434/v1", ""},
		{[]string{"--llm-base-url", "https://api.openai.com/v1"}, nil, "openai", "https://api.openai.com/v1", ""},
		{nil, []string{"LLM_BASE_URL", "http://llm/v1", "LLM_PROVIDER", "simulated"}, "simulated", "http://llm/v1", ""},
		{nil, []string{"LLM_BASE_URL", "http://llm/v1", "LLM_PROVIDER", "OpenAI"}, "openai", "http://llm/v1", ""},
		{[]string{"--llm-base-url="}, []string{"LLM_BASE_URL", "http://llm/v1"}, "simulated", "", ""},
		// OpenAI's own variable names, which the project's names beat, and
		// a key alone meaning OpenAI itself.
		{nil, []string{"OPENAI_BASE_URL", "http://oai/v1"}, "openai", "http://oai/v1", ""},
		{nil, []string{"OPENAI_BASE_URL", "http://oai/v1", "LLM_BASE_URL", "http://llm/v1"}, "openai", "http://llm/v1", ""},
		{nil, []string{"OPENAI_API_KEY", "sk-x"}, "openai", "https://api.openai.com/v1", ""},
		{nil, []string{"LLM_API_KEY", "sk-x", "LLM_PROVIDER", "openai"}, "openai", "https://api.openai.com/v1", ""},
		{nil, []string{"OPENAI_API_KEY", "sk-x", "LLM_PROVIDER", "simulated"}, "simulated", "", ""},
		{nil, []string{"LLM_BASE_URL", "https://r.openai.azure.com/openai/deployments/d?api-version=2024-10-21"}, "openai", "https://r.openai.azure.com/openai/deployments/d?api-version=2024-10-21", ""},
		{nil, []string{"LLM_PROVIDER", "openai"}, "", "",
			`invalid LLM_PROVIDER "openai": want a base URL (--llm-base-url, LLM_BASE_URL or OPENAI_BASE_URL) or an API key (LLM_API_KEY or OPENAI_API_KEY) set as well, or simulated`},
		{[]string{"--llm-provider", "openai"}, nil, "", "",
			`invalid --llm-provider "openai": want a base URL (--llm-base-url, LLM_BASE_URL or OPENAI_BASE_URL) or an API key (LLM_API_KEY or OPENAI_API_KEY) set as well, or simulated`},
		{[]string{"--llm-base-url="}, []string{"LLM_PROVIDER", "openai", "LLM_BASE_URL", "http://llm/v1"}, "", "",
			`invalid LLM_PROVIDER "openai": want a base URL (--llm-base-url, LLM_BASE_URL or OPENAI_BASE_URL) or an API key (LLM_API_KEY or OPENAI_API_KEY) set as well, or simulated`},
	}
	for _, tt := range tests {
		c, err := loadConfig(tt.args, fakeEnv(tt.env...))
		if tt.wantErr != "" {
			if err == nil || err.Error() != tt.wantErr {
				t.Errorf("loadConfig(%q, %q) error = %v, want %s", tt.args, tt.env, err, tt.wantErr)
			}
			continue
		}
		if err != nil || c.LLMProvider != tt.want || c.LLMBaseURL != tt.wantBase {
			t.Errorf("loadConfig(%q, %q) = provider %q, base %q, %v, want %q, %q, nil", tt.args, tt.env, c.LLMProvider, c.LLMBaseURL, err, tt.want, tt.wantBase)
		}
	}
	// The key: the project's name beats OpenAI's.
	for _, tt := range []struct {
		env  []string
		want string
	}{
		{[]string{"OPENAI_API_KEY", "sk-oai"}, "sk-oai"},
		{[]string{"LLM_API_KEY", "sk-llm", "OPENAI_API_KEY", "sk-oai"}, "sk-llm"},
	} {
		if c, err := loadConfig(nil, fakeEnv(tt.env...)); err != nil || c.LLMAPIKey != tt.want {
			t.Errorf("loadConfig(%q): key %q, %v; want %q", tt.env, c.LLMAPIKey, err, tt.want)
		}
	}
}

const (
	wantDuration0      = "want a duration like 1m30s, 250ms or 75 (seconds), 0 or more"
	wantBool           = "want true or false (or 1/0, yes/no, on/off)"
	wantSize           = "want a size from 1KiB to 1GiB in bytes or with a unit: KB, KiB, MB, MiB, GB, GiB"
	wantOrigins        = "want comma-separated origins like https://app.example.com (no path), or * alone"
	wantUnlimited      = "want a whole number, 0 for no limit"
	wantDatabaseURL    = "want sqlite:PATH or a postgres:// URL"
	wantPercentEncoded = "want a postgres:// URL whose user name and password are percent-encoded (@ is %40, / is %2F, : is %3A, ? is %3F, # is %23), or the password in PGPASSWORD"
	wantSQLiteQuery    = "want sqlite:PATH with no query parameters (no ? or #): the server sets SQLite's options itself"
	wantSQLiteFile     = "want sqlite:PATH naming a file, not :memory: (the workers share the database through the file)"
	wantSocketPath     = "want a path of at most 107 bytes, the most a unix socket address holds"
)

// longPath is a path of n bytes.
func longPath(n int) string { return "/tmp/" + strings.Repeat("s", n-len("/tmp/")) }

// configInvalidCases holds a bad value of every option, from a flag and from the
// environment, with the exact message.
var configInvalidCases = []struct {
	args []string
	env  []string
	want string
}{
	{[]string{"--host", "300.1.1.1"}, nil, `invalid --host "300.1.1.1": want an IP address or a host name`},
	{nil, []string{"HOST", "bad host"}, `invalid HOST "bad host": want an IP address or a host name`},
	{nil, []string{"HOST", "[1.2.3.4]"}, `invalid HOST "[1.2.3.4]": want an IP address or a host name`},
	{nil, []string{"HOST", "-a.example"}, `invalid HOST "-a.example": want an IP address or a host name`},
	{[]string{"--host="}, []string{"HOST", "::"}, `invalid --host "": want an IP address or a host name`},

	{[]string{"--port", "99999"}, nil, `invalid --port "99999": want a port number from 0 to 65535`},
	{[]string{"--port="}, nil, `invalid --port "": want a port number from 0 to 65535`},
	{nil, []string{"PORT", "-1"}, `invalid PORT "-1": want a port number from 0 to 65535`},
	{nil, []string{"PORT", "80x"}, `invalid PORT "80x": want a port number from 0 to 65535`},
	{nil, []string{"PORT", "+80"}, `invalid PORT "+80": want a port number from 0 to 65535`},
	{[]string{"--port", "x"}, []string{"PORT", "y"}, `invalid --port "x": want a port number from 0 to 65535`},

	{nil, []string{"WORKERS", "abc"}, `invalid WORKERS "abc": want a whole number from 1 to 512`},
	{nil, []string{"WORKERS", "4x"}, `invalid WORKERS "4x": want a whole number from 1 to 512`},
	{[]string{"--workers", "0"}, nil, `invalid --workers "0": want a whole number from 1 to 512`},
	{[]string{"--workers=513"}, nil, `invalid --workers "513": want a whole number from 1 to 512`},
	{nil, []string{"WORKERS", "99999999999999999999999"}, `invalid WORKERS "99999999999999999999999": want a whole number from 1 to 512`},
	{nil, []string{"WEB_CONCURRENCY", "2.5"}, `invalid WEB_CONCURRENCY "2.5": want a whole number from 1 to 512`},
	{nil, []string{"WORKERS", "x", "WEB_CONCURRENCY", "2"}, `invalid WORKERS "x": want a whole number from 1 to 512`},

	{nil, []string{"RELOAD", "maybe"}, `invalid RELOAD "maybe": ` + wantBool},
	{[]string{"--reload=2"}, nil, `invalid --reload "2": ` + wantBool},

	{[]string{"--socket-mode", "udp"}, nil, `invalid --socket-mode "udp": want reuseport or shared`},
	{nil, []string{"SOCKET_MODE", "so_reuseport"}, `invalid SOCKET_MODE "so_reuseport": want reuseport or shared`},

	{[]string{"--backlog", "0"}, nil, `invalid --backlog "0": want a whole number from 1 to 65535`},
	{nil, []string{"BACKLOG", "65536"}, `invalid BACKLOG "65536": want a whole number from 1 to 65535`},

	{[]string{"--timeout-graceful-shutdown", "-1s"}, nil, `invalid --timeout-graceful-shutdown "-1s": ` + wantDuration0},
	{nil, []string{"TIMEOUT_GRACEFUL_SHUTDOWN", "soon"}, `invalid TIMEOUT_GRACEFUL_SHUTDOWN "soon": ` + wantDuration0},
	{nil, []string{"TIMEOUT_GRACEFUL_SHUTDOWN", "1e3"}, `invalid TIMEOUT_GRACEFUL_SHUTDOWN "1e3": ` + wantDuration0},
	{nil, []string{"TIMEOUT_GRACEFUL_SHUTDOWN", "99999999999999"}, `invalid TIMEOUT_GRACEFUL_SHUTDOWN "99999999999999": ` + wantDuration0},

	{[]string{"--timeout-keep-alive", "-5"}, nil, `invalid --timeout-keep-alive "-5": ` + wantDuration0},
	{nil, []string{"TIMEOUT_KEEP_ALIVE", "5 s"}, `invalid TIMEOUT_KEEP_ALIVE "5 s": ` + wantDuration0},
	// Under a nanosecond: it would become 0, which turns keep-alive off.
	{nil, []string{"TIMEOUT_KEEP_ALIVE", "0.0000000001"}, `invalid TIMEOUT_KEEP_ALIVE "0.0000000001": want 0 or at least 1ns (a shorter duration would become 0)`},
	{[]string{"--timeout-graceful-shutdown", "0.5ns"}, nil, `invalid --timeout-graceful-shutdown "0.5ns": want 0 or at least 1ns (a shorter duration would become 0)`},

	{[]string{"--timeout-worker-healthcheck", "50ms"}, nil, `invalid --timeout-worker-healthcheck "50ms": want a duration like 1m30s, 250ms or 75 (seconds), at least 100ms`},
	{nil, []string{"TIMEOUT_WORKER_HEALTHCHECK", "0.05"}, `invalid TIMEOUT_WORKER_HEALTHCHECK "0.05": want a duration like 1m30s, 250ms or 75 (seconds), at least 100ms`},
	// Just under the minimum must not be rounded up to it.
	{nil, []string{"TIMEOUT_WORKER_HEALTHCHECK", "0.09999999999"}, `invalid TIMEOUT_WORKER_HEALTHCHECK "0.09999999999": want a duration like 1m30s, 250ms or 75 (seconds), at least 100ms`},
	{nil, []string{"TIMEOUT_WORKER_HEALTHCHECK", "99.99999999ms"}, `invalid TIMEOUT_WORKER_HEALTHCHECK "99.99999999ms": want a duration like 1m30s, 250ms or 75 (seconds), at least 100ms`},
	{[]string{"--timeout-upgrade", "0"}, nil, `invalid --timeout-upgrade "0": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{nil, []string{"TIMEOUT_UPGRADE", "999ms"}, `invalid TIMEOUT_UPGRADE "999ms": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{nil, []string{"TIMEOUT_UPGRADE", "forever"}, `invalid TIMEOUT_UPGRADE "forever": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{[]string{"--timeout-read-request", "0.0999999999999"}, nil, `invalid --timeout-read-request "0.0999999999999": want a duration like 1m30s, 250ms or 75 (seconds), at least 100ms`},
	{nil, []string{"LLM_TIMEOUT", "0.9999999999"}, `invalid LLM_TIMEOUT "0.9999999999": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},

	{[]string{"--limit-concurrency", "-1"}, nil, `invalid --limit-concurrency "-1": ` + wantUnlimited},
	{nil, []string{"LIMIT_CONCURRENCY", "1.5"}, `invalid LIMIT_CONCURRENCY "1.5": ` + wantUnlimited},

	{[]string{"--limit-max-requests", "lots"}, nil, `invalid --limit-max-requests "lots": ` + wantUnlimited},
	{nil, []string{"LIMIT_MAX_REQUESTS", "1e6"}, `invalid LIMIT_MAX_REQUESTS "1e6": ` + wantUnlimited},

	{[]string{"--limit-max-requests-jitter", "-3"}, nil, `invalid --limit-max-requests-jitter "-3": want a whole number, 0 or more`},
	{nil, []string{"LIMIT_MAX_REQUESTS_JITTER", "x"}, `invalid LIMIT_MAX_REQUESTS_JITTER "x": want a whole number, 0 or more`},

	{[]string{"--log-level", "verbose"}, nil, `invalid --log-level "verbose": want trace, debug, info, warning, error or critical`},
	{nil, []string{"LOG_LEVEL", "panic"}, `invalid LOG_LEVEL "panic": want trace, debug, info, warning, error or critical`},
	// Names ignore ASCII case only: Unicode lower-casing maps the Turkish İ
	// and the Kelvin sign onto i and k.
	{nil, []string{"LOG_LEVEL", "İNFO"}, `invalid LOG_LEVEL "İNFO": want trace, debug, info, warning, error or critical`},
	{nil, []string{"LLM_PROVIDER", "SİMULATED"}, `invalid LLM_PROVIDER "SİMULATED": want simulated or openai`},
	{nil, []string{"LIMIT_REQUEST_BODY", "64\u212aiB"}, "invalid LIMIT_REQUEST_BODY \"64\u212aiB\": " + wantSize},
	{nil, []string{"LIMIT_MAX_MEMORY", "65536\u212aiB"}, "invalid LIMIT_MAX_MEMORY \"65536\u212aiB\": want 0 or a size from 16MiB to 1TiB, such as 512MiB"},

	{[]string{"--log-format", "xml"}, nil, `invalid --log-format "xml": want auto, console or json`},
	{nil, []string{"LOG_FORMAT", "text"}, `invalid LOG_FORMAT "text": want auto, console or json`},

	{nil, []string{"ACCESS_LOG", "nope"}, `invalid ACCESS_LOG "nope": ` + wantBool},
	{[]string{"--access-log=2"}, nil, `invalid --access-log "2": ` + wantBool},
	{[]string{"--no-access-log=maybe"}, []string{"ACCESS_LOG", "junk"}, `invalid --no-access-log "maybe": ` + wantBool},

	{[]string{"--database-url", "sqlite:"}, nil, `invalid --database-url "sqlite:": ` + wantSQLiteFile},
	{nil, []string{"DATABASE_URL", "sqlite::memory:"}, `invalid DATABASE_URL "sqlite::memory:": ` + wantSQLiteFile},
	{nil, []string{"DATABASE_URL", "sqlite:file::memory:"}, `invalid DATABASE_URL "sqlite:file::memory:": ` + wantSQLiteFile},
	{nil, []string{"DATABASE_URL", "sqlite:file:"}, `invalid DATABASE_URL "sqlite:file:": ` + wantSQLiteFile},
	{nil, []string{"DATABASE_URL", "sqlite:/tmp/x.db?mode=ro"}, `invalid DATABASE_URL "sqlite:/tmp/x.db?mode=ro": ` + wantSQLiteQuery},
	{[]string{"--database-url", "sqlite:file:/tmp/x.db?cache=shared"}, nil, `invalid --database-url "sqlite:file:/tmp/x.db?cache=shared": ` + wantSQLiteQuery},
	{nil, []string{"DATABASE_URL", "sqlite:data/x.db#main"}, `invalid DATABASE_URL "sqlite:data/x.db#main": ` + wantSQLiteQuery},
	{nil, []string{"DATABASE_URL", "sqlite:/tmp/x.db?key=hunter2"}, `invalid DATABASE_URL "sqlite:/tmp/x.db?key=xxxxx": ` + wantSQLiteQuery},
	{nil, []string{"DATABASE_URL", "data/server.db"}, `invalid DATABASE_URL "data/server.db": ` + wantDatabaseURL},
	{nil, []string{"DATABASE_URL", "mysql://u:hunter2@h/db"}, `invalid DATABASE_URL "mysql://xxxxx@h/db": ` + wantDatabaseURL},
	{nil, []string{"DATABASE_URL", "host=db password=hunter2"}, `invalid DATABASE_URL "host=db password=xxxxx": ` + wantDatabaseURL},
	{nil, []string{"DATABASE_URL", "postgres://u:p%zz@h/db"}, `invalid DATABASE_URL "postgres://xxxxx@h/db": ` + wantDatabaseURL},
	{nil, []string{"REQUIRE_TOKEN", "1"}, `invalid REQUIRE_TOKEN: want API_TOKEN set as well (REQUIRE_TOKEN refuses to start an API without a token)`},
	{[]string{"--require-token", "--metrics-addr", "0.0.0.0:9100"}, []string{"API_TOKEN", "t"}, `invalid --metrics-addr "0.0.0.0:9100": want a loopback address such as 127.0.0.1:9100, or METRICS_TOKEN set as well (--require-token refuses a metrics address other hosts reach without a token)`},
	{nil, []string{"LLM_MODEL", "big", "LLM_MODELS", "small,medium"}, `invalid LLM_MODELS "small,medium": want a list that holds LLM_MODEL (--llm-model) "big", the model of agents that name none`},
	{nil, []string{"LLM_MODELS", "a,,b"}, `invalid LLM_MODELS "a,,b": want model names of printable ASCII without spaces, comma-separated, none empty`},
	{nil, []string{"ALLOWED_HOSTS", "api.example.com, http://x"}, `invalid ALLOWED_HOSTS "api.example.com, http://x": "http://x" is not a host name (want host names such as api.example.com or .example.com, comma-separated, or *)`},
	{nil, []string{"DATABASE_URL", "postgres://u:hun@ter2@h/db"}, `invalid DATABASE_URL "postgres://xxxxx@h/db": ` + wantPercentEncoded},
	{nil, []string{"DATABASE_URL", "postgresql://u:12/ter2@h:5432/db?sslmode=require"}, `invalid DATABASE_URL "postgresql://xxxxx@h:5432/db?sslmode=require": ` + wantPercentEncoded},
	{nil, []string{"DATABASE_URL", "postgres://u:hun?ter2@h/db"}, `invalid DATABASE_URL "postgres://xxxxx@h/db": ` + wantPercentEncoded},
	{nil, []string{"DATABASE_URL", "postgres://u:hun#ter2@h/db"}, `invalid DATABASE_URL "postgres://xxxxx@h/db": ` + wantPercentEncoded},

	{[]string{"--limit-request-body", "512"}, nil, `invalid --limit-request-body "512": ` + wantSize},
	{nil, []string{"LIMIT_REQUEST_BODY", "2GiB"}, `invalid LIMIT_REQUEST_BODY "2GiB": ` + wantSize},
	{nil, []string{"LIMIT_REQUEST_BODY", "1TB"}, `invalid LIMIT_REQUEST_BODY "1TB": ` + wantSize},
	{nil, []string{"LIMIT_REQUEST_BODY", "1M"}, `invalid LIMIT_REQUEST_BODY "1M": ` + wantSize},
	{nil, []string{"LIMIT_REQUEST_BODY", "MiB"}, `invalid LIMIT_REQUEST_BODY "MiB": ` + wantSize},

	{[]string{"--llm-provider", "claude"}, nil, `invalid --llm-provider "claude": want simulated or openai`},
	{nil, []string{"LLM_PROVIDER", "ollama"}, `invalid LLM_PROVIDER "ollama": want simulated or openai`},

	{[]string{"--llm-base-url", "ftp://llm/v1"}, nil, `invalid --llm-base-url "ftp://llm/v1": want an absolute http:// or https:// URL`},
	{nil, []string{"LLM_BASE_URL", "api.openai.com/v1"}, `invalid LLM_BASE_URL "api.openai.com/v1": want an absolute http:// or https:// URL`},
	{nil, []string{"LLM_BASE_URL", "htp://user:pw@llm/v1?key=abc"}, `invalid LLM_BASE_URL "htp://xxxxx@llm/v1?key=xxxxx": want an absolute http:// or https:// URL`},

	{[]string{"--llm-timeout", "0"}, nil, `invalid --llm-timeout "0": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{nil, []string{"LLM_TIMEOUT", "500ms"}, `invalid LLM_TIMEOUT "500ms": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{nil, []string{"IDEMPOTENCY_WINDOW", "500ms"}, `invalid IDEMPOTENCY_WINDOW "500ms": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{[]string{"--idempotency-window", "0"}, nil, `invalid --idempotency-window "0": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},

	{[]string{"--llm-idle-timeout", "0s"}, nil, `invalid --llm-idle-timeout "0s": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},
	{nil, []string{"LLM_IDLE_TIMEOUT", "x"}, `invalid LLM_IDLE_TIMEOUT "x": want a duration like 1m30s, 250ms or 75 (seconds), at least 1s`},

	{[]string{"--simulated-latency", "-1"}, nil, `invalid --simulated-latency "-1": ` + wantDuration0},
	{nil, []string{"SIMULATED_LATENCY", "fast"}, `invalid SIMULATED_LATENCY "fast": ` + wantDuration0},

	{[]string{"--cors-origins", "https://a.example.com/"}, nil, `invalid --cors-origins "https://a.example.com/": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "*,https://a.example.com"}, `invalid CORS_ORIGINS "*,https://a.example.com": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "a.example.com"}, `invalid CORS_ORIGINS "a.example.com": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "https://a.example.com,,https://b.example.com"}, `invalid CORS_ORIGINS "https://a.example.com,,https://b.example.com": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "ftp://a.example.com"}, `invalid CORS_ORIGINS "ftp://a.example.com": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "https://a.example.com:"}, `invalid CORS_ORIGINS "https://a.example.com:": ` + wantOrigins},
	{nil, []string{"CORS_ORIGINS", "https://user@a.example.com"}, `invalid CORS_ORIGINS "https://user@a.example.com": ` + wantOrigins},

	{nil, []string{"UDS", "/" + strings.Repeat("u", 107) + ".sock"}, `invalid UDS "/` + strings.Repeat("u", 107) + `.sock": want a path of at most 107 bytes, the most a unix socket address holds`},
	{nil, []string{"FORWARDED_ALLOW_IPS", "127.0.0.1, 10.0.0.300"}, `invalid FORWARDED_ALLOW_IPS "127.0.0.1, 10.0.0.300": "10.0.0.300" is not an IP address or a network like 10.0.0.0/8 (want a comma-separated list of them, or *)`},
	{[]string{"--forwarded-allow-ips", "10.0.0.0/33"}, nil, `invalid --forwarded-allow-ips "10.0.0.0/33": "10.0.0.0/33" is not an IP address or a network like 10.0.0.0/8 (want a comma-separated list of them, or *)`},
	{nil, []string{"FORWARDED_ALLOW_IPS", "127.0.0.1,"}, `invalid FORWARDED_ALLOW_IPS "127.0.0.1,": "" is not an IP address or a network like 10.0.0.0/8 (want a comma-separated list of them, or *)`},
	{[]string{"--proxy-headers=maybe"}, nil, `invalid --proxy-headers "maybe": ` + wantBool},

	{nil, []string{"CONTROL_SOCKET", longPath(108)}, `invalid CONTROL_SOCKET "` + longPath(108) + `": ` + wantSocketPath},
	{[]string{"--control-socket", longPath(200)}, nil, `invalid --control-socket "` + longPath(200) + `": ` + wantSocketPath},
	{[]string{"--control-socket="}, []string{"CONTROL_SOCKET", "/run/a.sock"}, `invalid --control-socket "": want a socket path (leave the flag out for the default)`},

	// The metrics address must not take the API's port on an address the
	// API listens on: same host, or either of them every address.
	{nil, []string{"HOST", "127.0.0.1", "PORT", "18001", "METRICS_ADDR", "127.0.0.1:18001"},
		`invalid METRICS_ADDR "127.0.0.1:18001": want a port other than the API's (HOST 127.0.0.1, PORT 18001)`},
	{nil, []string{"METRICS_ADDR", "127.0.0.1:8000"}, `invalid METRICS_ADDR "127.0.0.1:8000": want a port other than the API's (default host 0.0.0.0, default port 8000)`},
	{[]string{"--host", "10.1.2.3", "--metrics-addr", ":8000"}, nil, `invalid --metrics-addr ":8000": want a port other than the API's (--host 10.1.2.3, default port 8000)`},
	{[]string{"--port", "9100"}, []string{"HOST", "::", "METRICS_ADDR", "[::1]:9100"}, `invalid METRICS_ADDR "[::1]:9100": want a port other than the API's (HOST ::, --port 9100)`},
	{nil, []string{"HOST", "127.0.0.1", "METRICS_ADDR", "0.0.0.0:08000"}, `invalid METRICS_ADDR "0.0.0.0:08000": want a port other than the API's (HOST 127.0.0.1, default port 8000)`},
	{nil, []string{"HOST", "[::ffff:127.0.0.1]", "PORT", "9000", "METRICS_ADDR", "127.0.0.1:9000"},
		`invalid METRICS_ADDR "127.0.0.1:9000": want a port other than the API's (HOST ::ffff:127.0.0.1, PORT 9000)`},
	{nil, []string{"HOST", "API.internal", "PORT", "9000", "METRICS_ADDR", "api.internal:9000"},
		`invalid METRICS_ADDR "api.internal:9000": want a port other than the API's (HOST API.internal, PORT 9000)`},

	// An empty entry in a comma list is an error, as in API_TOKEN and CORS_ORIGINS.
	{nil, []string{"RELOAD_DIRS", "/tmp,,"}, `invalid RELOAD_DIRS "/tmp,,": want existing folders, comma-separated, none empty`},
	{nil, []string{"RELOAD_DIRS", ",/tmp"}, `invalid RELOAD_DIRS ",/tmp": want existing folders, comma-separated, none empty`},
	{[]string{"--reload-dir", "/tmp", "--reload-dir="}, nil, `invalid --reload-dir "/tmp,": want existing folders, comma-separated, none empty`},
	{nil, []string{"RELOAD_DIRS", "/nonexistent-corral"}, `invalid RELOAD_DIRS "/nonexistent-corral": want existing folders, comma-separated, none empty`},
	{nil, []string{"RELOAD_INCLUDE", "*.tmpl, ,*.html"}, `invalid RELOAD_INCLUDE "*.tmpl, ,*.html": want file name patterns such as *.tmpl, comma-separated, none empty`},
	{nil, []string{"RELOAD_INCLUDE", "[a"}, `invalid RELOAD_INCLUDE "[a": want file name patterns such as *.tmpl, comma-separated, none empty`},
	{[]string{"--reload-exclude", "gen", "--reload-exclude", ""}, nil, `invalid --reload-exclude "gen,": want file name patterns such as *.tmpl, comma-separated, none empty`},
	{nil, []string{"RELOAD_EXCLUDE", "gen,"}, `invalid RELOAD_EXCLUDE "gen,": want file name patterns such as *.tmpl, comma-separated, none empty`},

	{nil, []string{"LLM_API_KEY", "sk-abc def"}, `invalid LLM_API_KEY (value not shown): want printable ASCII without spaces`},
	{nil, []string{"SSL_KEYFILE", "k.pem"}, `invalid SSL_KEYFILE "k.pem": want --ssl-certfile or SSL_CERTFILE set as well`},
	{[]string{"--ssl-certfile", "c.pem"}, nil, `invalid --ssl-certfile "c.pem": want --ssl-keyfile or SSL_KEYFILE set as well`},
	{[]string{"--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem", "--ssl-cert-reqs", "2"}, nil, `invalid --ssl-cert-reqs "2": want --ssl-ca-certs or SSL_CA_CERTS set as well, to verify client certificates`},
	{nil, []string{"SSL_CERT_REQS", "maybe"}, `invalid SSL_CERT_REQS "maybe": want 0 (none), 1 (optional) or 2 (required)`},
	{nil, []string{"SSL_CA_CERTS", "ca.pem"}, `invalid SSL_CA_CERTS "ca.pem": want --ssl-certfile and --ssl-keyfile set as well (HTTPS)`},
	{nil, []string{"SSL_KEYFILE_PASSWORD", "hunter2"}, `invalid SSL_KEYFILE_PASSWORD (value not shown): want --ssl-certfile and --ssl-keyfile set as well (HTTPS)`},
	{nil, []string{"LIMIT_REQUEST_HEADERS", "2KiB"}, `invalid LIMIT_REQUEST_HEADERS "2KiB": want a size from 4KiB to 1MiB in bytes or with a unit: KB, KiB, MB, MiB`},
	{nil, []string{"LLM_HEADERS", "api-key secret"}, `invalid LLM_HEADERS (value not shown): want "Name: value" entries separated by commas or new lines, names of letters, digits and -, values percent-encoded where they hold a comma`},
	{nil, []string{"LLM_HEADERS", "Host: evil"}, `invalid LLM_HEADERS (value not shown): want no header Host: the server sets it itself`},
	{nil, []string{"LLM_BASE_URL", "http://llm/v1#frag"}, `invalid LLM_BASE_URL "http://llm/v1#frag": want a URL without user info or fragment (the key goes in LLM_API_KEY)`},
	{nil, []string{"API_TOKEN", "tok1,,tok2"}, `invalid API_TOKEN (value not shown): want comma-separated tokens of printable ASCII, none empty`},
	{nil, []string{"API_TOKEN", "tok1,"}, `invalid API_TOKEN (value not shown): want comma-separated tokens of printable ASCII, none empty`},
	{nil, []string{"API_TOKEN", "tok 1"}, `invalid API_TOKEN (value not shown): want comma-separated tokens of printable ASCII, none empty`},

	{[]string{"--version=perhaps"}, nil, `invalid --version "perhaps": ` + wantBool},
}

func TestConfigInvalid(t *testing.T) {
	t.Parallel()
	for _, tt := range configInvalidCases {
		_, err := loadConfig(tt.args, fakeEnv(tt.env...))
		if err == nil {
			t.Errorf("loadConfig(%q, %q) error = nil, want %s", tt.args, tt.env, tt.want)
			continue
		}
		if err.Error() != tt.want {
			t.Errorf("loadConfig(%q, %q) error =\n%s\nwant\n%s", tt.args, tt.env, err, tt.want)
		}
		if isUsageError(err) || errors.Is(err, errHelp) {
			t.Errorf("loadConfig(%q, %q) error %q is a usage error or help, want a value error", tt.args, tt.env, err)
		}
	}
}

func TestConfigUsageErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--bogus"}, "unknown flag: --bogus"},
		{[]string{"--port=1", "--bogus=1"}, "unknown flag: --bogus"},
		{[]string{"-x"}, `unknown shorthand flag: 'x' in -x`},
		{[]string{"app:main"}, `unexpected argument "app:main": server takes flags only`},
		{[]string{"--port", "1", "extra"}, `unexpected argument "extra": server takes flags only`},
		{[]string{"--", "--port"}, `unexpected argument "--port": server takes flags only`},
		{[]string{"--reload", "false"}, `unexpected argument "false": a switch takes its value after =, as in --reload=false`},
		{[]string{"--wokers", "3"}, `unknown flag: --wokers (did you mean --workers?)`},
		{[]string{"--reloda"}, `unknown flag: --reloda (did you mean --reload?)`},
		{[]string{"--port", "1", "off"}, `unexpected argument "off": server takes flags only`},
		{[]string{"--port"}, "flag needs an argument: --port"},
		{[]string{"--llm-api-key=sk-secret"}, "unknown flag: --llm-api-key (set LLM_API_KEY in the environment instead: a command line shows in ps)"},
		{[]string{"--api-token", "t"}, "unknown flag: --api-token (set API_TOKEN in the environment instead: a command line shows in ps)"},
	}
	for _, tt := range tests {
		_, err := loadConfig(tt.args, fakeEnv())
		if err == nil || err.Error() != tt.want || !isUsageError(err) {
			t.Errorf("loadConfig(%q) error = %v (usage error %v), want usage error %q", tt.args, err, isUsageError(err), tt.want)
		}
	}
	if isUsageError(nil) {
		t.Error("isUsageError(nil) = true, want false")
	}
	if isUsageError(errHelp) {
		t.Error("isUsageError(errHelp) = true, want false")
	}
	if err := fmt.Errorf("start: %w", prefork.UsageError{Err: errors.New("x")}); !isUsageError(err) {
		t.Errorf("isUsageError(%v) = false for a wrapped usage error, want true", err)
	}
}

func TestConfigHelp(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"--help"}, {"-h"}, {"--port", "junk", "--help"}, {"--reload", "-h"}} {
		_, err := loadConfig(args, fakeEnv("WORKERS", "junk"))
		if !errors.Is(err, errHelp) {
			t.Errorf("loadConfig(%q) error = %v, want errHelp", args, err)
		}
	}
}

func TestConfigVersion(t *testing.T) {
	t.Parallel()
	// --version must work whatever else is wrong, apart from the command line.
	c, err := loadConfig([]string{"--version", "--port", "junk"}, fakeEnv("WORKERS", "junk", "LLM_PROVIDER", "openai"))
	if err != nil || !c.ShowVersion {
		t.Errorf("loadConfig(--version with bad values) = ShowVersion %v, %v, want true, nil", c.ShowVersion, err)
	}
	c, err = loadConfig([]string{"--version=false"}, fakeEnv())
	if err != nil || c.ShowVersion {
		t.Errorf("loadConfig(--version=false) = ShowVersion %v, %v, want false, nil", c.ShowVersion, err)
	}
	if _, err := loadConfig([]string{"--version", "x"}, fakeEnv()); !isUsageError(err) {
		t.Errorf("loadConfig(--version x) error = %v, want a usage error", err)
	}
}

// TestConfigSecretsNeverShown checks that LLM_API_KEY and API_TOKEN appear in
// no error, in usage, or in any formatting of a config.
func TestConfigSecretsNeverShown(t *testing.T) {
	t.Parallel()
	const key, token = "sk-VERYSECRETKEY123", "TOKENSECRET456"
	secrets := []string{key, token, "VERYSECRET", "TOKENSECRET"}
	check := func(what, text string) {
		t.Helper()
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("%s shows a secret: %s", what, text)
			}
		}
	}
	for _, tt := range configInvalidCases {
		e := append([]string{"LLM_API_KEY", key, "API_TOKEN", token}, tt.env...)
		if _, err := loadConfig(tt.args, fakeEnv(e...)); err != nil {
			check(fmt.Sprintf("loadConfig(%q, %q) error", tt.args, tt.env), err.Error())
		}
	}
	for _, e := range [][]string{
		{"LLM_API_KEY", key + " x"},
		{"LLM_API_KEY", key + "\x00"},
		{"API_TOKEN", token + ",,b"},
		{"API_TOKEN", token + " x"},
	} {
		_, err := loadConfig(nil, fakeEnv(e...))
		if err == nil {
			t.Errorf("loadConfig(bad %s) error = nil, want an error", e[0])
			continue
		}
		check("loadConfig(bad "+e[0]+") error", err.Error())
	}
	for _, args := range [][]string{{"--llm-api-key=" + key}, {"--api-token", token}, {"--llm-api-key", key}} {
		_, err := loadConfig(args, fakeEnv())
		if err == nil {
			t.Errorf("loadConfig(%s) error = nil, want a usage error", args[0])
			continue
		}
		check("loadConfig("+args[0]+") error", err.Error())
	}

	var buf bytes.Buffer
	usage(&buf)
	check("usage", buf.String())

	c, err := loadConfig(nil, fakeEnv("LLM_API_KEY", key, "API_TOKEN", token+",other"))
	if err != nil {
		t.Fatalf("loadConfig(good secrets) error: %v", err)
	}
	if c.LLMAPIKey != key || !slices.Equal(c.APITokens, []string{token, "other"}) {
		t.Fatalf("loadConfig(good secrets) = %q, %q, want %q, %q", c.LLMAPIKey, c.APITokens, key, []string{token, "other"})
	}
	for _, f := range []string{"%v", "%+v", "%#v", "%s"} {
		check("Sprintf("+f+", config)", fmt.Sprintf(f, c))
		check("Sprintf("+f+", &config)", fmt.Sprintf(f, &c))
	}
	j, err := json.Marshal(c)
	if err != nil {
		t.Fatalf("json.Marshal(config) error: %v", err)
	}
	check("json.Marshal(config)", string(j))
	if s := c.String(); !strings.Contains(s, "LLMAPIKey:(hidden)") || !strings.Contains(s, "APITokens:[(2 hidden)]") {
		t.Errorf("config.String() = %s, want the secrets marked hidden", s)
	}
}

// TestConfigDocsMatchUsage keeps docs/configuration.md equal to --help: the
// same flags both ways, every variable, and the same defaults.
func TestConfigDocsMatchUsage(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatalf("read docs: %v", err)
	}
	docs := string(raw)
	var buf bytes.Buffer
	usage(&buf)
	help := buf.String()

	flagRE := regexp.MustCompile(`--[a-z][a-z0-9-]*`)
	set := func(text string) map[string]bool {
		m := map[string]bool{}
		for _, f := range flagRE.FindAllString(text, -1) {
			m[f] = true
		}
		return m
	}
	helpFlags, docFlags := set(help), set(docs)
	for f := range helpFlags {
		if !strings.Contains(docs, "`"+f+"`") {
			t.Errorf("usage lists %s but docs/configuration.md has no `%s`", f, f)
		}
	}
	for f := range docFlags {
		if !helpFlags[f] {
			t.Errorf("docs/configuration.md mentions %s, which usage does not list", f)
		}
	}

	// Table rows: | flag | env | default | meaning |
	var rows [][]string
	for _, line := range strings.Split(docs, "\n") {
		if cells := strings.Split(line, "|"); len(cells) == 6 && strings.HasPrefix(line, "|") {
			rows = append(rows, cells[1:5])
		}
	}
	ticked := regexp.MustCompile("`([^`]*)`")
	names := func(cell string) []string {
		var out []string
		for _, m := range ticked.FindAllStringSubmatch(cell, -1) {
			out = append(out, m[1])
		}
		return out
	}
	for _, o := range allOptions() {
		for _, e := range o.Env {
			if !strings.Contains(help, e) {
				t.Errorf("usage does not list variable %s", e)
			}
		}
		var row []string
		for _, r := range rows {
			if o.Flag != "" && slices.Contains(names(r[0]), "--"+o.Flag) ||
				o.Flag == "" && !strings.Contains(r[0], "--") && slices.Contains(names(r[1]), o.Env[0]) {
				row = r
				break
			}
		}
		name := "--" + o.Flag
		if o.Flag == "" {
			name = o.Env[0]
		}
		if row == nil {
			t.Errorf("docs/configuration.md has no table row for %s", name)
			continue
		}
		if got := names(row[1]); !slices.Equal(got, o.Env) {
			t.Errorf("docs row for %s names variables %q, want %q", name, got, o.Env)
		}
		if got := strings.TrimSpace(strings.ReplaceAll(row[2], "`", "")); got != o.Default {
			t.Errorf("docs row for %s gives default %q, usage says %q", name, got, o.Default)
		}
		if o.NegFlag != "" && !slices.Contains(names(row[0]), "--"+o.NegFlag) {
			t.Errorf("docs row for %s does not show --%s", name, o.NegFlag)
		}
		if o.Flag == "" && !regexp.MustCompile(`\(no flag\) +`+o.Env[0]+`[ ,]`).MatchString(help) {
			t.Errorf("usage does not list %s as a variable without a flag", name)
		}
	}
	for _, c := range commands {
		cmd := strings.TrimSpace("server " + c.name + " " + c.args)
		if !strings.Contains(help, cmd) || !strings.Contains(docs, "`"+cmd+"`") {
			t.Errorf("usage or docs/configuration.md lacks the command `%s`", cmd)
		}
	}
}

func TestConfigUsage(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	usage(&buf)
	help := buf.String()
	for _, want := range []string{"Process model:", "HTTP:", "HTTPS (TLS):", "Reload (development):", "Store and background chats:", "LLM:", "Operations:", "--help", "--version", "LLM_API_KEY", "API_TOKEN", "WEB_CONCURRENCY"} {
		if !strings.Contains(help, want) {
			t.Errorf("usage does not contain %q", want)
		}
	}
	// One line per option holds its flag, its variables and its default
	// (a long default on the next line, "default: ..."); the meaning
	// follows. Nothing is wider than 100 columns.
	lines := strings.Split(help, "\n")
	for _, line := range lines {
		if len(line) > 100 {
			t.Errorf("usage line of %d columns, want at most 100: %q", len(line), line)
		}
	}
	for _, o := range allOptions() {
		name := "(no flag)"
		if o.Flag != "" {
			name = "--" + o.Flag
		}
		found := false
		for i, line := range lines {
			f := strings.Fields(line)
			if len(f) > 2 && (f[0] == name || o.Flag == "" && f[0]+" "+f[1] == name && strings.TrimSuffix(f[2], ",") == o.Env[0]) {
				withDefault := strings.HasSuffix(line, "  "+o.Default) ||
					i+1 < len(lines) && lines[i+1] == "      default: "+o.Default
				found = strings.Contains(line, strings.Join(o.Env, ", ")) && withDefault
				break
			}
		}
		if !found {
			t.Errorf("usage has no line with %s, %s and default %s", name, strings.Join(o.Env, ", "), o.Default)
		}
	}
	// One line per subcommand, with its arguments.
	for _, cmd := range []string{"server status [--json]", "server reload", "server scale N", "server stop [--force]"} {
		n := 0
		for _, line := range lines {
			if f := strings.Fields(line); len(f) > 2 && strings.HasPrefix(strings.Join(f, " "), cmd+" ") {
				n++
			}
		}
		if n != 1 {
			t.Errorf("usage has %d lines for %q, want 1:\n%s", n, cmd, help)
		}
	}
}
