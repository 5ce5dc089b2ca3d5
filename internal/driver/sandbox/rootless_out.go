package sandbox

// Outbound traffic and DNS of a rootless sandbox, slirp-style.
//
// The sandbox's init makes a device, eth0, in the sandbox's network
// namespace, and a packet socket on its peer (rootless_link.go): the
// machine is 10.0.2.100/24 and fd00::100/64 there, with default routes
// through the gateway, 10.0.2.2 and fd00::2. The driver takes a copy of the
// socket and runs on the frames it carries a user-space TCP/IP stack
// (gVisor's netstack), one per machine, in its own process. The stack terminates every TCP connection and UDP flow the
// machine opens, and the driver opens the same from the host (as the user
// who runs Flame) and copies bytes between the two:
//
//   - to the gateway (10.0.2.2, fd00::2): the host's loopback (127.0.0.1,
//     [::1]), so a machine reaches a database or a dev server the user runs
//     on the host, as the user's own programs would;
//   - to fdaa::3 port 53 (UDP and TCP): the host's resolvers (the
//     nameservers of the host's /etc/resolv.conf), so names of the world
//     resolve; .internal names are not answered (a rootless machine has no
//     6PN address, no org network and no machine DNS yet);
//   - to any other address: that address, from the host (the world, the
//     host's networks).
//
// The gateway and the host's own addresses only with Config.HostAccess
// (a Flame whose only tenant is the user running it: flame dev run by a
// user, or a host that allows host exec); without it a machine reaches
// other hosts only, never this one's services.
//
// Refused: the other addresses of the sandbox's own subnets, loopback,
// unspecified, multicast and link-local destinations; and on the host's
// own addresses (the gateway's loopback included) every port that the
// Flame process running the driver itself holds, TCP listening or UDP
// bound (its API, proxy, edge, gossip, DNS and the machines' forwarded
// ports): a machine reaches the host's services as the user does, but
// never Flame itself from behind, which would bypass the edge. A Flame made
// of several processes on one host (server and agent apart) protects only
// the process running the driver this way.
//
// Bounds, per machine: outboundTCP connections at once (more are reset),
// of which at most outboundPending are being dialled (SYNs beyond that are
// dropped, the machine's stack retransmits), outboundUDP flows (packets of
// more are dropped), outboundBuffer bytes of stack buffer per direction of
// each connection, and idle timeouts (outboundTCPIdle, outboundUDPIdle) on
// both directions. ICMP (ping) is not forwarded.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// Bounds of one machine's outbound traffic (see the file's comment).
const (
	outboundTCP      = 256
	outboundPending  = 64
	outboundUDP      = 256
	outboundBuffer   = 256 << 10
	outboundTCPIdle  = 10 * time.Minute
	outboundUDPIdle  = time.Minute
	outboundDial     = 10 * time.Second
	outboundQueue    = 512 // packets queued from the stack to the device
	ownPortsMaxAge   = time.Second
	ownPortsMinFetch = 100 * time.Millisecond
)

// outLimits are a driver's bounds of a machine's outbound traffic.
type outLimits struct {
	tcp, pending, udp int
}

func defaultOutLimits() outLimits {
	return outLimits{tcp: outboundTCP, pending: outboundPending, udp: outboundUDP}
}

// outbound is one machine's stack and the connections it forwards.
type outbound struct {
	d       *Driver
	machine string
	link    *os.File // the packet socket: the machine's Ethernet frames
	ep      *channel.Endpoint
	st      *stack.Stack
	ctx     context.Context
	cancel  context.CancelFunc

	tcpSlots chan struct{}
	udpSlots chan struct{}

	mu     sync.Mutex
	closed bool
	conns  map[io.Closer]struct{}
	wg     sync.WaitGroup
	once   sync.Once
}

// startOutbound asks the sandbox of machine (directory dir) for its packet
// socket and serves it.
func (d *Driver) startOutbound(machine, dir string) (*outbound, error) {
	fd, err := askInitFd(dir, message{Op: "link"})
	if err != nil {
		return nil, fmt.Errorf("outbound traffic: %w", err)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("outbound traffic: %w", err)
	}
	link := os.NewFile(uintptr(fd), "link:"+machine)
	o, err := newOutbound(d, machine, link)
	if err != nil {
		link.Close()
		return nil, fmt.Errorf("outbound traffic: %w", err)
	}
	return o, nil
}

func newOutbound(d *Driver, machine string, link *os.File) (*outbound, error) {
	lim := d.rl.limits
	st := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	ep := channel.New(outboundQueue, outMTU, "")
	// The machine's kernel leaves the checksums of what it sends on a
	// veth to the device (offloaded), and nothing between it and the
	// stack corrupts a frame: the stack checks none.
	ep.LinkEPCapabilities |= stack.CapabilityRXChecksumOffload
	o := &outbound{d: d, machine: machine, link: link, ep: ep, st: st,
		tcpSlots: make(chan struct{}, lim.tcp), udpSlots: make(chan struct{}, lim.udp),
		conns: make(map[io.Closer]struct{})}
	o.ctx, o.cancel = context.WithCancel(context.Background())
	fail := func(what string, e tcpip.Error) (*outbound, error) {
		st.Close()
		st.Wait()
		o.cancel()
		return nil, fmt.Errorf("%s: %s", what, e)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if e := st.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); e != nil {
		return fail("tcp sack", e)
	}
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: outboundBuffer}
	if e := st.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); e != nil {
		return fail("tcp receive buffer", e)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 128 << 10, Max: outboundBuffer}
	if e := st.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); e != nil {
		return fail("tcp send buffer", e)
	}
	if e := st.CreateNIC(1, ep); e != nil {
		return fail("nic", e)
	}
	// Every destination is the stack's to answer (promiscuous), from
	// that destination's address (spoofing).
	if e := st.SetPromiscuousMode(1, true); e != nil {
		return fail("promiscuous", e)
	}
	if e := st.SetSpoofing(1, true); e != nil {
		return fail("spoofing", e)
	}
	st.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: 1},
		{Destination: header.IPv6EmptySubnet, NIC: 1},
	})
	tf := tcp.NewForwarder(st, 0, lim.pending, o.handleTCP)
	st.SetTransportProtocolHandler(tcp.ProtocolNumber, tf.HandlePacket)
	uf := udp.NewForwarder(st, o.handleUDP)
	st.SetTransportProtocolHandler(udp.ProtocolNumber, uf.HandlePacket)
	o.wg.Add(2)
	go o.fromDevice()
	go o.toDevice()
	return o, nil
}

// ethHeader is an Ethernet header's length.
const ethHeader = 14

// fromDevice passes the packets the machine sends to the stack: the IP
// frames from eth0's link address (not those the socket itself sent). A
// frame may be larger than the MTU: the machine's kernel leaves the
// segmentation of what it sends on a veth to the device (GSO), and the
// stack takes an IP packet of any size.
func (o *outbound) fromDevice() {
	defer o.wg.Done()
	frame := make([]byte, ethHeader+1<<16)
	for {
		n, err := o.link.Read(frame)
		if err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, io.EOF) {
				return
			}
			select {
			case <-o.ctx.Done():
				return
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		if n <= ethHeader || !bytes.Equal(frame[6:12], outMAC) {
			continue
		}
		buf := frame[ethHeader:n]
		n -= ethHeader
		var proto tcpip.NetworkProtocolNumber
		switch buf[0] >> 4 {
		case 4:
			proto = header.IPv4ProtocolNumber
		case 6:
			proto = header.IPv6ProtocolNumber
		default:
			continue
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(buf[:n])})
		o.ep.InjectInbound(proto, pkt)
		pkt.DecRef()
	}
}

// toDevice writes the stack's packets to the machine, as the gateway's
// frames to eth0.
func (o *outbound) toDevice() {
	defer o.wg.Done()
	frame := make([]byte, ethHeader, ethHeader+outMTU+64)
	copy(frame[0:6], outMAC)
	copy(frame[6:12], outGatewayMAC)
	for {
		pkt := o.ep.ReadContext(o.ctx)
		if pkt == nil {
			return
		}
		v := pkt.ToView()
		pkt.DecRef()
		b := v.AsSlice()
		if len(b) == 0 || len(b) > outMTU {
			v.Release()
			continue
		}
		binary.BigEndian.PutUint16(frame[12:14], unix.ETH_P_IP)
		if b[0]>>4 == 6 {
			binary.BigEndian.PutUint16(frame[12:14], unix.ETH_P_IPV6)
		}
		_, err := o.link.Write(append(frame[:ethHeader], b...))
		v.Release()
		if errors.Is(err, os.ErrClosed) {
			return
		}
	}
}

// enter counts a goroutine of o's, unless o is closed.
func (o *outbound) enter() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return false
	}
	o.wg.Add(1)
	return true
}

func (o *outbound) track(cs ...io.Closer) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		o.conns[c] = struct{}{}
	}
	return true
}

func (o *outbound) untrack(cs ...io.Closer) {
	o.mu.Lock()
	for _, c := range cs {
		delete(o.conns, c)
		c.Close()
	}
	o.mu.Unlock()
}

// close ends every connection and flow, the stack and its goroutines, and
// closes the driver's copy of the packet socket (the init keeps its own).
func (o *outbound) close() {
	o.once.Do(func() {
		o.mu.Lock()
		o.closed = true
		o.cancel()
		for c := range o.conns {
			c.Close()
		}
		o.mu.Unlock()
		o.link.Close()
		o.wg.Wait()
		o.st.Close()
		o.st.Wait()
		o.ep.Close()
	})
}

// handleTCP forwards one connection the machine opens (in a goroutine of
// the stack's forwarder, which bounds those not completed yet).
func (o *outbound) handleTCP(r *tcp.ForwarderRequest) {
	if !o.enter() {
		r.Complete(true)
		return
	}
	defer o.wg.Done()
	id := r.ID()
	to, ok := o.d.outTarget("tcp", id.LocalAddress, id.LocalPort)
	if !ok {
		r.Complete(true)
		return
	}
	select {
	case o.tcpSlots <- struct{}{}:
	default:
		r.Complete(true) // too many at once: reset
		return
	}
	defer func() { <-o.tcpSlots }()
	ctx, cancel := context.WithTimeout(o.ctx, outboundDial)
	host, err := new(net.Dialer).DialContext(ctx, "tcp", to.String())
	cancel()
	if err != nil {
		r.Complete(true)
		return
	}
	var wq waiter.Queue
	ep, e := r.CreateEndpoint(&wq)
	if e != nil {
		r.Complete(true)
		host.Close()
		return
	}
	r.Complete(false)
	in := gonet.NewTCPConn(&wq, ep)
	if !o.track(in, host) {
		return
	}
	defer o.untrack(in, host)
	splice(in, host, outboundTCPIdle)
}

// handleUDP forwards one flow the machine starts (in the stack's packet
// path: it must not block).
func (o *outbound) handleUDP(r *udp.ForwarderRequest) {
	id := r.ID()
	to, ok := o.d.outTarget("udp", id.LocalAddress, id.LocalPort)
	if !ok {
		return
	}
	select {
	case o.udpSlots <- struct{}{}:
	default:
		return // too many flows: dropped
	}
	host, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
	if err != nil {
		<-o.udpSlots
		return
	}
	var wq waiter.Queue
	ep, e := r.CreateEndpoint(&wq)
	if e != nil {
		host.Close()
		<-o.udpSlots
		return
	}
	in := gonet.NewUDPConn(&wq, ep)
	if !o.enter() {
		in.Close()
		host.Close()
		<-o.udpSlots
		return
	}
	if !o.track(in, host) {
		o.wg.Done()
		<-o.udpSlots
		return
	}
	go func() {
		defer o.wg.Done()
		defer func() { <-o.udpSlots }()
		defer o.untrack(in, host)
		splice(in, host, outboundUDPIdle)
	}()
}

// deadliner is a connection whose reads time out.
type deadliner interface {
	io.ReadWriteCloser
	SetReadDeadline(time.Time) error
}

// splice copies between a and b both ways until both directions end, an
// error, or neither carried a byte for idle.
func splice(a, b deadliner, idle time.Duration) {
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	done := make(chan struct{}, 2)
	pipe := func(dst, src deadliner) {
		defer func() { done <- struct{}{} }()
		buf := make([]byte, 32<<10)
		for {
			src.SetReadDeadline(time.Now().Add(idle))
			n, err := src.Read(buf)
			if n > 0 {
				last.Store(time.Now().UnixNano())
				if _, werr := dst.Write(buf[:n]); werr != nil {
					a.Close()
					b.Close()
					return
				}
			}
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() && time.Since(time.Unix(0, last.Load())) < idle {
					continue // the other direction is busy
				}
				if errors.Is(err, io.EOF) {
					if cw, ok := dst.(interface{ CloseWrite() error }); ok {
						cw.CloseWrite()
						return
					}
				}
				a.Close()
				b.Close()
				return
			}
		}
	}
	go pipe(a, b)
	go pipe(b, a)
	<-done
	<-done
}

// Addresses of a rootless sandbox's outbound network, as the stack sees
// them.
var (
	outNet4 = netip.PrefixFrom(outAddr4, outBits4).Masked()
	outNet6 = netip.PrefixFrom(outAddr6, outBits6).Masked()
)

// outTarget is where the driver opens a connection (network "tcp" or
// "udp") the machine opened to dst:port, or false when it is refused (see
// the file's comment).
func (d *Driver) outTarget(network string, dst tcpip.Address, port uint16) (netip.AddrPort, bool) {
	a, ok := netip.AddrFromSlice(dst.AsSlice())
	if !ok || port == 0 {
		return netip.AddrPort{}, false
	}
	a = a.Unmap()
	switch {
	case (a == outGateway4 || a == outGateway6) && !d.rl.hostAccess.Load():
		return netip.AddrPort{}, false
	case a == outGateway4:
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case a == outGateway6:
		a = netip.IPv6Loopback()
	case a == layout.DNS:
		if port != 53 || len(d.rl.resolvers) == 0 {
			return netip.AddrPort{}, false
		}
		return d.rl.resolvers[0], true
	case outNet4.Contains(a) || outNet6.Contains(a), a.IsLoopback(), a.IsUnspecified(),
		a.IsMulticast(), a.IsLinkLocalUnicast(), a.IsInterfaceLocalMulticast():
		return netip.AddrPort{}, false
	}
	to := netip.AddrPortFrom(a, port)
	if d.rl.own.hostLocal(a) && (!d.rl.hostAccess.Load() || d.rl.own.holds(network, port)) {
		return netip.AddrPort{}, false
	}
	return to, true
}

// ownPorts knows the host's addresses and the ports this process holds,
// read again when older than ownPortsMaxAge, or when a port is not among
// them and they are older than ownPortsMinFetch (so a port just taken is
// seen, and a workload asking for ports nobody holds rereads at most ten
// times a second).
type ownPorts struct {
	mu    sync.Mutex
	at    time.Time
	addrs map[netip.Addr]bool
	ports map[string]bool // "tcp/8080", "udp/53"
}

func (o *ownPorts) refresh(force bool) {
	age := time.Since(o.at)
	if o.ports != nil && age < ownPortsMaxAge && (!force || age < ownPortsMinFetch) {
		return
	}
	o.at = time.Now()
	o.addrs = map[netip.Addr]bool{}
	if ifas, err := net.InterfaceAddrs(); err == nil {
		for _, ifa := range ifas {
			if p, err := netip.ParsePrefix(ifa.String()); err == nil {
				o.addrs[p.Addr().Unmap()] = true
			}
		}
	}
	o.ports = processPorts()
}

func (o *ownPorts) hostLocal(a netip.Addr) bool {
	if a.IsLoopback() {
		return true
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.refresh(false)
	return o.addrs[a]
}

func (o *ownPorts) holds(network string, port uint16) bool {
	key := network + "/" + strconv.Itoa(int(port))
	o.mu.Lock()
	defer o.mu.Unlock()
	o.refresh(false)
	if o.ports[key] {
		return true
	}
	o.refresh(true)
	return o.ports[key]
}

// processPorts are the TCP ports this process listens on and the UDP ports
// it has sockets bound to: the sockets of /proc/self/net whose inodes are
// among this process's descriptors.
func processPorts() map[string]bool {
	inodes := map[string]bool{}
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil {
			if ino, ok := strings.CutPrefix(l, "socket:["); ok {
				inodes[strings.TrimSuffix(ino, "]")] = true
			}
		}
	}
	out := map[string]bool{}
	for _, name := range []string{"tcp", "tcp6", "udp", "udp6"} {
		f, err := os.Open("/proc/self/net/" + name)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(io.LimitReader(f, maxSocketTable))
		for first := true; sc.Scan(); first = false {
			fl := strings.Fields(sc.Text())
			if first || len(fl) < 10 || !inodes[fl[9]] {
				continue
			}
			if name[:3] == "tcp" && fl[3] != "0A" { // TCP_LISTEN
				continue
			}
			_, port, _ := strings.Cut(fl[1], ":")
			if n, err := strconv.ParseUint(port, 16, 16); err == nil {
				out[name[:3]+"/"+strconv.Itoa(int(n))] = true
			}
		}
		f.Close()
	}
	return out
}

// hostResolvers are the nameservers of a resolv.conf file, port 53.
func hostResolvers(path string) []netip.AddrPort {
	b, err := readAtMost(path, 64<<10)
	if err != nil {
		return nil
	}
	var out []netip.AddrPort
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "nameserver" {
			if a, err := netip.ParseAddr(f[1]); err == nil && a.Zone() == "" {
				out = append(out, netip.AddrPortFrom(a.Unmap(), 53))
			}
		}
	}
	return out
}

// askInitFd sends m to the init of the sandbox whose machine directory is
// dir and returns the one descriptor it answers with.
func askInitFd(dir string, m message) (int, error) {
	uc, err := dialExec(dir)
	if err != nil {
		return -1, fmt.Errorf("sandbox takes no commands: %w", err)
	}
	defer uc.Close()
	uc.SetDeadline(time.Now().Add(forwardDialTimeout + time.Second))
	// No descriptors: one byte, as sendFiles sends with them.
	if _, err := uc.Write([]byte{0}); err != nil {
		return -1, err
	}
	if err := writeMessage(uc, m); err != nil {
		return -1, err
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
	if err != nil {
		return -1, err
	}
	if oobn == 0 {
		return -1, fmt.Errorf("%s: %s", m.Op, initError(buf[:n]))
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return -1, fmt.Errorf("%s: bad answer", m.Op)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		closeFds(fds)
		return -1, fmt.Errorf("%s: bad answer", m.Op)
	}
	return fds[0], nil
}

// outbound serves the outbound traffic of fw's machine, which ends with
// fw; a sandbox without it (its init could not make the device) is logged.
func (d *Driver) outbound(fw *forwarder) {
	o, err := d.startOutbound(fw.machine, fw.dir)
	if err != nil {
		d.logger.Warn("rootless sandbox: no outbound traffic", "machine", fw.machine, "err", err)
		return
	}
	fw.out = o
}
