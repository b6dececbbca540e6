package supervisor

import (
	"net"
	"testing"
)

func TestProcField(t *testing.T) {
	line := []byte("   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 123456 1 0000")
	for i, want := range map[int]string{0: "0:", 1: "0100007F:1F40", 3: "0A", 9: "123456", 20: ""} {
		if got := string(procField(line, i)); got != want {
			t.Errorf("procField(line, %d) = %q, want %q", i, got, want)
		}
	}
}

// TestForeignListenersReadsLineByLine checks that the master's check for a
// foreign listener costs the same whatever the number of connections on
// the machine: a busy host's /proc/net/tcp runs to megabytes.
func TestForeignListenersReadsLineByLine(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			defer c.Close()
		}
	}()
	// 200 connections: 400 more lines in the table.
	for range 200 {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	port := ln.Addr().(*net.TCPAddr).Port
	allocs := testing.AllocsPerRun(3, func() {
		if n := foreignListeners(port, nil); n != 1 {
			t.Errorf("foreignListeners(%d, none of ours) = %d, want 1", port, n)
		}
	})
	if allocs > 100 {
		t.Errorf("foreignListeners made %.0f allocations, want at most 100 whatever the size of /proc/net/tcp", allocs)
	}
}
