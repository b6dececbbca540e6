package main

import (
	"bufio"
	"bytes"
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
	"github.com/corralhq/corral/supervisor/prefork"
)

// command is a subcommand that talks to a running server through its
// control socket.
type command struct {
	name string
	args string // what follows the name in usage, flags other than --control-socket included
	help string
}

// commands are the subcommands in the order usage lists them.
var commands = []command{
	{"status", "[--json]", "show the master and every worker (--json: as JSON)"},
	{"reload", "", "rolling restart of every worker (as SIGHUP)"},
	{"scale", "N", "run N workers, 1 to 512"},
	{"stop", "[--force]", "drain and stop, and wait until the master has exited (--force: kill the workers now)"},
	{"upgrade", "", "run the installed binary as a new master on the same sockets, then drain the old one (as SIGUSR2); waits until the new master serves"},
}

// subcommands maps each command's name to its help.
var subcommands = func() map[string]string {
	m := map[string]string{}
	for _, c := range commands {
		m[c.name] = c.help
	}
	return m
}()

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

// runCLI runs a subcommand; it returns the exit status. Like the server it
// exits 2 on a bad command line or setting, naming the flag or variable.
func runCLI(name string, args []string, stdout, stderr io.Writer) int {
	fail := func(code int, err error) int {
		fmt.Fprintf(stderr, "server %s: %v\n", name, err)
		return code
	}
	fs := pflag.NewFlagSet("server "+name, pflag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	var sock, jsonFlag, forceFlag prefork.Flag
	prefork.AddFlag(fs, &sock, "control-socket", false)
	prefork.AddFlag(fs, &jsonFlag, "json", true)
	prefork.AddFlag(fs, &forceFlag, "force", true)
	err := fs.Parse(args)
	rest := fs.Args()
	var ne *pflag.NotExistError
	switch {
	case errors.Is(err, pflag.ErrHelp):
		commandUsage(stdout, name)
		return exitOK
	case errors.As(err, &ne) && strings.IndexAny(ne.GetSpecifiedShortnames(), "0123456789") == 0:
		// No flag has a digit for a shorthand: pflag took a negative
		// number, "-1", for flags. It is an argument, and a bad one.
		rest = []string{"-" + ne.GetSpecifiedShortnames()}
	case err != nil:
		return fail(exitUsage, prefork.OneLine(err))
	}
	jsonOut, err := jsonFlag.On()
	if err != nil {
		return fail(exitUsage, err)
	}
	force, err := forceFlag.On()
	if err != nil {
		return fail(exitUsage, err)
	}

	req := supervisor.Request{Cmd: name, Force: force}
	switch {
	case name == "scale" && len(rest) == 1:
		count := prefork.Setting{Raw: rest[0], From: "worker count"}
		if req.Workers, err = count.Whole(1, supervisor.MaxWorkers, fmt.Sprintf("a whole number from 1 to %d", supervisor.MaxWorkers)); err != nil {
			return fail(exitUsage, err)
		}
	case name == "scale":
		return fail(exitUsage, errors.New("want one argument, the worker count: server scale 8"))
	case len(rest) > 0:
		return fail(exitUsage, fmt.Errorf("unexpected argument %q", rest[0]))
	case jsonOut && name != "status", force && name != "stop":
		return fail(exitUsage, errors.New("--json goes with status, --force with stop"))
	}
	path, err := cliControlPath(sock, os.LookupEnv)
	if err != nil {
		return fail(exitUsage, err)
	}
	master := 0
	if name == "stop" {
		// The master's pid, to wait for its exit: the stop answers at once.
		st, err := callControl(path, supervisor.Request{Cmd: "status"})
		if err != nil {
			return fail(exitError, err)
		}
		if st.Status != nil {
			master = st.Status.PID
		}
	}
	resp, err := callControlWith(path, req, func(r supervisor.Response) {
		fmt.Fprintf(stdout, "server upgrade: new master pid %d started; waiting up to %s for its workers\n",
			r.Upgrade.NewPID, time.Duration(r.Upgrade.TimeoutS*float64(time.Second)))
	})
	if err != nil {
		return fail(exitError, err)
	}
	if !resp.OK {
		return fail(exitError, errors.New(resp.Error))
	}
	switch {
	case name == "status" && jsonOut:
		b, _ := json.MarshalIndent(resp.Status, "", "  ")
		fmt.Fprintln(stdout, string(b))
	case name == "status":
		printStatus(stdout, resp.Status)
	case name == "stop":
		fmt.Fprintf(stdout, "server stop: master pid %d is stopping; waiting for it to exit\n", master)
		start := time.Now()
		for running(master) {
			time.Sleep(50 * time.Millisecond)
		}
		fmt.Fprintf(stdout, "server stop: done: master pid %d exited after %s\n", master, time.Since(start).Round(time.Millisecond))
	case name == "upgrade" && resp.Upgrade != nil:
		fmt.Fprintf(stdout, "server upgrade: done: new master pid %d, version %s; the old one drains and exits\n", resp.Upgrade.NewPID, resp.Upgrade.NewVersion)
	case name == "reload":
		// The roll takes a while, and a worker that cannot start is retried
		// while the old one serves on: the status tells how it goes.
		fmt.Fprintln(stdout, "server reload: rolling restart started; server status shows its progress")
	default:
		fmt.Fprintf(stdout, "server %s: done\n", name)
	}
	return exitOK
}

// running reports whether process pid is alive: it exists and is not a
// zombie waiting for its parent.
func running(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i < 0 || i+2 >= len(b) || b[i+2] != 'Z'
}

// cliControlPath returns the control socket a subcommand talks to, found
// as controlPath finds the server's, from --control-socket, CONTROL_SOCKET
// and DATABASE_URL checked as the server checks them: a value the server
// would refuse cannot name the socket of a running server.
func cliControlPath(flag prefork.Flag, lookupEnv func(string) (string, bool)) (string, error) {
	c := defaultConfig()
	opts := newApp(&c).AllOptions(&c.Config)
	s, ok := flag.Setting, flag.Given
	if !ok {
		s, ok = optionNamed(opts, "control-socket").Lookup(lookupEnv)
	}
	if ok {
		if err := optionNamed(opts, "control-socket").Set(s); err != nil {
			return "", err
		}
		return c.ControlSocket, nil
	}
	// DATABASE_URL places the socket only when controlPath gets that far.
	if d, _ := lookupEnv("RUNTIME_DIRECTORY"); d == "" {
		o := optionNamed(opts, "database-url")
		if s, ok := o.Lookup(lookupEnv); ok {
			if err := o.Set(s); err != nil {
				return "", fmt.Errorf("%w (it places the control socket; or name the socket with --control-socket)", err)
			}
		}
	}
	return controlPath("", c.DatabaseURL), nil
}

// optionNamed returns the option whose name is name; it panics on a name
// no option has, which is a bug.
func optionNamed(opts []prefork.Option, name string) prefork.Option {
	for _, o := range opts {
		if o.Name() == name {
			return o
		}
	}
	panic("no option " + name)
}

// commandUsage writes the --help text of the subcommand name.
func commandUsage(w io.Writer, name string) {
	for _, c := range commands {
		if c.name != name {
			continue
		}
		fmt.Fprintf(w, "Usage: server %s [--control-socket PATH]\n  %s\n\nFlags:\n", strings.TrimSpace(c.name+" "+c.args), c.help)
	}
	fmt.Fprintln(w, "  --control-socket PATH  the running server's control socket; default CONTROL_SOCKET,")
	fmt.Fprintln(w, "                         else $RUNTIME_DIRECTORY/server.sock, else server.sock next")
	fmt.Fprintln(w, "                         to the SQLite file of DATABASE_URL (data/server.sock)")
	switch name {
	case "status":
		fmt.Fprintln(w, "  --json                 print the status as JSON")
	case "stop":
		fmt.Fprintln(w, "  --force                kill the workers now instead of draining them")
	}
	fmt.Fprintln(w, "  -h, --help             print this help and exit")
}

// callControl sends req on the control socket at path and returns the
// final answer. Every way of not reaching a server is a clear error, and
// nothing waits for ever.
func callControl(path string, req supervisor.Request) (supervisor.Response, error) {
	return callControlWith(path, req, nil)
}

// callControlWith is callControl that also gives interim, if not nil, the
// first answer to an upgrade, before it waits for the final one.
func callControlWith(path string, req supervisor.Request, interim func(supervisor.Response)) (supervisor.Response, error) {
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
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return resp, fmt.Errorf("control socket %s: no answer: %w", path, err)
		}
		resp = supervisor.Response{}
		if err := json.Unmarshal(line, &resp); err != nil {
			return resp, fmt.Errorf("control socket %s: bad answer: %w", path, err)
		}
		if !resp.Interim() {
			return resp, nil
		}
		if interim != nil {
			interim(resp)
		}
		// An upgrade started: the final answer comes within the server's
		// time limit, which it just told.
		limit := time.Duration(resp.Upgrade.TimeoutS * float64(time.Second))
		c.SetDeadline(time.Now().Add(limit + 10*time.Second))
	}
}

// printStatus writes the status as a header and a table.
func printStatus(w io.Writer, st *supervisor.Status) {
	where := st.Addr
	if !strings.HasPrefix(where, "unix:") {
		where = "http://" + where
	}
	fmt.Fprintf(w, "server %s  master %d  up %s  %s  %s  %s\n",
		st.Version, st.PID, age(st.UptimeS), where, st.SocketMode, st.State)
	for i, f := range st.Info {
		if i > 0 {
			fmt.Fprint(w, "  ")
		}
		fmt.Fprintf(w, "%s %s", f.Name, f.Value)
	}
	fmt.Fprint(w, "\n")
	switch u := st.Upgrade; {
	case u == nil:
	case u.State == "failed":
		fmt.Fprintf(w, "last upgrade failed: %s\n", u.Error)
	case u.OldPID != 0:
		fmt.Fprintf(w, "upgrade from master %d (%s): %s\n", u.OldPID, u.OldVersion, u.State)
	default:
		fmt.Fprintf(w, "upgrade %s: new master %d\n", u.State, u.NewPID)
	}
	fmt.Fprint(w, "\n")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SLOT\tPID\tGEN\tVERSION\tSTATE\tUPTIME\tREQUESTS\tIN FLIGHT\tRSS\tCPU\tFDS\tRESTARTS\tHEARTBEAT")
	for _, wk := range st.Workers {
		restarts := strconv.Itoa(wk.Restarts)
		if wk.LastReason != "" {
			restarts += " (" + wk.LastReason + ")"
		}
		state := wk.State
		if wk.Accept != "" {
			state += ", accept " + wk.Accept
		}
		beat := "-"
		if wk.HeartbeatS >= 0 {
			beat = fmt.Sprintf("%.1fs ago", wk.HeartbeatS)
		}
		fmt.Fprintf(tw, "%d\t%d\t%d\t%s\t%s\t%s\t%d\t%d\t%.1fMiB\t%.1fs\t%d\t%s\t%s\n",
			wk.Slot, wk.PID, wk.Generation, wk.Version, state, age(wk.UptimeS), wk.Requests, wk.InFlight,
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
