package supervisor

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
)

// Run itself, with fake workers that are ready as they start and exit on
// SIGTERM, and the real clock: the control socket and the metrics server
// reach the loop.

// runAuto starts Run on fake processes. Cleanup stops it with SIGQUIT if
// the test did not, and waits for it.
func runAuto(t *testing.T, cfg Config) *running {
	t.Helper()
	h := &harness{t: t, log: &syncBuffer{}, auto: true}
	cfg.Addr = "127.0.0.1:0"
	cfg.Logger = zerolog.New(h.log)
	r := &running{h: h, sigs: make(chan os.Signal, 4), done: make(chan struct{})}
	cfg.Signals = r.sigs
	s, err := newSupervisor(cfg, env{startProcess: h.start, now: time.Now, rss: h.rssOf})
	if err != nil {
		t.Fatal(err)
	}
	h.s = s
	go func() {
		r.err = s.Run()
		close(r.done)
	}()
	t.Cleanup(func() {
		select {
		case r.sigs <- syscall.SIGQUIT:
		default:
		}
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Errorf("Run did not return")
		}
	})
	return r
}

type running struct {
	h    *harness
	sigs chan os.Signal
	done chan struct{}
	err  error
}

// wait returns Run's result.
func (r *running) wait() error {
	r.h.t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(5 * time.Second):
		r.h.t.Fatal("Run did not return")
		return nil
	}
}

// ask sends req on the control socket at path.
func ask(t *testing.T, path string, req Request) Response {
	t.Helper()
	var c net.Conn
	waitFor(t, 5*time.Second, func() error {
		var err error
		c, err = net.Dial("unix", path)
		return err
	})
	defer c.Close()
	b, _ := json.Marshal(req)
	c.Write(append(b, '\n'))
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		t.Fatalf("control %s: %v", req.Cmd, err)
	}
	var r Response
	if err := json.Unmarshal(line, &r); err != nil {
		t.Fatalf("control %s: %q: %v", req.Cmd, line, err)
	}
	return r
}

func waitFor(t *testing.T, d time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s: %v", d, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRunServesTheControlSocketAndStops(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "server.sock")
	r := runAuto(t, Config{Workers: 2, ControlSocket: sock, Version: "v9"})
	var st *Status
	waitFor(t, 5*time.Second, func() error {
		st = ask(t, sock, Request{Cmd: "status"}).Status
		if st == nil || st.State != "running" || len(st.Workers) != 2 {
			return fmt.Errorf("status = %+v, want running with 2 workers", st)
		}
		return nil
	})
	if st.Version != "v9" || st.PID != os.Getpid() || st.SocketMode != "reuseport" {
		t.Errorf("status = %+v, want version v9, this pid, reuseport", st)
	}
	for _, tt := range []struct {
		req  Request
		want string // error, "" for OK
	}{
		{Request{Cmd: "scale", Workers: 3}, ""},
		{Request{Cmd: "scale", Workers: 0}, "scale to 0 workers: want 1 to 512"},
		{Request{Cmd: "reload"}, ""},
		{Request{Cmd: "scale", Workers: 1}, ""},
		{Request{Cmd: "dance"}, `unknown command "dance"`},
	} {
		r := ask(t, sock, tt.req)
		if tt.want == "" && !r.OK || tt.want != "" && !strings.Contains(r.Error, tt.want) {
			t.Errorf("control %+v = %+v, want error %q", tt.req, r, tt.want)
		}
	}
	waitFor(t, 5*time.Second, func() error {
		st = ask(t, sock, Request{Cmd: "status"}).Status
		if len(st.Workers) != 1 || st.State != "running" {
			return fmt.Errorf("status = %+v, want 1 worker running", st)
		}
		return nil
	})
	if r := ask(t, sock, Request{Cmd: "stop"}); !r.OK {
		t.Fatalf("stop = %+v", r)
	}
	if err := r.wait(); err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("control socket left behind: %v", err)
	}
}

func TestRunServesMetricsAndStatus(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	r := runAuto(t, Config{Workers: 2, MetricsAddr: addr, MetricsToken: "s3cret",
		Panel: func(context.Context) (Panel, error) {
			return Panel{Title: "Recent", Columns: []string{"id"}, Rows: [][]string{{"act-1"}}}, nil
		}})
	get := func(path, token string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	waitFor(t, 5*time.Second, func() error {
		if code, body := get("/status.json", "s3cret"); code != 200 || !strings.Contains(body, `"state":"running"`) || !strings.Contains(body, "act-1") {
			return fmt.Errorf("/status.json = %d %s, want 200 running", code, body)
		}
		return nil
	})
	if code, _ := get("/metrics", ""); code != http.StatusUnauthorized {
		t.Errorf("/metrics without token = %d, want 401", code)
	}
	code, body := get("/metrics", "s3cret")
	if code != 200 || !strings.Contains(body, `corral_workers{state="ready"} 2`) || !strings.Contains(body, `worker="master"`) {
		t.Errorf("/metrics = %d %s", code, body)
	}
	if code, body := get("/", "s3cret"); code != 200 || !strings.Contains(body, "<html") {
		t.Errorf("/ = %d %.100s", code, body)
	}
	r.sigs <- syscall.SIGTERM
	if err := r.wait(); err != nil {
		t.Errorf("Run = %v", err)
	}
}
