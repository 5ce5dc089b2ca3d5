package netsim

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"
)

var (
	errAddrInUse      = syscall.EADDRINUSE
	errRefused        = syscall.ECONNREFUSED
	errReset          = syscall.ECONNRESET
	errUnreachable    = syscall.EHOSTUNREACH
	errMissingAddress = errors.New("missing address")
)

// Listen opens a stream listener at a port of a host (0 picks a free
// port), for HTTP, DNS over TCP, proxies and the like.
func (n *Network) Listen(name string, port int) (net.Listener, error) {
	h, err := n.host(name)
	if err != nil {
		return nil, err
	}
	return n.listen(h, port)
}

func (n *Network) listen(h *host, port int) (*listener, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if port == 0 {
		p, err := h.freePortLocked(func(p int) bool { return h.tcp[p] != nil })
		if err != nil {
			return nil, err
		}
		port = p
	}
	if port < 0 || port > 65535 {
		return nil, &net.AddrError{Err: "invalid port", Addr: h.name}
	}
	addr := &net.TCPAddr{IP: h.ip, Port: port}
	if h.tcp[port] != nil {
		return nil, &net.OpError{Op: "listen", Net: "tcp", Addr: addr, Err: errAddrInUse}
	}
	l := &listener{h: h, port: port, addr: addr, ch: make(chan net.Conn, acceptBacklog), done: make(chan struct{})}
	h.tcp[port] = l
	return l, nil
}

// listener is a net.Listener on a simulated host.
type listener struct {
	h    *host
	port int
	addr *net.TCPAddr
	ch   chan net.Conn // connections waiting for Accept
	done chan struct{}
	once sync.Once
}

func (l *listener) Accept() (net.Conn, error) {
	select {
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	default:
	}
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, &net.OpError{Op: "accept", Net: "tcp", Addr: l.addr, Err: net.ErrClosed}
	}
}

// Close stops accepting; connections not yet accepted are closed.
func (l *listener) Close() error {
	l.once.Do(func() {
		l.h.mu.Lock()
		if l.h.tcp[l.port] == l {
			delete(l.h.tcp, l.port)
		}
		close(l.done)
		l.h.mu.Unlock()
		for {
			select {
			case c := <-l.ch:
				c.Close()
			default:
				return
			}
		}
	})
	return nil
}

func (l *listener) Addr() net.Addr { return l.addr }

// enqueue hands a new connection to the listener at port, reporting
// false when there is none or its backlog is full.
func (h *host) enqueue(port int, c *conn) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	l := h.tcp[port]
	if l == nil {
		return false
	}
	select {
	case l.ch <- c:
		return true
	default:
		return false
	}
}

// DialerFrom returns a dial function for connections from a host, in the
// shape of net/http's Transport.DialContext. Only "tcp" networks work.
func (n *Network) DialerFrom(from string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		switch network {
		case "tcp", "tcp4":
		default:
			return nil, &net.OpError{Op: "dial", Net: network, Err: net.UnknownNetworkError(network)}
		}
		return n.Dial(ctx, from, addr)
	}
}

// Dial opens a stream from a host to addr ("ip:port" or "name:port"). It
// returns after a round trip; a port nobody listens on is refused. While
// the link is partitioned or either host is dead it waits, until the link
// is back or ctx ends.
func (n *Network) Dial(ctx context.Context, from string, addr string) (net.Conn, error) {
	src, err := n.host(from)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: err}
	}
	c, err := n.dial(ctx, src, addr)
	if err != nil {
		return nil, err
	}
	return c, nil
}

func (n *Network) dial(ctx context.Context, src *host, addr string) (*conn, error) {
	dst, port, err := n.resolve(addr)
	if err != nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: err}
	}
	if dst == nil {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: &net.AddrError{Err: errUnreachable.Error(), Addr: addr}}
	}
	raddr := &net.TCPAddr{IP: dst.ip, Port: port}
	fail := func(err error) (*conn, error) {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: raddr, Err: err}
	}
	// The SYN goes out once the link is up and must find it still up when
	// it arrives; otherwise it is sent again.
	for {
		for {
			changed := n.topology()
			if n.linkUp(src, dst) {
				break
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return fail(ctx.Err())
			case <-n.done:
				return fail(net.ErrClosed)
			}
		}
		if err := n.sleep(ctx, n.latency(src, dst)); err != nil {
			return fail(err)
		}
		if n.linkUp(src, dst) {
			break
		}
	}
	client, server, err := n.newConnPair(src, dst, port)
	if err != nil {
		return fail(err)
	}
	accepted := dst.enqueue(port, server)
	if !accepted {
		n.forget(server)
	}
	if err := n.sleep(ctx, n.latency(dst, src)); err != nil {
		client.Close()
		return fail(err)
	}
	if !accepted {
		n.forget(client)
		return fail(errRefused)
	}
	return client, nil
}

// sleep waits for d, ctx or the Network's end.
func (n *Network) sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-n.done:
		return net.ErrClosed
	}
}

// newConnPair makes both ends of a stream from an ephemeral port of src
// to a port of dst.
func (n *Network) newConnPair(src, dst *host, port int) (client, server *conn, err error) {
	src.mu.Lock()
	lport := src.nextPort
	src.nextPort++
	if src.nextPort > lastEphemeral {
		src.nextPort = firstEphemeral
	}
	src.mu.Unlock()
	caddr := &net.TCPAddr{IP: src.ip, Port: lport}
	saddr := &net.TCPAddr{IP: dst.ip, Port: port}
	client = &conn{n: n, self: src, other: dst, local: caddr, remote: saddr}
	server = &conn{n: n, self: dst, other: src, local: saddr, remote: caddr}
	client.in = newInbox(dst, src, client)
	server.in = newInbox(src, dst, server)
	client.out, server.out = server.in, client.in
	client.peer, server.peer = server, client
	client.done, server.done = make(chan struct{}), make(chan struct{})
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, nil, net.ErrClosed
	}
	n.conns[client] = struct{}{}
	n.conns[server] = struct{}{}
	return client, server, nil
}

// forget drops a connection end that was never handed out.
func (n *Network) forget(c *conn) {
	c.once.Do(func() { close(c.done) })
	n.mu.Lock()
	delete(n.conns, c)
	n.mu.Unlock()
}

// inbox is what has arrived at one end of a stream and not been read.
type inbox struct {
	src, dst *host // the link it is fed over
	owner    *conn // the end that reads it

	mu       sync.Mutex
	chunks   [][]byte
	eof      bool
	queued   int     // bytes written towards it and not yet read or dropped
	stalled  []event // segments held while the link is down
	readable chan struct{}
	writable chan struct{}
}

func newInbox(src, dst *host, owner *conn) *inbox {
	return &inbox{src: src, dst: dst, owner: owner,
		readable: make(chan struct{}, 1), writable: make(chan struct{}, 1)}
}

// acceptLocked takes a segment in; in.mu held.
func (in *inbox) acceptLocked(e *event) {
	if e.eof {
		in.eof = true
		signal(in.readable)
		return
	}
	in.dst.recvBytes.Add(uint64(len(e.data)))
	if in.owner.isClosed() {
		in.queued -= len(e.data)
		signal(in.writable)
		return
	}
	in.chunks = append(in.chunks, e.data)
	signal(in.readable)
}

// deliverSegment delivers a due segment, or holds it while its link is
// down (or earlier segments are held), as TCP would keep retransmitting.
func (n *Network) deliverSegment(e *event) {
	in := e.in
	in.mu.Lock()
	defer in.mu.Unlock()
	if len(in.stalled) > 0 || !n.linkUp(in.src, in.dst) {
		in.stalled = append(in.stalled, *e)
		if len(in.stalled) == 1 {
			n.stallMu.Lock()
			n.stalled[in] = struct{}{}
			n.stallMu.Unlock()
		}
		return
	}
	in.acceptLocked(e)
}

// flushStalled delivers held segments whose links are up again.
func (n *Network) flushStalled() {
	n.stallMu.Lock()
	set := n.stalled
	n.stalled = map[*inbox]struct{}{}
	n.stallMu.Unlock()
	for in := range set {
		in.mu.Lock()
		if len(in.stalled) > 0 {
			if n.linkUp(in.src, in.dst) {
				for i := range in.stalled {
					in.acceptLocked(&in.stalled[i])
				}
				in.stalled = nil
			} else {
				n.stallMu.Lock()
				n.stalled[in] = struct{}{}
				n.stallMu.Unlock()
			}
		}
		in.mu.Unlock()
	}
}

// conn is one end of a simulated stream.
type conn struct {
	n             *Network
	self, other   *host
	local, remote *net.TCPAddr
	in            *inbox // what arrives here
	out           *inbox // the peer's inbox
	peer          *conn

	wmu    sync.Mutex
	lastAt int64 // when the last segment sent is due; keeps writes in order

	done   chan struct{}
	once   sync.Once
	rd, wd deadline
}

func (c *conn) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

func (c *conn) opErr(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.local, Addr: c.remote, Err: err}
}

func (c *conn) Read(p []byte) (int, error) {
	in := c.in
	for {
		if c.isClosed() {
			return 0, c.opErr("read", net.ErrClosed)
		}
		if c.rd.passed() {
			return 0, c.opErr("read", errTimeout)
		}
		in.mu.Lock()
		if len(in.chunks) > 0 {
			k := 0
			for k < len(p) && len(in.chunks) > 0 {
				m := copy(p[k:], in.chunks[0])
				k += m
				if m == len(in.chunks[0]) {
					in.chunks[0] = nil
					in.chunks = in.chunks[1:]
				} else {
					in.chunks[0] = in.chunks[0][m:]
				}
			}
			in.queued -= k
			if len(in.chunks) > 0 || in.eof {
				signal(in.readable)
			}
			in.mu.Unlock()
			signal(in.writable)
			return k, nil
		}
		eof := in.eof
		in.mu.Unlock()
		if eof {
			return 0, io.EOF
		}
		if len(p) == 0 {
			return 0, nil
		}
		select {
		case <-in.readable:
		case <-c.done:
		case <-c.rd.wait():
		}
	}
}

func (c *conn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	out := c.out
	written := 0
	for written < len(p) {
		if c.isClosed() {
			return written, c.opErr("write", net.ErrClosed)
		}
		if c.wd.passed() {
			return written, c.opErr("write", errTimeout)
		}
		if c.peerGone() {
			return written, c.opErr("write", errReset)
		}
		out.mu.Lock()
		room := streamWindow - out.queued
		if room <= 0 {
			out.mu.Unlock()
			select {
			case <-out.writable:
			case <-c.done:
			case <-c.wd.wait():
			}
			continue
		}
		k := min(len(p)-written, room, maxSegment)
		out.queued += k
		out.mu.Unlock()

		data := append([]byte(nil), p[written:written+k]...)
		written += k
		c.self.sentBytes.Add(uint64(k))
		c.send(event{data: data})
	}
	return written, nil
}

// send schedules a segment to the peer after the link's latency, never
// before the previous one; c.wmu held.
func (c *conn) send(e event) {
	at := max(c.n.now()+int64(c.n.latency(c.self, c.other)), c.lastAt)
	c.lastAt = at
	e.at = at
	e.src, e.dst, e.in = c.self, c.other, c.out
	c.n.sched.push(e)
}

// peerGone reports whether the peer has closed and its end of stream has
// reached us: further writes would be answered with a reset.
func (c *conn) peerGone() bool {
	if !c.peer.isClosed() {
		return false
	}
	c.in.mu.Lock()
	defer c.in.mu.Unlock()
	return c.in.eof
}

// Close closes this end; the peer reads the end of the stream after all
// data written before it.
func (c *conn) Close() error {
	first := false
	c.once.Do(func() {
		first = true
		close(c.done)
	})
	if !first {
		return nil
	}
	c.rd.stop()
	c.wd.stop()
	// Unread data is dropped, and the peer's writer must not wait on it.
	c.in.mu.Lock()
	for _, b := range c.in.chunks {
		c.in.queued -= len(b)
	}
	c.in.chunks = nil
	c.in.mu.Unlock()
	signal(c.in.writable)

	c.wmu.Lock()
	c.send(event{eof: true})
	c.wmu.Unlock()

	c.n.mu.Lock()
	delete(c.n.conns, c)
	c.n.mu.Unlock()
	return nil
}

func (c *conn) LocalAddr() net.Addr  { return c.local }
func (c *conn) RemoteAddr() net.Addr { return c.remote }

func (c *conn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}

func (c *conn) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *conn) SetWriteDeadline(t time.Time) error { c.wd.set(t); return nil }
