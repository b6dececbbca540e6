package supervisor

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/corralhq/corral/supervisor/protocol"
)

// procState is where a worker process is in its life.
type procState int

const (
	starting procState = iota // started, not ready yet
	ready                     // serving and heartbeating
	draining                  // sent SIGTERM, finishing its requests
	killing                   // hung or out of budget, sent SIGQUIT or SIGKILL
)

func (st procState) String() string {
	return [...]string{"starting", "ready", "draining", "killing"}[st]
}

// proc is one worker process. It is owned by the supervisor's loop; the
// goroutines that wait for it only send events.
type proc struct {
	slot     *slot
	gen      int
	pid      int
	process  process
	exe      string     // the binary it runs
	sockets  []*os.File // the listeners it serves, own slot's first
	lifeline *os.File   // supervisor's write end; closing it tells the worker we are gone
	state    procState
	why      string // why it was started ("start", "crash", "hup", ...)
	reason   string // why it is being stopped, once it is

	started  time.Time
	readyAt  time.Time
	lastBeat time.Time
	deadline time.Time // draining/killing: SIGKILL at this time

	requests uint64
	readyRSS uint64 // its resident memory when it became ready, read only with MaxMemory
	inFlight int64
	accept   string // the last heartbeat's Accept: "" or protocol.AcceptFailing
	metrics  []byte // the worker's last metrics text, when metrics are on
}

// event is what the per-process goroutines tell the loop.
type event struct {
	p      *proc
	msg    protocol.Message
	up     *upgrade // set on the new master's report or exit
	exited bool
	status string // how it exited: "exit 1", "signal killed"
}

// workerEnv is base without any marker the caller may have set (markers are
// always overwritten, never inherited) and without systemd's variables,
// which address the supervisor only.
func workerEnv(base []string, markers map[string]string) []string {
	env := make([]string, 0, len(base)+len(markers))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "CORRAL_") || k == "NOTIFY_SOCKET" || k == "WATCHDOG_PID" || k == "WATCHDOG_USEC" ||
			k == "LISTEN_FDS" || k == "LISTEN_PID" || k == "LISTEN_FDNAMES" {
			continue
		}
		env = append(env, kv)
	}
	for k, v := range markers {
		env = append(env, k+"="+v)
	}
	return env
}

// start execs a new worker for sl with the given listeners. On success the
// process runs, its goroutines report to s.events, and p is returned.
func (s *Supervisor) start(sl *slot, why string, listeners []*os.File) (*proc, error) {
	controlR, controlW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("supervisor: control pipe: %w", err)
	}
	lifelineR, lifelineW, err := os.Pipe()
	if err != nil {
		controlR.Close()
		controlW.Close()
		return nil, fmt.Errorf("supervisor: lifeline pipe: %w", err)
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		controlR.Close()
		controlW.Close()
		lifelineR.Close()
		lifelineW.Close()
		return nil, fmt.Errorf("supervisor: output pipe: %w", err)
	}
	args, _ := json.Marshal(s.cfg.WorkerArgs)
	gen := sl.gen + 1
	maxReq := 0
	if s.cfg.MaxRequests > 0 {
		maxReq = s.cfg.MaxRequests + s.jitter(s.cfg.MaxRequestsJitter)
	}
	cmd := &exec.Cmd{
		Path: s.exe,
		Args: []string{workerTitle(s.cfg.Name, sl.n, gen)},
		Env: workerEnv(s.cfg.Env, map[string]string{
			protocol.EnvRole:               protocol.RoleWorker,
			protocol.EnvProtocol:           protocol.Version,
			protocol.EnvArgs:               string(args),
			protocol.EnvSlot:               strconv.Itoa(sl.n),
			protocol.EnvSlots:              strconv.Itoa(len(s.slots)),
			protocol.EnvGeneration:         strconv.Itoa(gen),
			protocol.EnvListeners:          strconv.Itoa(len(listeners)),
			protocol.EnvSupervisorPID:      strconv.Itoa(os.Getpid()),
			protocol.EnvHealthcheckTimeout: s.cfg.HealthcheckTimeout.String(),
			protocol.EnvMaxRequests:        strconv.Itoa(maxReq),
			protocol.EnvMetrics:            strconv.FormatBool(s.cfg.MetricsAddr != ""),
		}),
		Stdout:     os.Stdout,
		Stderr:     outW,
		ExtraFiles: append([]*os.File{controlW, lifelineR, os.Stderr}, listeners...),
		SysProcAttr: &syscall.SysProcAttr{
			// Own process group: a terminal's Ctrl+C reaches the supervisor
			// only, which then drains the workers in order.
			Setpgid: true,
			// Backstop for the lifeline; the worker drains briefly on it.
			Pdeathsig: syscall.SIGTERM,
		},
	}
	child, err := s.env.startProcess(cmd)
	controlW.Close()
	lifelineR.Close()
	outW.Close()
	if err != nil {
		controlR.Close()
		lifelineW.Close()
		outR.Close()
		return nil, fmt.Errorf("supervisor: start worker %d: %w", sl.n, err)
	}
	sl.gen = gen
	p := &proc{slot: sl, gen: gen, pid: child.Pid(), process: child, exe: s.exe, sockets: listeners, lifeline: lifelineW, why: why, started: s.env.now()}
	go s.readControl(p, controlR)
	go s.readOutput(p, outR)
	go func() {
		s.events <- event{p: p, exited: true, status: child.Wait()}
	}()
	return p, nil
}

// readControl forwards the worker's messages until its end of the pipe
// closes, which happens at the latest when the worker exits.
func (s *Supervisor) readControl(p *proc, r *os.File) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), protocol.MaxMessage)
	for sc.Scan() {
		m, err := protocol.Decode(sc.Bytes())
		if err != nil {
			s.log.Warn().Err(err).Int("pid", p.pid).Msg("bad control message")
			continue
		}
		s.events <- event{p: p, msg: m}
	}
}

// readOutput logs what the worker writes to its stderr (runtime panics,
// goroutine dumps, start-up errors), a line per event, until it exits.
func (s *Supervisor) readOutput(p *proc, r *os.File) {
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		s.log.Warn().Int("pid", p.pid).Int("worker", p.slot.n).Str("line", sc.Text()).Msg("worker output")
	}
}

// signal sends sig to p and reports whether it was delivered; never to a
// reaped process.
func (p *proc) signal(sig syscall.Signal) bool {
	return p.process.Signal(sig)
}
