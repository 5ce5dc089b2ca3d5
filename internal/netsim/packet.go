package netsim

import (
	"net"
	"sync"
	"time"
)

// packetSink receives datagrams for one port of a host.
type packetSink interface {
	// deliver hands over a datagram, reporting false if it was dropped.
	// It must not block.
	deliver(data []byte, from *net.UDPAddr) bool
	close()
}

// bindUDP registers a sink at a port of h (0 picks a free port).
func (n *Network) bindUDP(h *host, port int, sink func(port int) packetSink) (packetSink, int, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if port == 0 {
		p, err := h.freePortLocked(func(p int) bool { return h.udp[p] != nil })
		if err != nil {
			return nil, 0, err
		}
		port = p
	}
	if port < 0 || port > 65535 {
		return nil, 0, &net.AddrError{Err: "invalid port", Addr: h.name}
	}
	if h.udp[port] != nil {
		return nil, 0, &net.OpError{Op: "listen", Net: "udp", Addr: &net.UDPAddr{IP: h.ip, Port: port}, Err: errAddrInUse}
	}
	s := sink(port)
	h.udp[port] = s
	return s, port, nil
}

func unbindUDP(h *host, port int, s packetSink) {
	h.mu.Lock()
	if h.udp[port] == s {
		delete(h.udp, port)
	}
	h.mu.Unlock()
}

// sendPacket sends a datagram from a port of src to addr. Datagrams to
// addresses of no host vanish, as they would on a real network.
func (n *Network) sendPacket(src *host, srcPort int, b []byte, addr string) error {
	dst, port, err := n.resolve(addr)
	if err != nil {
		return &net.OpError{Op: "write", Net: "udp", Err: err}
	}
	select {
	case <-n.done:
		return &net.OpError{Op: "write", Net: "udp", Err: net.ErrClosed}
	default:
	}
	src.sentPackets.Add(1)
	src.sentBytes.Add(uint64(len(b)))
	if dst == nil || !n.linkUp(src, dst) || n.lost(src, dst) {
		return nil
	}
	n.schedule(n.latency(src, dst), event{
		src: src, dst: dst, srcPort: srcPort, dstPort: port,
		data: append([]byte(nil), b...),
	})
	return nil
}

// ListenPacket opens a datagram endpoint at a port of a host (0 picks a
// free port), as for DNS over UDP.
func (n *Network) ListenPacket(name string, port int) (net.PacketConn, error) {
	h, err := n.host(name)
	if err != nil {
		return nil, err
	}
	s, _, err := n.bindUDP(h, port, func(port int) packetSink {
		return &packetConn{
			n: n, h: h, port: port,
			addr:     &net.UDPAddr{IP: h.ip, Port: port},
			readable: make(chan struct{}, 1),
			done:     make(chan struct{}),
		}
	})
	if err != nil {
		return nil, err
	}
	return s.(*packetConn), nil
}

type datagram struct {
	data []byte
	from *net.UDPAddr
}

// packetConn is a net.PacketConn on a simulated host.
type packetConn struct {
	n    *Network
	h    *host
	port int
	addr *net.UDPAddr

	mu       sync.Mutex
	q        []datagram
	readable chan struct{}

	done   chan struct{}
	once   sync.Once
	rd, wd deadline
}

func (c *packetConn) deliver(data []byte, from *net.UDPAddr) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.isClosed() || len(c.q) >= packetQueue {
		return false
	}
	c.q = append(c.q, datagram{data, from})
	signal(c.readable)
	return true
}

func (c *packetConn) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *packetConn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "udp", Addr: c.addr, Err: err}
}

// ReadFrom reads one datagram; a buffer too small for it gets its start.
func (c *packetConn) ReadFrom(p []byte) (int, net.Addr, error) {
	for {
		if c.isClosed() {
			return 0, nil, c.opErr("read", net.ErrClosed)
		}
		if c.rd.passed() {
			return 0, nil, c.opErr("read", errTimeout)
		}
		c.mu.Lock()
		if len(c.q) > 0 {
			d := c.q[0]
			c.q[0] = datagram{}
			c.q = c.q[1:]
			if len(c.q) > 0 {
				signal(c.readable)
			}
			c.mu.Unlock()
			return copy(p, d.data), d.from, nil
		}
		c.mu.Unlock()
		select {
		case <-c.readable:
		case <-c.done:
		case <-c.rd.wait():
		}
	}
}

func (c *packetConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	if c.isClosed() {
		return 0, c.opErr("write", net.ErrClosed)
	}
	if c.wd.passed() {
		return 0, c.opErr("write", errTimeout)
	}
	if addr == nil {
		return 0, c.opErr("write", errMissingAddress)
	}
	if err := c.n.sendPacket(c.h, c.port, p, addr.String()); err != nil {
		return 0, err
	}
	return len(p), nil
}

func (c *packetConn) Close() error {
	c.close()
	return nil
}

func (c *packetConn) close() {
	c.once.Do(func() {
		close(c.done)
		unbindUDP(c.h, c.port, c)
		c.rd.stop()
		c.wd.stop()
		c.mu.Lock()
		c.q = nil
		c.mu.Unlock()
	})
}

func (c *packetConn) LocalAddr() net.Addr { return c.addr }

func (c *packetConn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

func (c *packetConn) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *packetConn) SetWriteDeadline(t time.Time) error { c.wd.set(t); return nil }
