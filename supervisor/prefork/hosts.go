package prefork

import (
	"net/netip"
	"strings"
)

// Hosts are the host names a server answers for (--allowed-hosts): a
// request whose Host header names another is answered 421, so that a page
// on a DNS rebinding domain, whose name now resolves to this server, can
// neither read it nor use an API that has no token. Literal IP addresses
// and loopback names (localhost, *.localhost) are always answered: a
// rebinding page can only send a name of its own domain.
type Hosts struct {
	// Given is set when --allowed-hosts or ALLOWED_HOSTS was given.
	Given bool
	// Any answers every host ("*").
	Any bool
	// Names are lower case without a trailing dot; one that starts with
	// "." matches the name without it and every name below it.
	Names []string
}

// parseHosts parses a comma-separated list of host names, ".domain"
// suffixes and "*". It returns the first bad entry when one is not a host
// name.
func parseHosts(list string) (Hosts, string, bool) {
	h := Hosts{Given: true}
	for _, e := range strings.Split(list, ",") {
		e = strings.ToLower(strings.TrimSuffix(strings.TrimSpace(e), "."))
		switch {
		case e == "*":
			h.Any = true
		case e == "" || e == ".":
			return Hosts{}, e, false
		default:
			if _, ok := parseHost(strings.TrimPrefix(e, ".")); !ok || strings.ContainsAny(e, ":[]") {
				return Hosts{}, e, false
			}
			h.Names = append(h.Names, e)
		}
	}
	return h, "", true
}

// Allow reports whether h answers a request whose Host header is host,
// with or without a port. An empty Host (HTTP/1.0) is answered: browsers
// always send one.
func (h Hosts) Allow(host string) bool {
	if h.Any || host == "" {
		return true
	}
	name := host
	if strings.HasPrefix(name, "[") {
		if i := strings.IndexByte(name, ']'); i > 0 {
			name = name[1:i]
		}
	} else if i := strings.LastIndexByte(name, ':'); i >= 0 && !strings.Contains(name[:i], ":") {
		name = name[:i]
	}
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	if _, err := netip.ParseAddr(name); err == nil || name == "localhost" || strings.HasSuffix(name, ".localhost") {
		return true
	}
	for _, n := range h.Names {
		if n == name || n[0] == '.' && (name == n[1:] || strings.HasSuffix(name, n)) {
			return true
		}
	}
	return false
}

// HostCheck returns the Host check of an address that a token protects
// when tokenSet: nil (every host) when a token is set and --allowed-hosts
// was not given, or when it holds "*"; otherwise c.AllowedHosts.Allow,
// which without --allowed-hosts answers loopback names and IP addresses
// only.
func (c Config) HostCheck(tokenSet bool) func(host string) bool {
	if c.AllowedHosts.Any || tokenSet && !c.AllowedHosts.Given {
		return nil
	}
	return c.AllowedHosts.Allow
}
