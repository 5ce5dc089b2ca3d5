package netsim

import (
	"context"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// transportQueue is how many datagrams wait for memberlist to read them.
const transportQueue = 1024

// Transport is a memberlist transport on one port of a simulated host:
// datagrams and streams at the same port, as memberlist's own transport
// binds UDP and TCP to one port.
type Transport struct {
	n        *Network
	h        *host
	port     int
	addr     *net.UDPAddr
	packetCh chan *memberlist.Packet
	l        *listener
	once     sync.Once

	// done is closed by Shutdown: it ends dials in flight, and the streams
	// this transport opened are closed, as a host that shuts down drops its
	// connections.
	done  chan struct{}
	mu    sync.Mutex
	conns map[net.Conn]struct{}
}

var _ memberlist.NodeAwareTransport = (*Transport)(nil)

// Transport opens a memberlist transport at a port of a host (0 picks a
// free port). Set it as memberlist.Config.Transport; the node advertises
// the host's address and this port whatever the Config's advertise
// settings say.
func (n *Network) Transport(name string, port int) (*Transport, error) {
	h, err := n.host(name)
	if err != nil {
		return nil, err
	}
	t := &Transport{n: n, h: h, packetCh: make(chan *memberlist.Packet, transportQueue),
		done: make(chan struct{}), conns: map[net.Conn]struct{}{}}
	if _, port, err = n.bindUDP(h, port, func(port int) packetSink {
		t.port = port
		t.addr = &net.UDPAddr{IP: h.ip, Port: port}
		return t
	}); err != nil {
		return nil, err
	}
	if t.l, err = n.listen(h, port); err != nil {
		unbindUDP(h, port, t)
		return nil, err
	}
	return t, nil
}

// Addr is the transport's address, "ip:port", to give to Join.
func (t *Transport) Addr() string {
	return net.JoinHostPort(t.h.ip.String(), strconv.Itoa(t.port))
}

// FinalAdvertiseAddr returns the host's address and the transport's port.
func (t *Transport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	return append(net.IP(nil), t.h.ip...), t.port, nil
}

// WriteTo sends a datagram; it never blocks.
func (t *Transport) WriteTo(b []byte, addr string) (time.Time, error) {
	return time.Now(), t.n.sendPacket(t.h, t.port, b, addr)
}

// WriteToAddress sends a datagram to a.Addr.
func (t *Transport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	return t.WriteTo(b, a.Addr)
}

// PacketCh delivers the datagrams that arrive.
func (t *Transport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// DialTimeout opens a stream to addr, giving up after timeout.
func (t *Transport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	go func() {
		select {
		case <-t.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	c, err := t.n.dial(ctx, t.h, addr)
	if err != nil {
		return nil, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	select {
	case <-t.done:
		c.Close()
		return nil, net.ErrClosed
	default:
	}
	t.conns[c] = struct{}{}
	return &trackedConn{Conn: c, t: t}, nil
}

// trackedConn forgets itself on Close.
type trackedConn struct {
	net.Conn
	t *Transport
}

func (c *trackedConn) Close() error {
	c.t.mu.Lock()
	delete(c.t.conns, c.Conn)
	c.t.mu.Unlock()
	return c.Conn.Close()
}

// DialAddressTimeout opens a stream to a.Addr, giving up after timeout.
func (t *Transport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	return t.DialTimeout(a.Addr, timeout)
}

// StreamCh delivers the streams other nodes open to this one.
func (t *Transport) StreamCh() <-chan net.Conn { return t.l.ch }

// Shutdown closes the transport's port. Its channels stay open and go
// quiet.
func (t *Transport) Shutdown() error {
	t.close()
	return nil
}

func (t *Transport) close() {
	t.once.Do(func() {
		unbindUDP(t.h, t.port, t)
		t.l.Close()
		t.mu.Lock()
		close(t.done)
		for c := range t.conns {
			c.Close()
		}
		t.conns = nil
		t.mu.Unlock()
	})
}

func (t *Transport) deliver(data []byte, from *net.UDPAddr) bool {
	select {
	case t.packetCh <- &memberlist.Packet{Buf: data, From: from, Timestamp: time.Now()}:
		return true
	default:
		return false
	}
}
