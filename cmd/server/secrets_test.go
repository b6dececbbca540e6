package main

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestMalformedRequestLogsNoToken sends requests fasthttp cannot read, each
// carrying a bearer token and a ?token= query parameter, to a server
// logging at debug level with the access log on, and checks that neither
// secret reaches any log line: fasthttp quotes a malformed request's raw
// bytes in its errors unless told not to.
func TestMalformedRequestLogsNoToken(t *testing.T) {
	s := startServer(t, "LOG_LEVEL=debug", "ACCESS_LOG=true", "LIMIT_REQUEST_HEADERS=4KiB")
	addr := "127.0.0.1:" + strconv.Itoa(s.port)
	const bearer, query = "bearer-SECRET-7f3a9c", "query-SECRET-41d2e8"
	head := "GET /api/agents?token=" + query + " HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + bearer + "\r\n"
	malformed := map[string]string{
		"a header line without a colon": head + "this line has no colon\r\n\r\n",
		"a bad Content-Length":          head + "Content-Length: 12x\r\n\r\n",
		"headers over the limit":        head + "X-Pad: " + strings.Repeat("a", 5000) + "\r\n\r\n",
		"a bad request line":            "GET /api/agents?token=" + query + " HTTP/1.1 extra\r\nAuthorization: Bearer " + bearer + "\r\n\r\n",
		"a body shorter than announced": strings.Replace(head, "GET", "POST", 1) + "Content-Length: 10\r\nTransfer-Encoding: bogus\r\n\r\nabc",
	}
	for name, req := range malformed {
		o := rawExchange(addr, []byte(req), 5*time.Second)
		if o.err != nil || o.status != 0 && o.status < 400 {
			t.Errorf("%s: got %v (%v), want a 4xx or a close", name, o, o.err)
		}
	}
	// A request after them all is logged once the malformed ones were.
	if _, err := s.health(fresh); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, func() error {
		if len(s.logs.find("fasthttp", nil)) == 0 && !strings.Contains(s.logs.String(), `"status":400`) {
			return fmt.Errorf("no trace of the malformed requests in the log:\n%s", s.logs)
		}
		return nil
	})
	s.stop()
	for _, line := range strings.Split(s.logs.String(), "\n") {
		if strings.Contains(line, "SECRET") {
			t.Errorf("a secret in a log line: %s", line)
		}
	}
}
