// Package supervisor runs N worker processes of one program on listening
// sockets it owns, and keeps N of them serving: it replaces a worker that
// crashes or hangs, rolls every worker on SIGHUP without dropping a
// request, scales on SIGTTIN and SIGTTOU, drains on SIGTERM, and in reload
// mode rebuilds the program on a code change and swaps workers.
//
// Mechanism. New binds the sockets before anything starts: one
// SO_REUSEPORT socket per worker slot (Reuseport), or one socket for all
// (Shared, UDS, or sockets inherited from systemd). Run re-executes the
// program (os.Executable) once per slot with the file descriptors and
// environment markers of package protocol: its slot's socket, in reuseport
// mode its neighbour's as a standby, a control pipe on which the worker
// reports Ready and heartbeats, and a lifeline whose EOF tells the worker
// that the supervisor is gone. Package worker is the other side of that
// contract; the supervisor imports neither it nor the application.
//
// One goroutine owns every piece of state: Run's loop, which selects over
// signals, process events (ready, heartbeat, exit), reload builds, control
// socket and metrics requests, and a timer for the next deadline. Every
// trigger (first start, crash, hang, SIGHUP, max-requests, memory limit,
// reload, scale) goes through one restart engine: start the replacement on
// the same slot, wait until it is ready, then ask the old worker to drain
// (SIGTERM) with a deadline after which it gets SIGKILL. The loop never
// waits for a drain.
//
// Invariants.
//   - A slot's socket is never closed while the slot exists, so a crash,
//     hang-kill, recycle, roll or reload never resets the connections
//     queued on it; sockets close only on scale-down and shutdown.
//   - A slot has at most one worker that is starting (slot.next), and its
//     serving worker is asked to drain only once the new one is ready.
//   - SIGHUP rolls one slot at a time, in slot order.
//   - Every worker process started is waited for: Run returns only after
//     every child was reaped, SIGKILL included when a drain budget ran out.
//   - A worker with no heartbeat for HealthcheckTimeout gets SIGQUIT (Go
//     prints its goroutine stacks), then SIGKILL after DefaultKillGrace;
//     time during which the master itself did not run is not counted.
//   - A worker of the first generation that dies before it is ready stops
//     the whole server with a BootError (workers still starting are
//     killed, ready ones drain); later deaths back off per slot, from
//     100 ms doubling to 10 s, reset after a minute of stability.
//
// Operations. Signals arrive on Config.Signals: the caller wires them with
// signal.Notify, so tests can send them on a channel. A second SIGINT or
// SIGTERM skips the drain; SIGQUIT stops at once. The control socket
// (Config.ControlSocket) answers status, reload, scale and stop; the
// metrics address (Config.MetricsAddr) serves Prometheus text, status.json
// and a status page, extended by Config.Info and Config.Panel. Logging goes
// to Config.Logger with constant messages and one event per state change.
package supervisor
