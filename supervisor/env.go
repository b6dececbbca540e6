package supervisor

import (
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// env is what the supervisor asks of the operating system where a test
// stands in: starting and signalling processes, and the clock. New uses
// osEnv; the engine tests in this package give fake processes and a fake
// clock, and drive the loop's handlers one input at a time.
type env struct {
	// startProcess starts cmd, fully described but not started, and returns
	// the running process. cmd's files are the caller's to close after it
	// returns.
	startProcess func(cmd *exec.Cmd) (process, error)
	// now is the clock of every deadline the loop keeps.
	now func() time.Time
	// rss is the resident memory of process pid, in bytes.
	rss func(pid int) uint64
}

// process is a started child process.
type process interface {
	// Pid is its process id.
	Pid() int
	// Signal sends sig and reports whether it was delivered; once the
	// process has been reaped it reports false and sends nothing, so a
	// late signal never reaches a recycled pid.
	Signal(sig syscall.Signal) bool
	// Wait waits for the process to exit, reaps it and describes how it
	// ended: "exit 3", "signal killed". Only one goroutine may call it.
	Wait() string
}

// osEnv is the real thing.
var osEnv = env{startProcess: startOSProcess, now: time.Now, rss: readRSS}

// osProcess is a process started by startOSProcess.
type osProcess struct{ cmd *exec.Cmd }

func (p osProcess) Pid() int { return p.cmd.Process.Pid }

// Signal goes through os.Process, which knows when the process has been
// reaped.
func (p osProcess) Signal(sig syscall.Signal) bool { return p.cmd.Process.Signal(sig) == nil }

func (p osProcess) Wait() string {
	p.cmd.Wait()
	return exitStatus(p.cmd.ProcessState)
}

// startOSProcess starts cmd on the one OS thread that starts every child.
func startOSProcess(cmd *exec.Cmd) (process, error) {
	done := make(chan error, 1)
	startThread() <- startReq{cmd: cmd, done: done}
	if err := <-done; err != nil {
		return nil, err
	}
	return osProcess{cmd}, nil
}

// startThread runs cmd.Start for every child on one OS thread that never
// exits: Linux delivers Pdeathsig when the thread that forked the child
// exits, not the process, so a goroutine that could move threads or end
// would kill or orphan workers at random.
var startThread = sync.OnceValue(func() chan<- startReq {
	reqs := make(chan startReq)
	go func() {
		runtime.LockOSThread() // never unlocked, and this goroutine never returns
		for r := range reqs {
			r.done <- r.cmd.Start()
		}
	}()
	return reqs
})

type startReq struct {
	cmd  *exec.Cmd
	done chan error
}

// exitStatus describes how a reaped process ended.
func exitStatus(st *os.ProcessState) string {
	if st == nil {
		return "unknown"
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return "signal " + ws.Signal().String()
	}
	return "exit " + strconv.Itoa(st.ExitCode())
}
