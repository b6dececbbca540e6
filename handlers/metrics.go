package handlers

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/VictoriaMetrics/metrics"
)

// Metric names. The supervisor adds a worker="N" label to each sample. The
// exported ones are drawn on the status page.
const (
	MetricRequests      = "corral_http_requests_total"
	MetricDuration      = "corral_http_request_duration_seconds"
	MetricChatsInFlight = "corral_chats_in_flight"
	metricInFlight      = "corral_http_requests_in_flight"
	metricLLMDuration   = "corral_llm_call_duration_seconds"
	metricLLMTokens     = "corral_llm_tokens_total"
	metricActivities    = "corral_activities_written_total"
	metricStoreErrors   = "corral_store_errors_total"
	metricChatAttempts  = "corral_background_chat_attempts_total"
)

// metricFamilies describe the families above for the # HELP and # TYPE
// lines of /metrics.
var metricFamilies = []struct{ name, typ, help string }{
	{MetricRequests, "counter", "HTTP requests answered, by route and status."},
	{MetricDuration, "histogram", "Handler time of HTTP requests, by route; for a stream, the time to start it."},
	{metricInFlight, "gauge", "HTTP requests being answered, by route."},
	{MetricChatsInFlight, "gauge", "Chats waiting on the LLM."},
	{metricLLMDuration, "histogram", "Duration of LLM calls, by provider and outcome."},
	{metricLLMTokens, "counter", "Tokens of LLM calls as the provider counted them, by kind (prompt, completion)."},
	{metricActivities, "counter", "Activities written to the store, by type."},
	{metricStoreErrors, "counter", "Store calls that failed for a reason of the server's, by operation."},
}

// WriteMetricsMeta writes the # HELP and # TYPE lines of the API's metric
// families, which the metrics.Set a Handler was given does not write.
func WriteMetricsMeta(w io.Writer) {
	for _, f := range metricFamilies {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", f.name, f.help, f.name, f.typ)
	}
}

// Histogram buckets, in seconds. LLM calls run up to LLM_TIMEOUT (120 s).
var (
	requestBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}
	llmBuckets     = []float64{.1, .25, .5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120}
)

// routes are the route labels; any other path is "other", so a scanner
// cannot blow up the label set.
var routes = []string{"/health", "/api/chat", "/api/activities", "/api/activities/stream", "/api/agents", "/api/agents/{id}",
	"/api/chats/{id}", "/api/chats/{id}/events", "/api/chats/{id}/cancel", "other"}

// routeOf maps a request path to its route label.
func routeOf(path string) string {
	switch {
	case path == "/health", path == "/api/chat", path == "/api/activities", path == "/api/activities/stream", path == "/api/agents":
		return path
	case strings.HasPrefix(path, "/api/agents/") && !strings.Contains(path[len("/api/agents/"):], "/"):
		return "/api/agents/{id}"
	case strings.HasPrefix(path, "/api/chats/"):
		if _, sub, ok := chatPath(path); ok {
			if sub == "" {
				return "/api/chats/{id}"
			}
			return "/api/chats/{id}/" + sub
		}
	}
	return "other"
}

// meters holds the API's metrics in one metrics.Set. A nil *meters records
// nothing.
type meters struct {
	set      *metrics.Set
	duration map[string]*metrics.PrometheusHistogram
	inFlight map[string]*metrics.Gauge
	chats    *metrics.Gauge
	counters sync.Map // counterKey -> *metrics.Counter, created on first use
}

type counterKey struct {
	name, a, b string
}

func newMeters(set *metrics.Set) *meters {
	if set == nil {
		return nil
	}
	m := &meters{
		set:      set,
		duration: make(map[string]*metrics.PrometheusHistogram, len(routes)),
		inFlight: make(map[string]*metrics.Gauge, len(routes)),
		chats:    set.GetOrCreateGauge(MetricChatsInFlight, nil),
	}
	for _, r := range routes {
		m.duration[r] = set.GetOrCreatePrometheusHistogramExt(MetricDuration+`{route="`+r+`"}`, requestBuckets)
		m.inFlight[r] = set.GetOrCreateGauge(metricInFlight+`{route="`+r+`"}`, nil)
	}
	return m
}

// counter returns the counter name{la="a",lb="b"}, creating it once.
func (m *meters) counter(name, la, a, lb, b string) *metrics.Counter {
	k := counterKey{name, a, b}
	if c, ok := m.counters.Load(k); ok {
		return c.(*metrics.Counter)
	}
	full := name + `{` + la + `="` + a + `"`
	if lb != "" {
		full += `,` + lb + `="` + b + `"`
	}
	c := m.set.GetOrCreateCounter(full + `}`)
	m.counters.Store(k, c)
	return c
}

// begin counts a request in flight on route; end records its outcome.
func (m *meters) begin(route string) time.Time {
	if m == nil {
		return time.Time{}
	}
	m.inFlight[route].Inc()
	return time.Now()
}

func (m *meters) end(route string, status int, start time.Time) {
	if m == nil {
		return
	}
	m.inFlight[route].Dec()
	m.duration[route].UpdateDuration(start)
	m.counter(MetricRequests, "route", route, "status", strconv.Itoa(status)).Inc()
}

// chat records one LLM call.
func (m *meters) llmCall(provider, outcome string, d time.Duration, prompt, completion int) {
	if m == nil {
		return
	}
	m.set.GetOrCreatePrometheusHistogramExt(metricLLMDuration+`{provider="`+provider+`",outcome="`+outcome+`"}`, llmBuckets).Update(d.Seconds())
	m.counter(metricLLMTokens, "kind", "prompt", "", "").Add(prompt)
	m.counter(metricLLMTokens, "kind", "completion", "", "").Add(completion)
}

func (m *meters) chatStarted() {
	if m != nil {
		m.chats.Inc()
	}
}

func (m *meters) chatEnded() {
	if m != nil {
		m.chats.Dec()
	}
}

// background counts an attempt of a background chat run by this worker.
func (m *meters) background(attempt int) {
	if m == nil {
		return
	}
	kind := "first"
	if attempt > 1 {
		kind = "retry"
	}
	m.counter(metricChatAttempts, "kind", kind, "", "").Inc()
}

// activity counts one activity written by this worker.
func (m *meters) activity(typ string) {
	if m != nil {
		m.counter(metricActivities, "type", typ, "", "").Inc()
	}
}

// storeError counts a store call that failed for a reason of the server's.
func (m *meters) storeError(op string) {
	if m != nil {
		m.counter(metricStoreErrors, "op", op, "", "").Inc()
	}
}
