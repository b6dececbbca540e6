package worker

import (
	"bytes"
	"net"
	"net/netip"
	"strings"

	"github.com/valyala/fasthttp"
)

// Proxies are the peers whose X-Forwarded-For the access log believes (as
// uvicorn's --forwarded-allow-ips): every peer when All is set, else those
// in Nets.
type Proxies struct {
	All  bool
	Nets []netip.Prefix
}

// ParseProxies reads a comma-separated list of IP addresses and networks
// (CIDR), or "*" for every peer. It returns the first entry it cannot read.
func ParseProxies(list string) (Proxies, string, bool) {
	var p Proxies
	for _, e := range strings.Split(list, ",") {
		e = strings.TrimSpace(e)
		switch {
		case e == "*":
			p.All = true
		case strings.Contains(e, "/"):
			n, err := netip.ParsePrefix(e)
			if err != nil {
				return Proxies{}, e, false
			}
			p.Nets = append(p.Nets, n.Masked())
		default:
			a, err := netip.ParseAddr(e)
			if err != nil {
				return Proxies{}, e, false
			}
			a = a.Unmap()
			p.Nets = append(p.Nets, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return p, "", true
}

func (p *Proxies) trusts(a netip.Addr) bool {
	if p.All {
		return true
	}
	a = a.Unmap()
	for _, n := range p.Nets {
		if n.Contains(a) {
			return true
		}
	}
	return false
}

// maxClientLen bounds the client address the access log takes from a
// header, which the client may have written itself.
const maxClientLen = 64

// Client returns the request's client, as the access log names it and as
// per-client limits count it: the peer, or, when p trusts the peer, the
// nearest address in X-Forwarded-For that p does not trust (the leftmost
// when it trusts them all). A nil p trusts nobody.
// A peer on a unix socket (--uds) is a local process the socket's file
// permissions let in, such as a proxy on the same machine: it is trusted,
// and without X-Forwarded-For it is "unix".
func (p *Proxies) Client(ctx *fasthttp.RequestCtx) string {
	peerName := "unix"
	_, trusted := ctx.RemoteAddr().(*net.UnixAddr)
	if !trusted {
		peer, _ := netip.AddrFromSlice(ctx.RemoteIP())
		peerName = peer.Unmap().String()
		trusted = p != nil && p.trusts(peer)
	}
	if p == nil || !trusted {
		return peerName
	}
	values := ctx.Request.Header.PeekAll(fasthttp.HeaderXForwardedFor)
	if len(values) == 0 {
		return peerName
	}
	hops := bytes.Split(bytes.Join(values, []byte{','}), []byte{','})
	pick := bytes.TrimSpace(hops[0])
	if !p.All {
		for i := len(hops) - 1; i >= 0; i-- {
			hop := bytes.TrimSpace(hops[i])
			if a, err := netip.ParseAddr(string(hop)); err != nil || !p.trusts(a) {
				pick = hop
				break
			}
		}
	}
	if len(pick) == 0 {
		return peerName
	}
	if len(pick) > maxClientLen {
		pick = pick[:maxClientLen]
	}
	return string(pick)
}
