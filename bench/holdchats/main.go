// Command holdchats opens N connections to a server and sends one
// POST /api/chat on each, then holds them open without reading, until it
// is killed: long chats in flight for measurements (bench/idlecpu.sh).
//
//	holdchats -addr 127.0.0.1:8000 -n 10000
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8000", "server address")
	n := flag.Int("n", 1000, "chats to hold in flight")
	flag.Parse()
	body := `{"agent_id":"default","message":"hold this chat"}`
	req := "POST /api/chat HTTP/1.1\r\nHost: " + *addr + "\r\nContent-Type: application/json\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body
	conns := make([]net.Conn, 0, *n)
	for range *n {
		c, err := net.Dial("tcp", *addr)
		if err != nil {
			fmt.Fprintln(os.Stderr, "holdchats:", err)
			break
		}
		if _, err := c.Write([]byte(req)); err != nil {
			fmt.Fprintln(os.Stderr, "holdchats:", err)
			c.Close()
			break
		}
		conns = append(conns, c)
	}
	fmt.Printf("holding %d chats\n", len(conns))
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	for _, c := range conns {
		c.Close()
	}
}
