package supervisor

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/VictoriaMetrics/metrics"
	"net"
	"net/http"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The metrics address serves, for operators and Prometheus:
//
//	GET /metrics       Prometheus text: every ready worker's metrics with a
//	                   worker="N" label, and the supervisor's own
//	GET /status.json   the Status of `server status`, plus Config.Panel's table
//	GET /              a live status page (status.html, polling the two above)
//
// Workers send their metrics text with their heartbeats when metrics are
// on, so a scrape never waits on a worker.

//go:embed status.html
var statusPage []byte

// snapshot is what a metrics request asks of the loop.
type snapshot struct {
	status   *Status
	workers  map[int][]byte // slot -> current worker's metrics text
	restarts map[string]uint64
}

type snapshotReq chan snapshot

// listenMetrics listens on the metrics address, or takes the listener a
// new master inherits on an upgrade.
func (s *Supervisor) listenMetrics() (*net.TCPListener, error) {
	if h := s.handoff; h != nil && h.metrics != nil {
		ln, err := net.FileListener(h.metrics)
		h.metrics.Close()
		if err != nil {
			return nil, fmt.Errorf("supervisor: inherited metrics listener: %w", err)
		}
		tl, ok := ln.(*net.TCPListener)
		if !ok {
			ln.Close()
			return nil, fmt.Errorf("supervisor: inherited metrics listener is a %T, not a TCP listener", ln)
		}
		return tl, nil
	}
	ln, err := net.Listen("tcp", s.cfg.MetricsAddr)
	if err != nil {
		return nil, fmt.Errorf("supervisor: metrics address %s: %w", s.cfg.MetricsAddr, err)
	}
	return ln.(*net.TCPListener), nil
}

// serveMetrics runs the metrics HTTP server until done closes.
func (s *Supervisor) serveMetrics(ln net.Listener, done <-chan struct{}) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", s.handleMetrics)
	mux.HandleFunc("GET /status.json", s.handleStatusJSON)
	mux.HandleFunc("GET /charts.json", s.handleChartsJSON)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Content-Security-Policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'")
		w.Write(statusPage)
	})
	srv := &http.Server{
		Handler:           s.metricsHost(s.metricsAuth(mux)),
		ReadHeaderTimeout: 5 * time.Second,
		WriteTimeout:      10 * time.Second,
	}
	go func() {
		<-done
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}()
	// A listener closed under it was handed to a new master.
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		s.log.Error().Err(err).Msg("metrics server stopped")
	}
}

// metricsHost answers 421 to a request whose Host the metrics server does
// not answer for, before the token is checked.
func (s *Supervisor) metricsHost(next http.Handler) http.Handler {
	allowed := s.cfg.MetricsHostAllowed
	if allowed == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !allowed(r.Host) {
			http.Error(w, "this server does not answer for that host name", http.StatusMisdirectedRequest)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// metricsAuth requires METRICS_TOKEN, when set, as a bearer token, or as
// ?token= on the status page alone (opened in a browser; its script sends
// the token as a bearer token). Elsewhere a token in the URL would end up
// in scrape configs and proxy logs, so it is not taken.
func (s *Supervisor) metricsAuth(next http.Handler) http.Handler {
	if s.cfg.MetricsToken == "" {
		return next
	}
	want := sha256.Sum256([]byte(s.cfg.MetricsToken))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var tok string
		if r.URL.Path == "/" {
			tok = r.URL.Query().Get("token")
		}
		if a := r.Header.Get("Authorization"); len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
			tok = a[7:]
		}
		got := sha256.Sum256([]byte(tok))
		if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="corral metrics"`)
			http.Error(w, "missing or invalid token", http.StatusUnauthorized)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// snapshot asks the loop for its state; it fails when the loop is gone.
func (s *Supervisor) snapshot(r *http.Request) (snapshot, bool) {
	req := make(snapshotReq, 1)
	select {
	case s.snapshots <- req:
	case <-r.Context().Done():
		return snapshot{}, false
	}
	select {
	case snap := <-req:
		return snap, true
	case <-r.Context().Done():
		return snapshot{}, false
	}
}

// onSnapshot answers a snapshot request in the loop.
func (s *Supervisor) onSnapshot(req snapshotReq) {
	snap := snapshot{status: s.status(), workers: map[int][]byte{}, restarts: maps(s.restartsBy)}
	for _, sl := range s.slots {
		if p := sl.current; p != nil && p.state == ready && p.metrics != nil {
			snap.workers[sl.n] = p.metrics
		}
	}
	req <- snap
}

func maps(m map[string]uint64) map[string]uint64 {
	c := make(map[string]uint64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

func (s *Supervisor) handleMetrics(w http.ResponseWriter, r *http.Request) {
	snap, ok := s.snapshot(r)
	if !ok {
		http.Error(w, "server stopping", http.StatusServiceUnavailable)
		return
	}
	var extra bytes.Buffer
	if s.cfg.Metrics != nil {
		s.cfg.Metrics(&extra)
	}
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	w.Write(renderMetrics(snap, extra.Bytes()))
}

// renderMetrics writes the supervisor's metrics and every worker's, each
// worker's samples labelled worker="N", grouped by family with one # HELP
// and one # TYPE line each, as the exposition format wants. extra, the
// application's own text (Config.Metrics), is merged in unlabelled.
func renderMetrics(snap snapshot, extra []byte) []byte {
	var b bytes.Buffer
	st := snap.status
	fmt.Fprintf(&b, "corral_build_info{version=%q,goversion=%q} 1\n", cmp.Or(st.Version, "dev"), runtime.Version())
	fmt.Fprintf(&b, "corral_supervisor_uptime_seconds %g\n", st.UptimeS)
	states := map[string]int{"starting": 0, "ready": 0, "draining": 0, "killing": 0}
	for _, wk := range st.Workers {
		states[wk.State]++
	}
	for _, k := range sortedKeys(states) {
		fmt.Fprintf(&b, "corral_workers{state=%q} %d\n", k, states[k])
	}
	for _, k := range sortedKeys(snap.restarts) {
		fmt.Fprintf(&b, "corral_worker_restarts_total{reason=%q} %d\n", k, snap.restarts[k])
	}
	e := newExposition()
	e.add(b.Bytes(), nil)
	// The master's own process and Go metrics, labelled worker="master",
	// so its goroutines, fds and memory are watched like the workers'.
	var own bytes.Buffer
	metrics.WriteProcessMetrics(&own)
	metrics.WriteFDMetrics(&own)
	e.add(own.Bytes(), []byte(`worker="master"`))
	for _, slot := range sortedKeys(snap.workers) {
		e.add(snap.workers[slot], []byte(`worker="`+strconv.Itoa(slot)+`"`))
	}
	e.add(extra, nil)
	var out bytes.Buffer
	e.write(&out)
	return out.Bytes()
}

// withLabel adds label as the first label of one sample line.
func withLabel(line, label []byte) []byte {
	i := bytes.IndexAny(line, "{ ")
	if i < 0 {
		return line
	}
	out := make([]byte, 0, len(line)+len(label)+3)
	out = append(out, line[:i]...)
	out = append(out, '{')
	out = append(out, label...)
	if line[i] == '{' {
		if line[i+1] != '}' {
			out = append(out, ',')
		}
		out = append(out, line[i+1:]...)
	} else {
		out = append(out, '}')
		out = append(out, line[i:]...)
	}
	return out
}

func metricName(line []byte) []byte {
	if i := bytes.IndexAny(line, "{ "); i >= 0 {
		return line[:i]
	}
	return line
}

func sortedKeys[K int | string, V any](m map[K]V) []K {
	ks := make([]K, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func (s *Supervisor) handleStatusJSON(w http.ResponseWriter, r *http.Request) {
	snap, ok := s.snapshot(r)
	if !ok {
		http.Error(w, "server stopping", http.StatusServiceUnavailable)
		return
	}
	s.addInfo(snap.status)
	body := struct {
		*Status
		Panel *Panel `json:"panel,omitempty"`
	}{Status: snap.status}
	if s.cfg.Panel != nil {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		p, err := s.cfg.Panel(ctx)
		cancel()
		if err != nil {
			s.log.Warn().Err(err).Msg("status panel unavailable")
		} else {
			body.Panel = &p
		}
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	json.NewEncoder(w).Encode(body)
}
