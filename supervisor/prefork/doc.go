// Package prefork runs any Go HTTP application, net/http or fasthttp, under
// a prefork process model with uvicorn's semantics: a master that owns the
// listening sockets and N worker processes that serve them, replaced when
// they crash or hang, rolled on SIGHUP, scaled on SIGTTIN and SIGTTOU,
// drained on SIGTERM, rebuilt and swapped on a code change with RELOAD=true.
//
// An application's main is one call:
//
//	func main() {
//		os.Exit(prefork.Main(prefork.App{Handler: mux}))
//	}
//
// Main reads the process model's settings from flags and environment
// variables with uvicorn's names (--workers/WORKERS, --reload/RELOAD,
// --port/PORT, --timeout-graceful-shutdown, ...; flag > variable >
// default), decides from the role marker of package protocol whether the
// process is the master or a worker, and runs package supervisor or
// package worker accordingly. App.Options adds the application's own
// settings, read the same way and listed by --help; App.Master and
// App.Worker hook into each role, for what must happen once per server
// (migrations) or once per worker (opening a database).
//
// The application's GET /health is each worker's readiness and liveness
// probe, sent by the worker to itself (worker.IsProbe tells it apart): a
// worker is ready at its first answer below 500 and alive while it
// answers at all. An application without that route answers 404, which
// will do. While the master delays its stop (--drain-delay), the worker
// answers GET /health with 503 itself, so that load balancers move away;
// with --allowed-hosts given, it answers 421 to any other Host name.
//
// Invariants.
//   - The master and every worker parse the same arguments and
//     environment, so they agree on every setting.
//   - A bad setting stops the program before anything starts, with
//     ExitUsage and one line naming the flag or variable that supplied it.
//   - The master serves no HTTP; only workers run the application's code.
package prefork
