package sandbox

// Inbound connections to a rootless sandbox.
//
// A rootless sandbox's network namespace has only its loopback: no veth
// (an unprivileged user cannot make one into the host's namespace), so the
// host cannot route to it. Instead each machine gets an address of the
// host's loopback (every 127.0.0.0/8 address is the host's), leased as a
// 6PN address is, and the driver binds there each of the machine's ports
// (driver.Spec.Ports: its services' internal ports and its checks' ports),
// and listens on one once the workload listens on it inside (until then a
// connection is refused, as at a 6PN address). For each connection it
// accepts, it asks the sandbox's init, over the init's command socket, to
// connect to the port inside (at the machine's address, which the
// sandbox's loopback also answers, else at 127.0.0.1, else at [::1]); the
// init hands back the connected socket (SCM_RIGHTS) and the driver copies
// bytes between the two in its own process. The init only connects: it
// carries no traffic. The proxy and the health checks dial PrivateIP as
// they dial a 6PN address. At most maxForwarded connections per machine
// are forwarded at once; more are closed as they come. A connection the
// workload does not take (it stopped listening) is reset.

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
)

// maxForwarded bounds the connections forwarded into one sandbox at once.
const maxForwarded = 1024

// forwardDialTimeout bounds the init's connect inside the sandbox and the
// exchange that hands the socket over.
const forwardDialTimeout = 5 * time.Second

// loopbackPrefix is the /16 of the host's loopback a rootless driver's
// machines get addresses in: 127.<n>.0.0, n (1 to 254) the instance's
// network hashed plus the host's number, so that the hosts of one dev
// cluster (up to 254) never share one, and two Flames rarely do (a legacy
// instance, without a network, hashes its bridge's name); when they do,
// machine addresses still differ with high odds, and a clash on a port
// fails the start (the bind), it never shares a machine's traffic.
func loopbackPrefix(cfg Config) netip.Prefix {
	key := cfg.Network.String()
	if cfg.Network == 0 {
		key = cfg.Bridge
	}
	sum := sha256.Sum256([]byte("flame-rootless/" + key))
	n := byte(1 + (uint32(sum[0])+uint32(cfg.Host))%254)
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{127, n, 0, 0}), 16)
}

// addrCandidate4 is addrCandidate for an IPv4 prefix (a rootless driver's
// loopback one): the machine id hashed into the host bits, never the
// prefix's first or last address.
func addrCandidate4(prefix netip.Prefix, id string, attempt int) (netip.Addr, bool) {
	prefix = prefix.Masked()
	hostBits := 32 - prefix.Bits()
	if hostBits < 2 {
		return netip.Addr{}, false
	}
	sum := sha256.Sum256(fmt.Appendf(nil, "%s/%d", id, attempt))
	mask := uint32(1)<<hostBits - 1
	host := binary.BigEndian.Uint32(sum[:4]) & mask
	if host == 0 || host == mask {
		return netip.Addr{}, false
	}
	base := prefix.Addr().As4()
	v := binary.BigEndian.Uint32(base[:]) | host
	var a [4]byte
	binary.BigEndian.PutUint32(a[:], v)
	return netip.AddrFrom4(a), true
}

// forwarder listens on a machine's address and ports and forwards each
// connection into its sandbox. A port is bound on the host from the start
// (a port another program holds fails the start) but listens only once the
// workload listens on it inside (watch): until then a connection is
// refused, as the port of a machine of root's is, so a tcp check or the
// edge sees the machine as it is.
type forwarder struct {
	d       *Driver
	machine string
	dir     string // the machine's directory, with the init's command socket
	ports   []int
	slots   chan struct{}
	stop    chan struct{} // closed by close
	out     *outbound     // the machine's outbound traffic, if any

	mu     sync.Mutex
	socks  []*os.File // by port: bound, not listening yet (nil since)
	lns    []net.Listener
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
	once   sync.Once
}

// listenForwarder binds addr at every port of spec (none: a machine nobody
// reaches).
func (d *Driver) listenForwarder(spec driver.Spec, addr netip.Addr) (*forwarder, error) {
	f := &forwarder{d: d, machine: spec.MachineID, dir: spec.Dir, slots: make(chan struct{}, maxForwarded),
		stop: make(chan struct{}), conns: make(map[net.Conn]struct{})}
	for _, p := range spec.Ports {
		if p < 1 || p > 65535 {
			f.close()
			return nil, fmt.Errorf("forward port %d: not a port", p)
		}
		sock, err := bindTCP(netip.AddrPortFrom(addr, uint16(p)))
		if err != nil {
			f.close()
			return nil, fmt.Errorf("forward port %d: %w", p, err)
		}
		f.socks = append(f.socks, sock)
		f.ports = append(f.ports, p)
	}
	return f, nil
}

// bindTCP is a TCP socket bound to ap (IPv4), not listening.
func bindTCP(ap netip.AddrPort) (*os.File, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		unix.Close(fd)
		return nil, err
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("bind %s: %w", ap, err)
	}
	return os.NewFile(uintptr(fd), ap.String()), nil
}

// watch makes each port listen once the sandbox whose init is pid listens
// on it, looking at the sandbox's TCP sockets (/proc/<pid>/net/tcp{,6})
// every 2 ms at first, then less often, up to every 250 ms, until every
// port listens, the sandbox is gone or f closes.
func (f *forwarder) watch(pid int) {
	defer f.wg.Done()
	wait := 2 * time.Millisecond
	for {
		listening, err := listeningPorts(pid)
		if err != nil {
			return // the sandbox ended
		}
		pending := 0
		for i, p := range f.ports {
			if listening[p] {
				f.listen(i)
			}
			f.mu.Lock()
			if f.socks[i] != nil {
				pending++
			}
			f.mu.Unlock()
		}
		if pending == 0 {
			return
		}
		select {
		case <-f.stop:
			return
		case <-time.After(wait):
		}
		wait = min(2*wait, 250*time.Millisecond)
	}
}

// listen makes the i-th port listen and accepts on it.
func (f *forwarder) listen(i int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	sock := f.socks[i]
	if f.closed || sock == nil {
		return
	}
	f.socks[i] = nil
	defer sock.Close()
	if err := unix.Listen(int(sock.Fd()), 4096); err != nil {
		f.d.logger.Error("rootless sandbox: cannot forward a port", "machine", f.machine, "port", f.ports[i], "err", err)
		return
	}
	ln, err := net.FileListener(sock)
	if err != nil {
		f.d.logger.Error("rootless sandbox: cannot forward a port", "machine", f.machine, "port", f.ports[i], "err", err)
		return
	}
	f.lns = append(f.lns, ln)
	f.wg.Add(1)
	go f.accept(ln, f.ports[i])
}

// maxSocketTable bounds what listeningPorts reads of a sandbox's socket
// table, which its workload can grow: the kernel lists listening sockets
// first.
const maxSocketTable = 4 << 20

func readAtMost(path string, n int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, n))
}

// listeningPorts are the TCP ports something listens on in the network
// namespace of process pid.
func listeningPorts(pid int) (map[int]bool, error) {
	out := map[int]bool{}
	for _, name := range []string{"tcp", "tcp6"} {
		b, err := readAtMost("/proc/"+strconv.Itoa(pid)+"/net/"+name, maxSocketTable)
		if err != nil {
			return nil, err
		}
		for i, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if i == 0 || len(f) < 4 || f[3] != "0A" { // TCP_LISTEN
				continue
			}
			_, port, ok := strings.Cut(f[1], ":")
			if n, err := strconv.ParseUint(port, 16, 16); ok && err == nil {
				out[int(n)] = true
			}
		}
	}
	return out, nil
}

// serveForwarder starts f's accept loops and records it as the machine's
// forwarder; it is closed when the sandbox s ends (before s's Done), when
// the machine is torn down or when the driver closes.
func (d *Driver) serveForwarder(s *sandbox, f *forwarder) {
	d.rl.fwdMu.Lock()
	old := d.rl.fwds[f.machine]
	d.rl.fwds[f.machine] = f
	d.rl.fwdMu.Unlock()
	if old != nil {
		old.close()
	}
	f.wg.Add(1)
	go f.watch(s.h.Pid)
	s.mu.Lock()
	ended := s.ended
	s.fwd = f
	s.mu.Unlock()
	if ended {
		d.dropForwarder(f)
		return
	}
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		select {
		case <-s.done: // run dropped f
		case <-d.stop:
			d.dropForwarder(f)
		}
	}()
}

// dropForwarder closes f and forgets it, unless another forwarder took
// its machine's place.
func (d *Driver) dropForwarder(f *forwarder) {
	d.rl.fwdMu.Lock()
	if d.rl.fwds[f.machine] == f {
		delete(d.rl.fwds, f.machine)
	}
	d.rl.fwdMu.Unlock()
	f.close()
}

// closeForwarder closes the machine's forwarder, if any.
func (d *Driver) closeForwarder(machine string) {
	d.rl.fwdMu.Lock()
	f := d.rl.fwds[machine]
	delete(d.rl.fwds, machine)
	d.rl.fwdMu.Unlock()
	if f != nil {
		f.close()
	}
}

// close stops listening, ends every forwarded connection and waits for the
// forwarder's goroutines.
func (f *forwarder) close() {
	f.once.Do(func() {
		f.mu.Lock()
		f.closed = true
		close(f.stop)
		for c := range f.conns {
			c.Close()
		}
		for _, sock := range f.socks {
			if sock != nil {
				sock.Close()
			}
		}
		for _, ln := range f.lns {
			ln.Close()
		}
		f.mu.Unlock()
	})
	f.wg.Wait()
	if f.out != nil {
		f.out.close()
	}
}

// track records c as one of f's connections, or closes it when f is closed.
func (f *forwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		f.conns[c] = struct{}{}
	}
	return true
}

func (f *forwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	for _, c := range cs {
		delete(f.conns, c)
		c.Close()
	}
	f.mu.Unlock()
}

func (f *forwarder) accept(ln net.Listener, port int) {
	defer f.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			// EMFILE and friends: wait a little rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		select {
		case f.slots <- struct{}{}:
		default:
			c.Close() // too many at once
			continue
		}
		if !f.track(c) {
			<-f.slots
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer func() { <-f.slots }()
			f.forward(c, port)
		}()
	}
}

// forward connects c to port inside the sandbox and copies both ways until
// both directions end.
func (f *forwarder) forward(c net.Conn, port int) {
	defer f.untrack(c)
	in, err := dialSandbox(f.dir, port)
	if err != nil {
		// Reset, as a port nobody listens on would be refused: the
		// client (the proxy's retry, a check) sees a failure, not an
		// empty answer.
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
		f.d.logger.Debug("forward into rootless sandbox", "machine", f.machine, "port", port, "err", err)
		return
	}
	if !f.track(in) {
		return
	}
	defer f.untrack(in)
	done := make(chan struct{}, 2)
	pipe := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
		done <- struct{}{}
	}
	go pipe(in, c)
	go pipe(c, in)
	<-done
	<-done
}

// dialSandbox has the init of the sandbox whose machine directory is dir
// connect to port inside it, and returns the connection.
func dialSandbox(dir string, port int) (net.Conn, error) {
	uc, err := dialExec(dir)
	if err != nil {
		return nil, fmt.Errorf("sandbox takes no commands: %w", err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(forwardDialTimeout + time.Second))
	// No descriptors: one byte, as sendFiles sends with them.
	if _, err := uc.Write([]byte{0}); err != nil {
		return nil, err
	}
	if err := writeMessage(uc, message{Op: "dial", Port: port}); err != nil {
		return nil, err
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, err
	}
	if oobn == 0 {
		return nil, fmt.Errorf("dial port %d in sandbox: %s", port, initError(buf[:n]))
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, fmt.Errorf("dial port %d in sandbox: bad answer", port)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		closeFds(fds)
		return nil, fmt.Errorf("dial port %d in sandbox: bad answer", port)
	}
	file := os.NewFile(uintptr(fds[0]), "sandbox:"+strconv.Itoa(port))
	defer file.Close()
	return net.FileConn(file)
}

// initError is the error an init's "error" message carries, or what it said.
func initError(b []byte) string {
	var m message
	if err := json.Unmarshal(b, &m); err == nil && m.Op == "error" {
		return m.Err
	}
	return fmt.Sprintf("unexpected answer %q", b)
}
