package supervisor

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// AddrError reports that the server's address cannot be bound. It unwraps
// to the system error (syscall.EADDRINUSE, syscall.EACCES, ...).
type AddrError struct {
	Addr string
	Err  error
}

func (e *AddrError) Error() string {
	switch {
	case errors.Is(e.Err, syscall.EADDRINUSE):
		return "address " + e.Addr + " already in use"
	case errors.Is(e.Err, syscall.EACCES):
		return "address " + e.Addr + ": permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
	case errors.Is(e.Err, syscall.EADDRNOTAVAIL):
		return "address " + e.Addr + ": not an address of this machine"
	}
	if dns, ok := errors.AsType[*net.DNSError](e.Err); ok {
		return "address " + e.Addr + ": host name " + strconv.Quote(dns.Name) + " does not resolve (" + dns.Err + ")"
	}
	return "address " + e.Addr + ": " + e.Err.Error()
}

func (e *AddrError) Unwrap() error { return e.Err }

// probeAddr binds addr without SO_REUSEPORT and releases it, returning the
// resolved address (with the port the kernel chose when it was 0). Any
// listener already on the port, including another copy of this server that
// SO_REUSEPORT would otherwise let us join silently, makes it fail.
func probeAddr(addr string) (*net.TCPAddr, error) {
	ta, err := net.ResolveTCPAddr("tcp", addr)
	if err != nil {
		return nil, &AddrError{Addr: addr, Err: err}
	}
	f, err := listenSocket(ta, false, 1)
	if err != nil {
		return nil, &AddrError{Addr: addr, Err: err}
	}
	defer f.Close()
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		return nil, &AddrError{Addr: addr, Err: err}
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		ta.Port = sa.Port
	case *unix.SockaddrInet6:
		ta.Port = sa.Port
	}
	return ta, nil
}

// CheckAddr returns the error New would return for an address in use or
// unusable (an *AddrError), or nil, without keeping anything bound. A
// caller with slow or exclusive work to do before New (open a database,
// claim a lock) checks first, so that a second copy of a server fails on
// its port, the real mistake, rather than on what it does next. Sockets
// handed over in cfg.Listeners are not checked; New still checks the rest.
func CheckAddr(cfg Config) error {
	switch {
	case len(cfg.Listeners) > 0:
		return nil
	case cfg.UDS != "":
		if c, err := net.DialTimeout("unix", cfg.UDS, time.Second); err == nil {
			c.Close()
			return &AddrError{Addr: cfg.UDS, Err: syscall.EADDRINUSE}
		}
		return nil
	}
	_, err := probeAddr(cmp.Or(cfg.Addr, DefaultAddr))
	return err
}

// listenUDS creates the listening unix socket at path, mode 0666 as
// uvicorn's --uds makes it (the folder's permissions decide who may
// connect). A socket file left by a dead server is replaced; a live one, or
// a file that is not a socket, is an error.
//
// The mode comes from the umask around bind, never from a chmod after it:
// chmod follows a symlink, which another user could put at path in a
// shared folder between the two calls, and the server would then open up
// a file of its own (the database) to everyone.
func listenUDS(path string, backlog int) (*os.File, error) {
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, &AddrError{Addr: path, Err: syscall.EADDRINUSE}
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, &AddrError{Addr: path, Err: errors.New("the path exists and is not a socket")}
		}
		os.Remove(path)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, &AddrError{Addr: path, Err: err}
	}
	f := os.NewFile(uintptr(fd), path)
	old := unix.Umask(0o111)
	err = unix.Bind(fd, &unix.SockaddrUnix{Name: path})
	unix.Umask(old)
	if err != nil {
		f.Close()
		return nil, &AddrError{Addr: path, Err: err}
	}
	if err := unix.Listen(fd, backlog); err != nil {
		f.Close()
		os.Remove(path)
		return nil, &AddrError{Addr: path, Err: err}
	}
	return f, nil
}

// listenSocket creates a listening TCP socket on addr with the given
// backlog. The returned file is close-on-exec; it reaches a worker only as
// one of its ExtraFiles.
func listenSocket(addr *net.TCPAddr, reuseport bool, backlog int) (*os.File, error) {
	family, sa := unix.AF_INET, unix.Sockaddr(nil)
	if ip4 := addr.IP.To4(); ip4 != nil || addr.IP == nil {
		s := &unix.SockaddrInet4{Port: addr.Port}
		copy(s.Addr[:], ip4)
		sa = s
	} else {
		family = unix.AF_INET6
		s := &unix.SockaddrInet6{Port: addr.Port}
		copy(s.Addr[:], addr.IP.To16())
		sa = s
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	ok := false
	defer func() {
		if !ok {
			unix.Close(fd)
		}
	}()
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return nil, os.NewSyscallError("setsockopt SO_REUSEADDR", err)
	}
	if reuseport {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return nil, os.NewSyscallError("setsockopt SO_REUSEPORT", err)
		}
	}
	if err := unix.Bind(fd, sa); err != nil {
		return nil, err // the bare errno, so AddrError can name it
	}
	if err := unix.Listen(fd, backlog); err != nil {
		return nil, os.NewSyscallError("listen", err)
	}
	ok = true
	return os.NewFile(uintptr(fd), "listener "+addr.String()), nil
}

// migrateReqDisabled reports whether net.ipv4.tcp_migrate_req is 0, in
// which case closing a SO_REUSEPORT socket resets the connections still
// queued on it instead of moving them to another socket of the group.
func migrateReqDisabled() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
	return err == nil && strings.TrimSpace(string(b)) == "0"
}

// errNoSocket is returned when a slot needs its own socket and cannot get one.
func slotSocketError(slot int, err error) error {
	return fmt.Errorf("supervisor: socket for worker %d: %w", slot, err)
}

// socketAddr returns the address an inherited listening socket is bound to.
func socketAddr(f *os.File) (net.Addr, error) {
	sa, err := unix.Getsockname(int(f.Fd()))
	if err != nil {
		return nil, fmt.Errorf("supervisor: inherited socket %s: %w", f.Name(), err)
	}
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}, nil
	case *unix.SockaddrInet6:
		return &net.TCPAddr{IP: net.IP(sa.Addr[:]), Port: sa.Port}, nil
	case *unix.SockaddrUnix:
		return &net.UnixAddr{Name: sa.Name, Net: "unix"}, nil
	}
	return nil, fmt.Errorf("supervisor: inherited socket %s is neither a TCP nor a unix socket", f.Name())
}

// procField returns the field with index i (from 0) of a line of a /proc
// table, fields separated by spaces, or nil; it does not allocate.
func procField(line []byte, i int) []byte {
	for n := 0; ; n++ {
		line = bytes.TrimLeft(line, " ")
		if len(line) == 0 {
			return nil
		}
		end := bytes.IndexByte(line, ' ')
		if end < 0 {
			end = len(line)
		}
		if n == i {
			return line[:end]
		}
		line = line[end:]
	}
}

// procNumber parses a field of /proc/net/tcp in base 10 or 16 without
// allocating, as strconv would for its error.
func procNumber(b []byte, base uint64) (uint64, bool) {
	var n uint64
	for _, c := range b {
		var d uint64
		switch {
		case '0' <= c && c <= '9':
			d = uint64(c - '0')
		case base == 16 && 'A' <= c && c <= 'F':
			d = uint64(c-'A') + 10
		case base == 16 && 'a' <= c && c <= 'f':
			d = uint64(c-'a') + 10
		default:
			return 0, false
		}
		if n > (1<<64-1-d)/base {
			return 0, false
		}
		n = n*base + d
	}
	return n, len(b) > 0
}

// foreignListeners counts the listening TCP sockets on port that are none
// of ours. SO_REUSEPORT lets any process of the same user join our group;
// the probe-bind stops another copy of the server at start, but two copies
// started at the same instant can both probe a free port before either
// binds it. Each checks after binding, so at least one of them sees the
// other and stops.
func foreignListeners(port int, ours []*os.File) int {
	mine := map[uint64]bool{}
	for _, f := range ours {
		var st unix.Stat_t
		if unix.Fstat(int(f.Fd()), &st) == nil {
			mine[st.Ino] = true
		}
	}
	n := 0
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		// Read line by line: a busy machine's table runs to megabytes (one
		// line per socket, TIME_WAIT included), which a whole-file read
		// would leave in the master's heap for its lifetime.
		t, err := os.Open(table)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(t)
		for sc.Scan() {
			// sl local_address rem_address st ... inode is field 10. No
			// line allocates, so the cost does not grow with the table
			// (a host may hold hundreds of listeners too).
			line := sc.Bytes()
			if string(procField(line, 3)) != "0A" {
				continue
			}
			local := procField(line, 1)
			p, ok := procNumber(local[bytes.LastIndexByte(local, ':')+1:], 16)
			if !ok || p != uint64(port) {
				continue
			}
			if ino, ok := procNumber(procField(line, 9), 10); ok && !mine[ino] {
				n++
			}
		}
		t.Close()
	}
	return n
}

// Public reports whether the sockets cfg describes accept connections
// from other hosts: a TCP address that is not a loopback one, among
// systemd's sockets or as cfg.Addr. A unix socket (--uds) is local. It
// returns the address it judged, for messages.
func Public(cfg Config) (string, bool) {
	if len(cfg.Listeners) > 0 {
		for _, f := range cfg.Listeners {
			rc, err := f.SyscallConn()
			if err != nil {
				continue
			}
			var sa unix.Sockaddr
			rc.Control(func(fd uintptr) { sa, _ = unix.Getsockname(int(fd)) })
			switch a := sa.(type) {
			case *unix.SockaddrInet4:
				if ip := netip.AddrFrom4(a.Addr); !ip.IsLoopback() {
					return netip.AddrPortFrom(ip, uint16(a.Port)).String(), true
				}
			case *unix.SockaddrInet6:
				if ip := netip.AddrFrom16(a.Addr).Unmap(); !ip.IsLoopback() {
					return netip.AddrPortFrom(ip, uint16(a.Port)).String(), true
				}
			}
		}
		return "", false
	}
	if cfg.UDS != "" {
		return "unix:" + cfg.UDS, false
	}
	addr := cmp.Or(cfg.Addr, DefaultAddr)
	host, _, _ := net.SplitHostPort(addr)
	return addr, PublicHost(host)
}

// PublicHost reports whether listening on host takes connections from
// other hosts: anything but a loopback address or the name localhost
// (and its subdomains, which resolve to loopback). "" is every address.
func PublicHost(host string) bool {
	if ip, err := netip.ParseAddr(host); err == nil {
		return !ip.Unmap().IsLoopback()
	}
	h := strings.ToLower(strings.TrimSuffix(host, "."))
	return h != "localhost" && !strings.HasSuffix(h, ".localhost")
}
