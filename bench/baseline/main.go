// Command baseline is the plain-prefork fasthttp server that Corral's
// benchmarks compare against: N processes on one port, each with its own
// SO_REUSEPORT listener, answering GET /health and nothing else.
//
// It has what Corral adds nothing to and nothing Corral adds: no supervisor
// (a dead child is not replaced), no neighbour socket (a stopped child
// strands the connections the kernel hashed to its socket), no heartbeat,
// no access log, no request accounting. The fasthttp settings that matter
// for throughput are Corral's worker defaults: keep-alive on with a 5 s idle
// timeout, a 30 s read timeout, a 1 MiB body limit, no Server header.
//
// Usage:
//
//	baseline -addr 127.0.0.1:8000 -procs 2
//
// The parent re-executes itself once per process with BASELINE_CHILD set
// and waits; SIGTERM or SIGINT to the parent stops every child. Each child
// writes one JSON line {"message":"baseline ready","pid":...,"proc":...} to
// stderr once it listens, which is how the benchmark driver knows it is up.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/valyala/fasthttp"
	"golang.org/x/sys/unix"
)

// envChild marks a child process; its value is the child's 1-based index.
const envChild = "BASELINE_CHILD"

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "host:port to listen on (a fixed port: every process binds it)")
	procs := flag.Int("procs", 1, "number of server processes")
	flag.Parse()
	if *procs < 1 {
		fmt.Fprintln(os.Stderr, "baseline: -procs must be at least 1")
		os.Exit(2)
	}
	if n, err := strconv.Atoi(os.Getenv(envChild)); err == nil && n > 0 {
		if err := child(*addr, n); err != nil {
			fmt.Fprintln(os.Stderr, "baseline:", err)
			os.Exit(1)
		}
		return
	}
	if err := parent(*procs); err != nil {
		fmt.Fprintln(os.Stderr, "baseline:", err)
		os.Exit(1)
	}
}

// parent starts n children and waits for them. It forwards SIGTERM and
// SIGINT to the children and never restarts one: that is the point of the
// baseline.
func parent(n int) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	cmds := make([]*exec.Cmd, 0, n)
	exited := make(chan struct{}, n)
	for i := 1; i <= n; i++ {
		cmd := exec.Command(exe, os.Args[1:]...)
		cmd.Env = append(os.Environ(), envChild+"="+strconv.Itoa(i))
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		// A child must not outlive a parent killed with SIGKILL.
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			for _, c := range cmds {
				c.Process.Kill()
				c.Wait()
			}
			return fmt.Errorf("start child %d: %w", i, err)
		}
		cmds = append(cmds, cmd)
		go func() {
			cmd.Wait()
			exited <- struct{}{}
		}()
	}
	live := n
	for live > 0 {
		select {
		case sig := <-sigs:
			for _, c := range cmds {
				c.Process.Signal(sig)
			}
		case <-exited:
			live--
		}
	}
	return nil
}

// child serves /health on its own SO_REUSEPORT socket until SIGTERM/SIGINT.
func child(addr string, n int) error {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", addr)
	if err != nil {
		return fmt.Errorf("listen %s: %w", addr, err)
	}
	pid, started := os.Getpid(), time.Now()
	srv := &fasthttp.Server{
		Handler:                      func(ctx *fasthttp.RequestCtx) { health(ctx, pid, n, started) },
		Name:                         "baseline",
		NoDefaultServerHeader:        true,
		ReadTimeout:                  30 * time.Second,
		IdleTimeout:                  5 * time.Second,
		MaxRequestBodySize:           1 << 20,
		DisablePreParseMultipartForm: true,
		CloseOnShutdown:              true,
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	fmt.Fprintf(os.Stderr, "{\"message\":\"baseline ready\",\"pid\":%d,\"proc\":%d,\"url\":\"http://%s\"}\n", pid, n, ln.Addr())
	select {
	case err := <-served:
		return err
	case <-sigs:
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return srv.ShutdownWithContext(ctx)
	}
}

// health writes a body of the same shape and size as Corral's /health.
func health(ctx *fasthttp.RequestCtx, pid, n int, started time.Time) {
	if string(ctx.Path()) != "/health" || !ctx.IsGet() {
		ctx.SetStatusCode(fasthttp.StatusNotFound)
		return
	}
	b := make([]byte, 0, 128)
	b = append(b, `{"status":"ok","pid":`...)
	b = strconv.AppendInt(b, int64(pid), 10)
	b = append(b, `,"worker":`...)
	b = strconv.AppendInt(b, int64(n), 10)
	b = append(b, `,"generation":1,"uptime_s":`...)
	b = strconv.AppendFloat(b, time.Since(started).Seconds(), 'f', 3, 64)
	b = append(b, '}')
	ctx.SetContentType("application/json")
	ctx.SetBody(b)
}
