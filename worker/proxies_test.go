package worker

import (
	"net"
	"strings"
	"testing"

	"github.com/valyala/fasthttp"
)

func TestProxiesClient(t *testing.T) {
	trust := func(list string) *Proxies {
		p, bad, ok := ParseProxies(list)
		if !ok {
			t.Fatalf("ParseProxies(%q): bad entry %q", list, bad)
		}
		return &p
	}
	long := strings.Repeat("a", 100)
	tests := []struct {
		proxies *Proxies
		peer    string
		xff     []string // one X-Forwarded-For header per element
		want    string
	}{
		{nil, "127.0.0.1", []string{"203.0.113.7"}, "127.0.0.1"},                                         // proxy headers off
		{trust("127.0.0.1"), "192.0.2.9", []string{"203.0.113.7"}, "192.0.2.9"},                          // peer not trusted
		{trust("127.0.0.1"), "127.0.0.1", nil, "127.0.0.1"},                                              // no header
		{trust("127.0.0.1"), "127.0.0.1", []string{"203.0.113.7"}, "203.0.113.7"},                        // one hop
		{trust("127.0.0.1"), "127.0.0.1", []string{"203.0.113.7, 10.0.0.1"}, "10.0.0.1"},                 // nearest untrusted
		{trust("127.0.0.1,10.0.0.0/8"), "127.0.0.1", []string{"203.0.113.7, 10.0.0.1"}, "203.0.113.7"},   // trusted hop skipped
		{trust("127.0.0.1,10.0.0.0/8"), "127.0.0.1", []string{"203.0.113.7", "10.0.0.1"}, "203.0.113.7"}, // two headers
		{trust("127.0.0.1,10.0.0.0/8"), "127.0.0.1", []string{"10.0.0.2, 10.0.0.1"}, "10.0.0.2"},         // all trusted: leftmost
		{trust("127.0.0.1"), "127.0.0.1", []string{"spoofed, 10.0.0.1"}, "10.0.0.1"},                     // client-written part ignored
		{trust("127.0.0.1"), "127.0.0.1", []string{"unknown"}, "unknown"},                                // not an address: kept as said
		{trust("127.0.0.1"), "127.0.0.1", []string{" , "}, "127.0.0.1"},                                  // empty: the peer
		{trust("127.0.0.1"), "127.0.0.1", []string{long}, long[:maxClientLen]},                           // bounded
		{trust("*"), "192.0.2.9", []string{"203.0.113.7, 10.0.0.1"}, "203.0.113.7"},                      // * trusts all: leftmost
		{trust("::1"), "::1", []string{"2001:db8::7"}, "2001:db8::7"},                                    // IPv6
		{trust("127.0.0.1"), "::ffff:127.0.0.1", []string{"203.0.113.7"}, "203.0.113.7"},
		{trust("127.0.0.1"), "unix", []string{"203.0.113.7, 10.0.0.1"}, "10.0.0.1"}, // a unix peer is trusted
		{trust("127.0.0.1"), "unix", nil, "unix"},
		{nil, "unix", []string{"203.0.113.7"}, "unix"}, // mapped peer
	}
	for _, tt := range tests {
		var req fasthttp.Request
		for _, v := range tt.xff {
			req.Header.Add("X-Forwarded-For", v)
		}
		var peer net.Addr = &net.TCPAddr{IP: net.ParseIP(tt.peer), Port: 40000}
		if tt.peer == "unix" {
			peer = &net.UnixAddr{Name: "@", Net: "unix"}
		}
		var ctx fasthttp.RequestCtx
		ctx.Init(&req, peer, nil)
		if got := tt.proxies.Client(&ctx); got != tt.want {
			t.Errorf("proxies %+v, peer %s, X-Forwarded-For %q: client %q, want %q", tt.proxies, tt.peer, tt.xff, got, tt.want)
		}
	}
}
