package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"

	"github.com/corralhq/corral/handlers/store"
	"github.com/corralhq/corral/supervisor"
)

// subcommands talk to a running server through its control socket.
var subcommands = map[string]string{
	"status": "show the master and every worker",
	"reload": "rolling restart of every worker (as SIGHUP)",
	"scale":  "scale N: run N workers",
	"stop":   "drain and stop (--force: kill the workers now)",
}

// controlPath is where the control socket is: the flag or CONTROL_SOCKET,
// else systemd's $RUNTIME_DIRECTORY, else next to the SQLite database, else
// ./data. The master and the CLI both use it, so they agree.
func controlPath(flag, databaseURL string) string {
	if flag != "" {
		return flag
	}
	if d := os.Getenv("RUNTIME_DIRECTORY"); d != "" {
		return filepath.Join(strings.Split(d, ":")[0], "server.sock")
	}
	if p, ok := store.FilePath(databaseURL); ok {
		return filepath.Join(filepath.Dir(p), "server.sock")
	}
	return filepath.Join("data", "server.sock")
}

// runCLI runs a subcommand; it returns the exit status.
func runCLI(name string, args []string, stdout, stderr io.Writer) int {
	fs := pflag.NewFlagSet("server "+name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	sock := fs.String("control-socket", "", "")
	jsonOut := fs.Bool("json", false, "")
	force := fs.Bool("force", false, "")
	if err := fs.Parse(args); err != nil {
		fmt.Fprintf(stderr, "server %s: %v\n", name, err)
		return exitUsage
	}
	req := supervisor.Request{Cmd: name}
	rest := fs.Args()
	switch {
	case name == "scale" && len(rest) == 1:
		n, err := strconv.Atoi(rest[0])
		if err != nil || n < 1 || n > supervisor.MaxWorkers {
			fmt.Fprintf(stderr, "server scale: invalid worker count %q: want a whole number from 1 to %d\n", rest[0], supervisor.MaxWorkers)
			return exitUsage
		}
		req.Workers = n
	case name == "scale":
		fmt.Fprintln(stderr, "server scale: want one argument, the worker count: server scale 8")
		return exitUsage
	case len(rest) > 0:
		fmt.Fprintf(stderr, "server %s: unexpected argument %q\n", name, rest[0])
		return exitUsage
	case *jsonOut && name != "status", *force && name != "stop":
		fmt.Fprintf(stderr, "server %s: --json goes with status, --force with stop\n", name)
		return exitUsage
	}
	req.Force = *force
	flag := *sock
	if flag == "" {
		flag = strings.TrimSpace(os.Getenv("CONTROL_SOCKET"))
	}
	dbURL := os.Getenv("DATABASE_URL")
	if strings.TrimSpace(dbURL) == "" {
		dbURL = defaultDatabaseURL
	}
	path := controlPath(flag, dbURL)
	resp, err := callControl(path, req)
	if err != nil {
		fmt.Fprintln(stderr, "server "+name+":", err)
		return exitError
	}
	if !resp.OK {
		fmt.Fprintf(stderr, "server %s: %s\n", name, resp.Error)
		return exitError
	}
	switch {
	case name == "status" && *jsonOut:
		b, _ := json.MarshalIndent(resp.Status, "", "  ")
		fmt.Fprintln(stdout, string(b))
	case name == "status":
		printStatus(stdout, resp.Status)
	default:
		fmt.Fprintf(stdout, "server %s: done\n", name)
	}
	return exitOK
}

// callControl sends req on the control socket at path. Every way of not
// reaching a server is a clear error, and nothing waits for ever.
func callControl(path string, req supervisor.Request) (supervisor.Response, error) {
	var resp supervisor.Response
	c, err := net.DialTimeout("unix", path, 2*time.Second)
	switch {
	case errors.Is(err, os.ErrNotExist), errors.Is(err, syscall.ENOENT):
		return resp, fmt.Errorf("no server running: no control socket at %s (start one, or name it with --control-socket)", path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return resp, fmt.Errorf("no server running: control socket %s is left over from a server that is gone", path)
	case errors.Is(err, os.ErrPermission), errors.Is(err, syscall.EACCES):
		return resp, fmt.Errorf("control socket %s: permission denied: the server runs as another user (run as that user or root)", path)
	case err != nil:
		return resp, fmt.Errorf("control socket %s: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return resp, fmt.Errorf("control socket %s: %w", path, err)
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return resp, fmt.Errorf("control socket %s: no answer: %w", path, err)
	}
	if err := json.Unmarshal(line, &resp); err != nil {
		return resp, fmt.Errorf("control socket %s: bad answer: %w", path, err)
	}
	return resp, nil
}

// printStatus writes the status as a header and a table.
func printStatus(w io.Writer, st *supervisor.Status) {
	fmt.Fprintf(w, "server %s  master %d  up %s  http://%s  %s  %s\n",
		st.Version, st.PID, age(st.UptimeS), st.Addr, st.SocketMode, st.State)
	fmt.Fprintf(w, "store %s  llm %s\n\n", st.Store, st.LLM)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tGEN\tSTATE\tUPTIME\tREQUESTS\tIN FLIGHT\tRSS\tCPU\tFDS\tRESTARTS\tHEARTBEAT")
	for _, wk := range st.Workers {
		restarts := strconv.Itoa(wk.Restarts)
		if wk.LastReason != "" {
			restarts += " (" + wk.LastReason + ")"
		}
		beat := "-"
		if wk.HeartbeatS >= 0 {
			beat = fmt.Sprintf("%.1fs ago", wk.HeartbeatS)
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%d\t%d\t%.1fMiB\t%.1fs\t%d\t%s\t%s\n",
			wk.Slot, wk.PID, wk.Generation, wk.State, age(wk.UptimeS), wk.Requests, wk.InFlight,
			float64(wk.RSS)/(1<<20), wk.CPUS, wk.FDs, restarts, beat)
	}
	tw.Flush()
}

// age formats seconds as a short duration: 4s, 12m3s, 5h2m.
func age(s float64) string {
	d := time.Duration(s * float64(time.Second))
	switch {
	case d < time.Minute:
		return d.Round(time.Second).String()
	case d < time.Hour:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Minute).String()
}
