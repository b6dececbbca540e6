package prefork

import "testing"

func TestHostsAllow(t *testing.T) {
	list, bad, ok := parseHosts(" API.example.com. ,.corp.example")
	if !ok {
		t.Fatalf("parseHosts: bad entry %q", bad)
	}
	tests := []struct {
		h    Hosts
		host string
		want bool
	}{
		{Hosts{}, "", true},
		{Hosts{}, "127.0.0.1", true},
		{Hosts{}, "127.0.0.1:8000", true},
		{Hosts{}, "10.2.3.4:8000", true},
		{Hosts{}, "[::1]:8000", true},
		{Hosts{}, "[2001:db8::1]", true},
		{Hosts{}, "localhost", true},
		{Hosts{}, "LocalHost.:8000", true},
		{Hosts{}, "app.localhost", true},
		{Hosts{}, "rebind.attacker.example", false},
		{Hosts{}, "localhost.attacker.example", false},
		{Hosts{}, "127.0.0.1.attacker.example", false},
		{list, "api.example.com", true},
		{list, "API.EXAMPLE.COM:443", true},
		{list, "api.example.com.", true},
		{list, "www.example.com", false},
		{list, "corp.example", true},
		{list, "a.b.corp.example:8000", true},
		{list, "notcorp.example", false},
		{Hosts{Any: true}, "anything.example", true},
	}
	for _, tt := range tests {
		if got := tt.h.Allow(tt.host); got != tt.want {
			t.Errorf("%+v.Allow(%q) = %v, want %v", tt.h, tt.host, got, tt.want)
		}
	}
	for _, in := range []string{"", "a,,b", "http://x", "a:80", "[::1]", "a b", "."} {
		if _, _, ok := parseHosts(in); ok {
			t.Errorf("parseHosts(%q) accepted, want an error", in)
		}
	}
}
