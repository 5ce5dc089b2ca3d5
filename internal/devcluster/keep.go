package devcluster

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"
)

// A host's addresses on real loopback (API, DNS, edge) outlive the host:
// the cluster binds each once and keeps the socket until it closes, and
// each start of the host — the first, and every revive after a kill —
// serves a lease of it. A killed host's leases are closed; meanwhile the
// cluster refuses what arrives (a connection is closed at once, a datagram
// dropped), as a host whose process died does, and nothing else on the
// machine can take the address: Revive starts the host where it was. (The
// socket closed and bound again would leave moments in which any other
// socket of the machine may take the port.)

// keptSockets is what the cluster keeps of one host.
type keptSockets struct {
	api, dnsTCP, edge *keptListener // edge nil for a host without one
	dnsUDP            *keptPacket
}

func (k *keptSockets) close() {
	for _, l := range []*keptListener{k.api, k.dnsTCP, k.edge} {
		if l != nil {
			l.ln.Close()
		}
	}
	if k.dnsUDP != nil {
		k.dnsUDP.pc.Close()
	}
}

// leaseSlot holds a kept socket's current lease (the zero L: none, the
// host is down).
type leaseSlot[L comparable] struct {
	mu  sync.Mutex
	cur L
}

func (s *leaseSlot[L]) get() L {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cur
}

func (s *leaseSlot[L]) set(l L) {
	s.mu.Lock()
	s.cur = l
	s.mu.Unlock()
}

// clear empties the slot if l is still its lease.
func (s *leaseSlot[L]) clear(l L) {
	s.mu.Lock()
	if s.cur == l {
		var none L
		s.cur = none
	}
	s.mu.Unlock()
}

// keptListener is a listening socket kept for a host; its accept loop
// hands connections to the host's current lease, or closes them.
type keptListener struct {
	ln  net.Listener
	cur leaseSlot[*leasedListener]
}

func keepListener(ln net.Listener) *keptListener {
	k := &keptListener{ln: ln}
	go k.loop()
	return k
}

func (k *keptListener) loop() {
	var delay time.Duration
	for {
		c, err := k.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors and the like: wait a little, as
			// net/http's server does.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if l := k.cur.get(); l == nil || !l.deliver(c) {
			c.Close()
		}
	}
}

// lease is the listener a start of the host serves; its Close leaves the
// socket bound.
func (k *keptListener) lease() net.Listener {
	l := &leasedListener{k: k, conns: make(chan net.Conn), done: make(chan struct{})}
	k.cur.set(l)
	return l
}

type leasedListener struct {
	k     *keptListener
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

// deliver hands c to the lease's Accept; false once the lease is closed.
func (l *leasedListener) deliver(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *leasedListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *leasedListener) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.k.cur.clear(l)
	})
	return nil
}

func (l *leasedListener) Addr() net.Addr { return l.k.ln.Addr() }

// keptPacket is a UDP socket kept for a host; its read loop queues
// datagrams for the host's current lease, or drops them.
type keptPacket struct {
	pc  net.PacketConn
	cur leaseSlot[*leasedPacket]
}

// leaseQueue bounds the datagrams waiting for a lease's reader: past it
// they are dropped, as a full socket buffer drops them.
const leaseQueue = 256

type datagram struct {
	b    []byte
	from net.Addr
}

func keepPacket(pc net.PacketConn) *keptPacket {
	k := &keptPacket{pc: pc}
	go k.loop()
	return k
}

func (k *keptPacket) loop() {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := k.pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(5 * time.Millisecond)
			continue
		}
		l := k.cur.get()
		if l == nil {
			continue
		}
		select {
		case l.in <- datagram{b: append([]byte(nil), buf[:n]...), from: from}:
		default:
		}
	}
}

func (k *keptPacket) lease() net.PacketConn {
	l := &leasedPacket{k: k, in: make(chan datagram, leaseQueue), done: make(chan struct{}), moved: make(chan struct{}, 1)}
	k.cur.set(l)
	return l
}

type leasedPacket struct {
	k    *keptPacket
	in   chan datagram
	done chan struct{}
	once sync.Once

	mu       sync.Mutex
	deadline time.Time     // for reads
	moved    chan struct{} // a read waiting takes the new deadline
}

func (l *leasedPacket) ReadFrom(b []byte) (int, net.Addr, error) {
	for {
		select {
		case <-l.done: // closed wins over a deadline passed, as on a socket
			return 0, nil, net.ErrClosed
		default:
		}
		l.mu.Lock()
		d := l.deadline
		l.mu.Unlock()
		var expired <-chan time.Time
		var t *time.Timer
		if !d.IsZero() {
			t = time.NewTimer(time.Until(d))
			expired = t.C
		}
		select {
		case g := <-l.in:
			stop(t)
			return copy(b, g.b), g.from, nil
		case <-l.done:
			stop(t)
			return 0, nil, net.ErrClosed
		case <-expired:
			return 0, nil, os.ErrDeadlineExceeded
		case <-l.moved:
			stop(t) // the deadline moved: wait for the new one
		}
	}
}

func stop(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}

func (l *leasedPacket) WriteTo(b []byte, to net.Addr) (int, error) {
	select {
	case <-l.done:
		return 0, net.ErrClosed
	default:
	}
	return l.k.pc.WriteTo(b, to)
}

func (l *leasedPacket) Close() error {
	l.once.Do(func() {
		close(l.done)
		l.k.cur.clear(l)
	})
	return nil
}

func (l *leasedPacket) LocalAddr() net.Addr { return l.k.pc.LocalAddr() }

func (l *leasedPacket) SetDeadline(t time.Time) error {
	l.SetReadDeadline(t)
	return l.k.pc.SetWriteDeadline(t)
}

func (l *leasedPacket) SetReadDeadline(t time.Time) error {
	l.mu.Lock()
	l.deadline = t
	l.mu.Unlock()
	select {
	case l.moved <- struct{}{}:
	default:
	}
	return nil
}

func (l *leasedPacket) SetWriteDeadline(t time.Time) error { return l.k.pc.SetWriteDeadline(t) }

// keep returns the sockets kept for host id, binding them on its first
// start (with port 0, below the ephemeral range: ports.go).
func (c *Cluster) keep(id, apiAddr, dnsAddr, edgeAddr string) (*keptSockets, error) {
	c.keptMu.Lock()
	defer c.keptMu.Unlock()
	if ks := c.kept[id]; ks != nil {
		return ks, nil
	}
	ln, err := listenStable(apiAddr)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", apiAddr, err)
	}
	pc, dl, err := listenDNS(dnsAddr)
	if err != nil {
		ln.Close()
		return nil, err
	}
	ks := &keptSockets{api: keepListener(ln), dnsTCP: keepListener(dl), dnsUDP: keepPacket(pc)}
	if edgeAddr != "" {
		eln, err := listenStable(edgeAddr)
		if err != nil {
			ks.close()
			return nil, fmt.Errorf("edge: listen on %s: %w", edgeAddr, err)
		}
		ks.edge = keepListener(eln)
	}
	if c.kept == nil {
		c.kept = map[string]*keptSockets{}
	}
	c.kept[id] = ks
	return ks, nil
}

// closeKept closes every kept socket, once the hosts are closed.
func (c *Cluster) closeKept() {
	c.keptMu.Lock()
	defer c.keptMu.Unlock()
	for id, ks := range c.kept {
		ks.close()
		delete(c.kept, id)
	}
}
