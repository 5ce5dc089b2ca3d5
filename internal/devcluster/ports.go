package devcluster

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// A killed host gets its addresses back when it is revived, and the
// cluster holds them meanwhile (reserve.go) — but not in the moment
// between the host's listeners closing and the hold, nor between the
// release and the revived host's listen. In that moment any outgoing
// connection of this machine may be given the port: the kernel hands out
// its ephemeral range (net.ipv4.ip_local_port_range) to every connect,
// and a listener asked for port 0 is given a port from that same range.
// A port below the range is only ever taken by an explicit bind, which
// nothing does to a port it did not choose. So a host's listeners asked
// for port 0 get a free port below the ephemeral range.

// stableLow is the lowest port picked: clear of the well-known services.
const stableLow = 10000

// stablePorts is the range [lo, hi) stable ports are picked from: below
// the kernel's ephemeral range; empty when the range leaves no room.
func stablePorts() (lo, hi int) {
	ephemeral := 32768 // Linux's default start
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				ephemeral = n
			}
		}
	}
	if ephemeral-stableLow < 1000 {
		return 0, 0
	}
	return stableLow, ephemeral
}

// stableTries bounds the random ports tried before falling back to one
// the kernel picks.
const stableTries = 64

// portCandidates is the ports to try for addr, in order: addr's own when
// it names one; else random ports below the ephemeral range, then 0.
func portCandidates(addr string) (host string, ports []int, err error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", nil, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", nil, fmt.Errorf("bad port in %q", addr)
	}
	if port != 0 {
		return host, []int{port}, nil
	}
	if lo, hi := stablePorts(); hi > lo {
		for range stableTries {
			ports = append(ports, lo+rand.IntN(hi-lo))
		}
	}
	return host, append(ports, 0), nil
}

// listenStable listens on TCP at addr; with port 0, on a free port below
// the ephemeral range when one is found.
func listenStable(addr string) (net.Listener, error) {
	host, ports, err := portCandidates(addr)
	if err != nil {
		return nil, err
	}
	for i, port := range ports {
		ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil && port != 0 && errors.Is(err, syscall.EADDRINUSE) {
			err = fmt.Errorf("%w (%s)", err, portHolder(port))
		}
		if err == nil || i == len(ports)-1 {
			return ln, err
		}
	}
	panic("unreachable")
}

// portHolder describes what holds TCP port port on this machine — each
// socket bound to it, its state and the process owning it — for an
// "address already in use" to say who took a host's address.
func portHolder(port int) string {
	states := map[string]string{"01": "established", "02": "syn-sent", "06": "time-wait", "08": "close-wait", "0A": "listening"}
	type sock struct{ local, remote, state string }
	socks := map[string]sock{} // by inode
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 10 {
				continue
			}
			_, hexPort, ok := strings.Cut(f[1], ":")
			if p, err := strconv.ParseInt(hexPort, 16, 32); !ok || err != nil || int(p) != port {
				continue
			}
			socks[f[9]] = sock{local: f[1], remote: f[2], state: cmp.Or(states[f[3]], f[3])}
		}
	}
	if len(socks) == 0 {
		return "no TCP socket holds it now"
	}
	owners := map[string]string{}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		fds, _ := os.ReadDir("/proc/" + p.Name() + "/fd")
		for _, fd := range fds {
			l, _ := os.Readlink("/proc/" + p.Name() + "/fd/" + fd.Name())
			if inode, ok := strings.CutPrefix(l, "socket:["); ok {
				inode = strings.TrimSuffix(inode, "]")
				if _, ok := socks[inode]; ok {
					comm, _ := os.ReadFile("/proc/" + p.Name() + "/comm")
					owners[inode] = fmt.Sprintf("pid %s (%s)", p.Name(), strings.TrimSpace(string(comm)))
				}
			}
		}
	}
	var out []string
	for inode, s := range socks {
		out = append(out, fmt.Sprintf("%s socket %s→%s of %s", s.state, s.local, s.remote, cmp.Or(owners[inode], "no process")))
	}
	return strings.Join(out, "; ")
}
