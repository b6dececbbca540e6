// Package protocol is the contract between the supervisor and its workers:
// the environment markers, the inherited file descriptors and the messages
// that cross the control pipe and the lifeline.
//
// It is the one package both sides import (supervisor and worker import
// neither each other), so a change here is a change of the wire contract and
// must be reflected in docs/architecture.md.
//
// A worker is the server binary re-executed by the supervisor with:
//
//	fd 2          stderr: a pipe the supervisor reads line by line and logs
//	              as "worker output", so runtime panics and goroutine dumps
//	              never split another process's JSON log line
//	fd 3          ControlFD: pipe, worker writes, supervisor reads (JSON lines)
//	fd 4          LifelineFD: pipe, supervisor writes, worker reads; EOF means
//	              the supervisor is gone
//	fd 5          LogFD: the supervisor's own stderr, where the worker's
//	              logger writes whole lines
//	fd 6..6+n-1   ListenerFD: the listening sockets to serve (own slot first)
//
// and the environment variables below, which the supervisor always sets and
// overwrites: a marker inherited from the caller's environment never reaches
// a worker.
//
// The worker's first message is Ready, sent once it serves on its listeners
// and has answered its own /health through the serving path. After that it
// sends a Heartbeat every HeartbeatInterval(timeout), each one only after a
// fresh /health probe through the serving path succeeded, so a worker whose
// handlers are stuck stops heartbeating even if the process still runs.
package protocol

import (
	"encoding/json"
	"fmt"
	"time"
)

// Version is the version of this contract. A worker refuses to start under
// a supervisor of another version: after the binary is replaced on disk,
// new workers run the new binary while the master runs the old one.
const Version = "2"

// File descriptors a worker inherits.
const (
	ControlFD  = 3
	LifelineFD = 4
	LogFD      = 5
	ListenerFD = 6 // first listener; the worker's own slot socket
)

// Environment markers set on every worker (and, EnvRole and EnvArgs only, on
// the master's own re-exec).
const (
	// EnvRole is "master" on the supervisor's own re-exec and "worker" on a
	// worker; unset on a process started by a user.
	EnvRole = "CORRAL_ROLE"
	// EnvProtocol is the supervisor's Version.
	EnvProtocol = "CORRAL_PROTOCOL"
	// EnvArgs carries the original command-line arguments as a JSON array, so
	// argv can hold the process title alone.
	EnvArgs = "CORRAL_ARGS"
	// EnvSlot is the worker's slot, 1-based.
	EnvSlot = "CORRAL_SLOT"
	// EnvSlots is the number of slots when the worker was started.
	EnvSlots = "CORRAL_SLOTS"
	// EnvGeneration is the incarnation of the slot, 1 for the first worker.
	EnvGeneration = "CORRAL_GENERATION"
	// EnvListeners is how many listener fds start at ListenerFD.
	EnvListeners = "CORRAL_LISTENERS"
	// EnvSupervisorPID is the supervisor's pid; a worker whose parent is no
	// longer that pid has been orphaned.
	EnvSupervisorPID = "CORRAL_SUPERVISOR_PID"
	// EnvHealthcheckTimeout is the supervisor's hang timeout as a Go duration;
	// the worker heartbeats several times within it.
	EnvHealthcheckTimeout = "CORRAL_HEALTHCHECK_TIMEOUT"
	// EnvMetrics is "true" when the supervisor serves metrics: the worker
	// then sends its metrics text with every heartbeat.
	EnvMetrics = "CORRAL_METRICS"
	// EnvMaxRequests is the number of requests after which the worker asks to
	// be recycled (limit plus this worker's jitter); 0 or unset means never.
	EnvMaxRequests = "CORRAL_MAX_REQUESTS"
)

// EnvUpgrade is set on a master started by an upgrade (SIGUSR2 to the
// master it replaces): an Upgrade as JSON, naming the descriptors it
// inherits from UpgradeFD on.
const EnvUpgrade = "CORRAL_UPGRADE"

// UpgradeFD is, on a master started by an upgrade, the pipe on which it
// reports to the old master: one TypeReady message once every worker of
// its own is ready, or one TypeFailed message. Its listening sockets follow
// from UpgradeFD+1 in the order of Upgrade's fields.
const UpgradeFD = 3

// Upgrade describes what a new master inherits from the one it replaces.
// The descriptors follow UpgradeFD in this order: the control socket's
// listener (if Control), the metrics listener (if Metrics), Slots
// per-slot sockets (reuseport mode, slot 1 first), Shared shared sockets,
// Files files of the application's own.
type Upgrade struct {
	// Parent is the old master's pid; Version its version.
	Parent  int    `json:"parent"`
	Version string `json:"version,omitempty"`
	// Workers is how many workers the old master runs; the new one runs as
	// many.
	Workers int  `json:"workers"`
	Control bool `json:"control,omitempty"`
	Metrics bool `json:"metrics,omitempty"`
	Slots   int  `json:"slots,omitempty"`
	Shared  int  `json:"shared,omitempty"`
	// UDS is the path of the unix socket among the shared ones; Activated
	// says the shared sockets came from systemd (their files are systemd's).
	UDS       string `json:"uds,omitempty"`
	Activated bool   `json:"activated,omitempty"`
	Files     int    `json:"files,omitempty"`
}

// DefaultGracefulTimeout is the drain budget both sides apply when none is
// configured: the supervisor waits that long for a stopping worker before
// SIGKILL, and the worker bounds its own drain by it. Declared here, once,
// because both packages need it and neither imports the other.
const DefaultGracefulTimeout = 75 * time.Second

// Role values of EnvRole.
const (
	RoleMaster = "master"
	RoleWorker = "worker"
)

// AcceptFailing is Message.Accept while a worker cannot accept.
const AcceptFailing = "failing"

// Message types on the control pipe.
const (
	TypeReady     = "ready"
	TypeHeartbeat = "heartbeat"
	TypeRecycle   = "recycle"
	// TypeReload travels on the lifeline, supervisor to worker: the state of
	// the last reload build, which the worker shows in /health.
	TypeReload = "reload"
	// TypeDrain travels on the lifeline: the server is about to stop, so
	// /health should fail while the worker keeps serving.
	TypeDrain = "drain"
	// TypeFailed travels on the upgrade pipe, new master to old: the new
	// master gives up (Error says why); the old one keeps serving.
	TypeFailed = "failed"
	// TypeStop travels on the lifeline just before the supervisor sends
	// SIGTERM: why the worker is asked to drain (Reason) and within what
	// budget (BudgetMS), so that the worker logs the same reason as the
	// supervisor and drains within the budget the supervisor enforces.
	TypeStop = "stop"
)

// Message is one JSON line on the control pipe (worker to supervisor) or on
// the lifeline (supervisor to worker).
// Fields that do not apply to a type are omitted.
type Message struct {
	Type string `json:"type"`
	PID  int    `json:"pid"`
	// Requests is the number of requests the worker has finished.
	Requests uint64 `json:"requests,omitempty"`
	// InFlight is the number of requests being served now.
	InFlight int64 `json:"in_flight,omitempty"`
	// Accept is "failing" on a heartbeat while the worker's accept fails
	// for want of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS,
	// ENOMEM): new connections wait in the backlog. Omitted otherwise.
	Accept string `json:"accept,omitempty"`
	// Reason says why a recycle is asked for (e.g. "max_requests"), or
	// why a worker is stopped.
	Reason string `json:"reason,omitempty"`
	// BudgetMS is a TypeStop's drain budget in milliseconds.
	BudgetMS int64 `json:"budget_ms,omitempty"`
	// Build is "ok" or "failed" on a TypeReload message.
	Build string `json:"build,omitempty"`
	// Error is the first line of a failed build's output.
	Error string `json:"error,omitempty"`
	// Metrics is the worker's Prometheus text, on heartbeats when
	// EnvMetrics is "true".
	Metrics string `json:"metrics,omitempty"`
	// Version is the new master's version, on its TypeReady message on
	// the upgrade pipe.
	Version string `json:"version,omitempty"`
}

// MaxMessage bounds one encoded message.
const MaxMessage = 4 << 20

// Encode returns m as one newline-terminated JSON line.
func (m Message) Encode() []byte {
	b, err := json.Marshal(m)
	if err != nil {
		// Message holds only strings and integers; Marshal cannot fail.
		panic(fmt.Sprintf("protocol: encode message: %v", err))
	}
	return append(b, '\n')
}

// Decode parses one line written by Encode.
func Decode(line []byte) (Message, error) {
	var m Message
	if err := json.Unmarshal(line, &m); err != nil {
		return Message{}, fmt.Errorf("protocol: decode message %q: %w", line, err)
	}
	if m.Type == "" {
		return Message{}, fmt.Errorf("protocol: decode message %q: no type", line)
	}
	return m, nil
}

// HeartbeatInterval is how often a worker heartbeats for a supervisor whose
// hang timeout is timeout: five beats per timeout, so one slow probe is not
// mistaken for a hang, and never more often than every 50 ms.
func HeartbeatInterval(timeout time.Duration) time.Duration {
	return max(timeout/5, 50*time.Millisecond)
}
