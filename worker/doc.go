// Package worker serves an HTTP handler as one worker process of the
// supervisor: on the listening sockets it inherits, with readiness,
// heartbeats, recycling and a bounded drain. Run serves a
// fasthttp.RequestHandler and RunHTTP a net/http http.Handler, with the same
// process model: the net/http handler runs behind fasthttp's adaptor, so
// both get the same listeners, probes, limits, access log and drain.
//
// Mechanism. The supervisor starts the worker with the file descriptors and
// environment markers described in package protocol. Run serves the handler
// with fasthttp on every inherited listener (its own slot's socket and, in
// reuseport mode, a neighbour's, so a dead or stopped worker never strands
// the connections queued on its socket) and on an in-memory listener that
// only the worker itself dials. Through that in-memory listener the worker
// sends GET /health to its own handler: the first answer below 500 makes
// it ready (an application without a /health route answers 404, which
// proves the serving path as well), and every later answer is a heartbeat. A worker whose serving path is
// stuck therefore stops heartbeating, and the supervisor replaces it.
//
// Invariants.
//   - The worker never binds or closes a listening socket: closing its own
//     descriptors leaves the socket, and the connections queued on it, to the
//     supervisor and to the next incarnation of the slot.
//   - A request that was accepted is answered or runs out the drain budget:
//     Run returns only after fasthttp's Shutdown has returned or the budget
//     has expired.
//   - Every handler panic is recovered, logged with its stack, counted and
//     answered with 500 when nothing was written yet.
//   - A request counts against Config.MaxConcurrency, and in the
//     heartbeat's in-flight count, until its response's last byte is
//     written: a streamed body keeps it counted after the handler returned.
//   - A request whose headers use obsolete line folding never reaches the
//     handler: it is answered 400 and its connection closed.
//   - An accept that fails for want of descriptors or kernel memory is
//     retried, never fatal; the heartbeat says "accept":"failing" until one
//     succeeds.
//
// Operations. SIGTERM and SIGINT drain within Config.GracefulTimeout; when
// the supervisor is gone (EOF on the lifeline, or SIGTERM from Pdeathsig
// after the parent died) the worker drains within Config.OrphanTimeout
// instead, so no worker outlives its supervisor by more than that.
package worker
