package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestPostgresDownAtStartExits3(t *testing.T) {
	t.Parallel()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := strconv.Itoa(free.Addr().(*net.TCPAddr).Port)
	free.Close() // nothing listens there now
	s := launch(t, "DATABASE_URL=postgres://corral:hunter2@127.0.0.1:"+port+"/corral?sslmode=disable&connect_timeout=2")
	if code, want := s.wait(30*time.Second), documentedExit(t, "the store cannot be opened"); code != want {
		t.Errorf("exit %d with PostgreSQL down, want %d", code, want)
	}
	out := s.logs.String()
	if !strings.Contains(out, "127.0.0.1:"+port) {
		t.Errorf("the error does not name the host:\n%s", out)
	}
	if strings.Contains(out, "hunter2") {
		t.Errorf("the password leaked into the output:\n%s", out)
	}
}

// tcpProxy forwards connections to target until it is stopped, and can be
// started again on the same port: PostgreSQL going away and coming back,
// as the server sees it.
type tcpProxy struct {
	t      *testing.T
	addr   string
	target string
	mu     sync.Mutex
	ln     net.Listener
	conns  []net.Conn
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	p := &tcpProxy{t: t, target: target, addr: "127.0.0.1:0"}
	p.start()
	t.Cleanup(p.stop)
	return p
}

func (p *tcpProxy) start() {
	p.t.Helper()
	ln, err := net.Listen("tcp", p.addr)
	if err != nil {
		p.t.Fatalf("proxy listen %s: %v", p.addr, err)
	}
	p.mu.Lock()
	p.ln, p.addr = ln, ln.Addr().String()
	p.mu.Unlock()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", p.target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, up)
			p.mu.Unlock()
			go func() { io.Copy(up, c); up.Close() }()
			go func() { io.Copy(c, up); c.Close() }()
		}
	}()
}

// stop closes the listener and every forwarded connection.
func (p *tcpProxy) stop() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ln != nil {
		p.ln.Close()
		p.ln = nil
	}
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}

func TestPostgresDownWhileRunning(t *testing.T) {
	t.Parallel()
	dbURL := testPostgresDB(t)
	u, _ := url.Parse(dbURL)
	proxy := newTCPProxy(t, u.Host)
	u.Host = proxy.addr
	q := u.Query()
	q.Set("connect_timeout", "2")
	u.RawQuery = q.Encode()
	s := startServer(t, "DATABASE_URL="+u.String(), "WORKERS=1", "SIMULATED_LATENCY=0")

	var acknowledged []string
	chat := func() (int, error) {
		var a chatAnswer
		code, err := s.postJSON("/api/chat", map[string]any{"agent_id": "default", "message": "through the proxy"}, &a)
		if err == nil {
			acknowledged = append(acknowledged, a.ID)
		}
		return code, err
	}
	storeState := func() string {
		resp, err := fresh.Get(s.url("/health"))
		if err != nil {
			return "unreachable"
		}
		defer resp.Body.Close()
		var h struct{ Store string }
		json.NewDecoder(resp.Body).Decode(&h)
		return h.Store
	}
	if _, err := chat(); err != nil {
		t.Fatal(err)
	}

	proxy.stop()
	waitFor(t, 20*time.Second, func() error {
		code, err := chat()
		if code != 503 {
			return fmt.Errorf("chat with PostgreSQL gone = %d %v, want 503", code, err)
		}
		if st := storeState(); st != "down" {
			return fmt.Errorf(`/health "store" = %q with PostgreSQL gone, want "down"`, st)
		}
		return nil
	})

	proxy.start()
	waitFor(t, 30*time.Second, func() error {
		if code, err := chat(); err != nil {
			return fmt.Errorf("chat after PostgreSQL came back = %d %v", code, err)
		}
		if st := storeState(); st != "ok" {
			return fmt.Errorf(`/health "store" = %q after PostgreSQL came back, want "ok"`, st)
		}
		return nil
	})

	// Every chat that was answered 200 is in the feed, start and end.
	done := map[string]int{}
	for _, a := range s.allActivities(t) {
		if a.Type == "chat.started" || a.Type == "chat.completed" {
			done[a.ChatID]++
		}
	}
	for _, id := range acknowledged {
		if done[id] != 2 {
			t.Errorf("acknowledged chat %s has %d of its 2 activities", id, done[id])
		}
	}
}
