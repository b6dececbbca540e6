// Command idleconns opens N keep-alive connections to a server, sends one
// GET /health with a 1.2 KB Authorization header on each, keeps them idle,
// and reports how much the worker's resident memory grew per connection:
//
//	idleconns 127.0.0.1:8000 WORKER_PID 3000
//
// Run the server with WORKERS=1 and TIMEOUT_KEEP_ALIVE=120 so that the
// connections stay open (bench/idle.sh does).
package main

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

func rss(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "VmRSS:") {
			n, _ := strconv.Atoi(strings.Fields(l)[1])
			return n
		}
	}
	return 0
}

func main() {
	addr := os.Args[1]
	pid, _ := strconv.Atoi(os.Args[2])
	n, _ := strconv.Atoi(os.Args[3])
	before := rss(pid)
	var conns []net.Conn
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			panic(err)
		}
		fmt.Fprintf(c, "GET /health HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n", strings.Repeat("j", 1200))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			panic(err)
		}
		resp.Body.Close()
		conns = append(conns, c)
	}
	time.Sleep(2 * time.Second)
	after := rss(pid)
	fmt.Printf("conns=%d rss_before_kib=%d rss_after_kib=%d per_conn_bytes=%d\n", n, before, after, (after-before)*1024/n)
	// Closed only now: until here the connections must stay open.
	for _, c := range conns {
		c.Close()
	}
}
