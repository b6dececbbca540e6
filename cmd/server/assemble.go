package main

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers"
	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/supervisor"
)

// The store and the LLM client provide what the handlers consume.
var (
	_ handlers.Store = (*store.Store)(nil)
	_ handlers.LLM   = (*llm.Simulated)(nil)
	_ handlers.LLM   = (*llm.OpenAI)(nil)
)

// openStore opens the database named by the configuration. Its errors name
// the file and the problem; the caller exits 3 on them.
func openStore(cfg config, log zerolog.Logger) (*store.Store, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return store.Open(ctx, cfg.DatabaseURL, store.Options{Logger: log, Host: cfg.InstanceID, MaxOpenConns: cfg.DatabaseMaxConns, MaxAgents: cfg.LimitAgents,
		// Only the default data/ folder is created: a folder the user
		// named and mistyped must not appear silently.
		RefuseMissingFolder: cfg.DatabaseURL != defaultDatabaseURL})
}

// prepareStore runs once in the master before any worker starts: it opens
// the database, migrates it, claims the instance id and marks the chats a
// previous run left started as failed. The store stays open for the
// master's own writes.
//
// In a master started by an upgrade (handoff set) the instance id is taken
// over from the old master, and no chat is failed: the old master's
// workers are still finishing theirs, and the old master records the
// chats of any of them that dies.
func prepareStore(cfg config, log zerolog.Logger, handoff *supervisor.Handoff) (*store.Store, error) {
	st, err := openStore(cfg, log)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := st.Migrate(ctx); err != nil {
		st.Close()
		return nil, err
	}
	if handoff != nil {
		var claim *os.File
		if len(handoff.Files) > 0 {
			claim = handoff.Files[0]
		}
		if err := st.TakeOverInstance(claim); err != nil {
			st.Close()
			return nil, err
		}
		log.Info().Str("database", st.Path()).Int("schema", st.SchemaVersion()).Msg("store ready")
		return st, nil
	}
	if err := st.ClaimInstance(ctx); err != nil {
		st.Close()
		return nil, err
	}
	n, err := st.FailAllStarted(ctx, "server_restarted")
	if err != nil {
		st.Close()
		return nil, err
	}
	if n > 0 {
		log.Warn().Int("chats", n).Str("reason", "server_restarted").Msg("chats left running by a previous run marked failed")
	}
	// Background chats a previous run left running (its workers were
	// killed) go back to the queue.
	requeued, failed, err := st.HandBackChats(ctx, 0, "server_restarted", cfg.ChatMaxAttempts)
	if err != nil {
		st.Close()
		return nil, err
	}
	if requeued+failed > 0 {
		log.Warn().Int("requeued", requeued).Int("failed", failed).Str("reason", "server_restarted").Msg("background chats left running by a previous run handed back")
	}
	log.Info().Str("database", st.Path()).Int("schema", st.SchemaVersion()).Msg("store ready")
	warnSharedFiles(st.Path(), log)
	return st, nil
}

// warnSharedFiles logs one warning per SQLite file that other local users
// may read: one created before the server set its umask, or by hand. The
// server creates its files 0600 but leaves an existing file's mode alone,
// since an operator may have chosen it.
func warnSharedFiles(path string, log zerolog.Logger) {
	if strings.Contains(path, "://") {
		return
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		if fi, err := os.Stat(p); err == nil && fi.Mode().Perm()&0o077 != 0 {
			log.Warn().Str("path", p).Str("mode", fmt.Sprintf("%04o", fi.Mode().Perm())).
				Msg("database file readable by other local users; chmod 600 it")
		}
	}
}

// newLLM builds the configured provider.
func newLLM(cfg config) (handlers.LLM, error) {
	_, model := cfg.models()
	switch cfg.LLMProvider {
	case llm.ProviderOpenAI:
		c, err := llm.NewOpenAI(llm.OpenAIConfig{
			BaseURL:     cfg.LLMBaseURL,
			APIKey:      cfg.LLMAPIKey,
			Headers:     cfg.LLMHeaders,
			Model:       model,
			Timeout:     cfg.LLMTimeout,
			IdleTimeout: cfg.LLMIdleTimeout,
		})
		if err != nil {
			return nil, err
		}
		return c, nil
	case llm.ProviderSimulated, "":
		return llm.NewSimulated(llm.SimulatedConfig{Latency: cfg.SimulatedLatency, Model: model}), nil
	}
	return nil, fmt.Errorf("unknown LLM provider %q", cfg.LLMProvider)
}

// statusCharts are the status page's charts over the last 15 minutes.
var statusCharts = []supervisor.Chart{
	{Title: "requests / s", Metric: handlers.MetricRequests, Kind: supervisor.ChartRate},
	{Title: "p99 latency, ms", Metric: handlers.MetricDuration, Kind: supervisor.ChartP99},
	{Title: "chats in flight", Metric: handlers.MetricChatsInFlight, Kind: supervisor.ChartSum},
}

// activitiesPanel is the status page's panel: the last 20 activities,
// newest first, with the reason of a failed or cancelled chat.
func activitiesPanel(st *store.Store) func(ctx context.Context) (supervisor.Panel, error) {
	return func(ctx context.Context) (supervisor.Panel, error) {
		p := supervisor.Panel{Title: "Recent activities", Columns: []string{"id", "time", "type", "agent", "chat", "worker", "reason"}, Rows: [][]string{}}
		last, err := st.LastActivityID(ctx)
		if err != nil {
			return p, err
		}
		acts, err := st.Activities(ctx, store.Filter{After: max(0, last-20), Limit: 20})
		if err != nil {
			return p, err
		}
		for i := len(acts) - 1; i >= 0; i-- {
			a := acts[i]
			p.Rows = append(p.Rows, []string{strconv.FormatInt(a.ID, 10), a.Time.Format("2006-01-02 15:04:05.000"), a.Type,
				cmp.Or(a.AgentID, "–"), cmp.Or(a.ChatID, "–"), strconv.Itoa(a.Worker), activityReason(a)})
		}
		return p, nil
	}
}

// activityReason is why a chat failed or was cancelled, as its activity's
// data says ("upstream_timeout: the LLM did not answer in time"), or "–".
func activityReason(a store.Activity) string {
	reason, _ := a.Data["reason"].(string)
	msg, _ := a.Data["message"].(string)
	switch {
	case reason != "" && msg != "":
		return reason + ": " + msg
	case reason != "" || msg != "":
		return reason + msg
	}
	return "–"
}

// orphanReaper records as failed the synchronous chats of workers that
// died in the middle of them, and hands their background chats back to the
// queue at once (their jobs are available again, for any worker). The
// supervisor's loop hands it pids and never waits: the buffer absorbs
// bursts, and a pid that does not fit is caught by the next start's
// FailAllStarted and HandBackChats.
type orphanReaper struct {
	st          *store.Store
	log         zerolog.Logger
	maxAttempts int
	pids        chan int
	done        chan struct{}
}

func newOrphanReaper(st *store.Store, log zerolog.Logger, maxAttempts int) *orphanReaper {
	r := &orphanReaper{st: st, log: log, maxAttempts: maxAttempts, pids: make(chan int, 1024), done: make(chan struct{})}
	go r.run()
	return r
}

// workerExited is the supervisor's OnWorkerExit hook.
func (r *orphanReaper) workerExited(pid int, _ bool) {
	select {
	case r.pids <- pid:
	default:
		r.log.Warn().Int("pid", pid).Msg("orphaned chats not checked: queue full")
	}
}

func (r *orphanReaper) run() {
	defer close(r.done)
	for pid := range r.pids {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		n, err := r.st.FailOrphanedChats(ctx, pid, "worker_died")
		switch {
		case err != nil:
			r.log.Error().Err(err).Int("pid", pid).Msg("orphaned chats not recorded")
		case n > 0:
			r.log.Warn().Int("pid", pid).Int("chats", n).Str("reason", "worker_died").Msg("chats of a dead worker marked failed")
		}
		requeued, failed, err := r.st.HandBackChats(ctx, pid, "worker_died", r.maxAttempts)
		cancel()
		switch {
		case err != nil:
			r.log.Error().Err(err).Int("pid", pid).Msg("background chats of a dead worker not handed back")
		case requeued+failed > 0:
			r.log.Warn().Int("pid", pid).Int("requeued", requeued).Int("failed", failed).Str("reason", "worker_died").Msg("background chats of a dead worker handed back")
		}
	}
}

// close stops the reaper after it has handled every pid it was given.
func (r *orphanReaper) close() {
	close(r.pids)
	<-r.done
}
