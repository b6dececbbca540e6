// Command server is Corral: a supervisor of worker processes and the
// LLM-agent API they serve, in one binary.
//
// It is a prefork application like any other (see package prefork): Main
// reads the process model's settings and this program's, and runs the
// master or a worker. The master prepares the store before any worker
// starts; each worker serves the handlers of package handlers.
package main

import (
	"cmp"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/rs/zerolog"

	"github.com/corralhq/corral/handlers/llm"
	"github.com/corralhq/corral/supervisor"
	"github.com/corralhq/corral/supervisor/prefork"
	"github.com/corralhq/corral/supervisor/protocol"
)

// version is stamped by the Makefile with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	os.Exit(run(os.Stdout, os.Stderr))
}

// run is the whole program; it returns the exit status.
func run(stdout, stderr io.Writer) int {
	if os.Getenv(protocol.EnvRole) == "" && len(os.Args) > 1 && subcommands[os.Args[1]] != "" {
		return runCLI(os.Args[1], os.Args[2:], stdout, stderr)
	}
	// Every file the server creates (the database, its -wal and -shm, the
	// instance lock, the control socket) is readable by the server's user
	// only, whatever the caller's umask: the database holds every prompt
	// and message. systemd's unit sets the same (UMask=0077); a shell
	// usually has 022. The workers inherit it.
	syscall.Umask(0o077)
	c := defaultConfig()
	return prefork.Main(newApp(&c))
}

// prepareMaster is the server's part of the master: it prepares the store
// (migrations run once, here, before any worker starts) and gives the
// supervisor the hooks that need it. The returned function closes both.
func prepareMaster(cfg config, log zerolog.Logger, sc *supervisor.Config) (func(), error) {
	st, err := prepareStore(cfg, log, sc.Upgrade)
	if err != nil {
		return nil, err
	}
	// A new master started by an upgrade inherits the instance claim.
	sc.HandOver = func() []*os.File {
		if f := st.InstanceClaim(); f != nil {
			return []*os.File{f}
		}
		return nil
	}
	if addr, public := supervisor.Public(*sc); public && len(cfg.APITokens) == 0 {
		// Refused under --require-token by the configuration's check.
		log.Warn().Str("addr", addr).Str("fix", "set API_TOKEN, and --require-token to refuse to start without it").
			Msg("the API is open to other hosts without a token: anyone who reaches it can create agents with any system prompt, read every prompt and delete agents")
		sc.StatusNotes = append(sc.StatusNotes, "WARNING: API open to other hosts, no API_TOKEN")
	}
	reaper := newOrphanReaper(st, log, cfg.ChatMaxAttempts)
	sc.ControlSocket = controlPath(cfg.ControlSocket, cfg.DatabaseURL)
	sc.OnWorkerExit = reaper.workerExited
	sc.Panel = activitiesPanel(st)
	sc.Charts = statusCharts
	info := []supervisor.Field{{Name: "store", Value: describeStore(st.Path())}, {Name: "llm", Value: describeLLM(cfg)}}
	queue := newQueueWatch(st, log, cfg.ChatMaxAttempts)
	var prune *pruner
	if cfg.Retention > 0 {
		prune = startPruner(st, log, cfg.Retention)
	}
	sc.Info = func() []supervisor.Field { return append(info[:len(info):len(info)], queue.fields()...) }
	sc.Metrics = queue.writeMetrics
	if sc.Reload != nil {
		// The database's folder is never watched, so its writes never
		// trigger a reload.
		sc.Reload.ExcludeDirs = dataDirsBelow(filepath.Dir(st.Path()), cfg.ReloadDirs)
	}
	return func() {
		if prune != nil {
			prune.close()
		}
		queue.close()
		reaper.close()
		st.Close()
	}, nil
}

// describeStore names the database for status output: an SQLite file, or
// the PostgreSQL URL the store gives without its password.
func describeStore(path string) string {
	if strings.Contains(path, "://") {
		return path
	}
	return "sqlite:" + path
}

// describeLLM names the provider for status output, without secrets.
func describeLLM(cfg config) string {
	switch {
	case cfg.LLMProvider == "openai":
		host := cfg.LLMBaseURL
		if u, err := url.Parse(cfg.LLMBaseURL); err == nil {
			host = u.Host
		}
		return "openai at " + host + " (model " + cmp.Or(cfg.LLMModel, llm.DefaultOpenAIModel) + ")"
	case cfg.SimulatedLatency > 0:
		return "simulated (" + cfg.SimulatedLatency.String() + " per reply)"
	}
	return "simulated"
}

// dataDirsBelow returns dir when it lies inside one of the reload folders,
// so that the database's writes are never watched. A database folder that
// holds a reload folder (data/ around src/) excludes nothing: excluding it
// would silence the whole tree.
func dataDirsBelow(dir string, roots []string) []string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil
	}
	for _, r := range roots {
		ar, err := filepath.Abs(r)
		if err != nil {
			continue
		}
		if rel, err := filepath.Rel(ar, abs); err == nil && rel != "." && !strings.HasPrefix(rel, "..") {
			return []string{abs}
		}
	}
	return nil
}
