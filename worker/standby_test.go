package worker

import (
	"errors"
	"net"
	"testing"
	"time"
)

func TestStandbyTakesWhatIsLeftWaiting(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sb := newStandbyListener(ln)
	defer sb.Close()
	// Nobody else accepts on this socket: the connection waits in its
	// queue, and the standby must take it.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make(chan error, 1)
	go func() {
		conn, err := sb.Accept()
		if err == nil {
			conn.Close()
		}
		got <- err
	}()
	select {
	case err := <-got:
		if err != nil {
			t.Fatalf("Accept() = %v, want the waiting connection", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("standby did not take a connection left waiting for 5s")
	}
}

func TestStandbyCloseUnblocksAccept(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sb := newStandbyListener(ln)
	got := make(chan error, 1)
	go func() {
		_, err := sb.Accept()
		got <- err
	}()
	sb.Close()
	select {
	case err := <-got:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept() after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept still blocked 5s after Close")
	}
}
