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

func TestProcNumber(t *testing.T) {
	for _, c := range []struct {
		in   string
		base uint64
		want uint64
		ok   bool
	}{
		{"1F40", 16, 8000, true},
		{"1f40", 16, 8000, true},
		{"123456", 10, 123456, true},
		{"1F40", 10, 0, false},
		{"", 10, 0, false},
		{"18446744073709551615", 10, 1<<64 - 1, true},
		{"18446744073709551616", 10, 0, false},
		{"-1", 10, 0, false},
	} {
		got, ok := procNumber([]byte(c.in), c.base)
		if got != c.want || ok != c.ok {
			t.Errorf("procNumber(%q, %d) = %d, %v, want %d, %v", c.in, c.base, got, ok, c.want, c.ok)
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
	// And 100 listeners on other ports, IPv6 ones where the host has
	// IPv6: each listening line is parsed further, and an IPv6 address
	// is too long for a string conversion on the stack.
	for i := range 100 {
		addr := "127.0.0.1:0"
		if i%2 == 1 {
			addr = "[::1]:0"
		}
		other, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		defer other.Close()
	}
	port := ln.Addr().(*net.TCPAddr).Port
	// The fewest of three counts: AllocsPerRun counts the whole
	// process's allocations, and goroutines left by earlier tests only
	// add to it.
	allocs := 1e9
	for range 3 {
		allocs = min(allocs, testing.AllocsPerRun(3, func() {
			if n := foreignListeners(port, nil); n != 1 {
				t.Errorf("foreignListeners(%d, none of ours) = %d, want 1", port, n)
			}
		}))
	}
	// A fixed handful (files, scanner, map); nothing per line.
	if allocs > 30 {
		t.Errorf("foreignListeners made %.0f allocations, want at most 30 whatever the size of /proc/net/tcp", allocs)
	}
}
