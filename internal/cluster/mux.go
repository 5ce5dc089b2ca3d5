package cluster

import (
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/memberlist"
)

// regionTag starts every datagram and every stream of the regional
// memberlist, so that it shares the cluster-wide memberlist's address and
// ports. Memberlist never starts a message with it (its message types are
// small numbers; its label header is 244), and the cluster-wide traffic is
// left untouched, byte for byte what it would be without the mux.
const regionTag byte = 0xFA

// tagWait bounds how long an accepted stream may take to send its first
// byte before it is dropped.
const tagWait = 5 * time.Second

// muxQueue is how many datagrams wait for each memberlist to read them;
// more are dropped, as a full socket buffer drops them.
const muxQueue = 1024

// mux splits one memberlist transport in two: the cluster-wide memberlist
// uses global, the regional one region. The underlying transport is shut
// down when both have been.
type mux struct {
	t       memberlist.Transport
	tagWait time.Duration
	global  *muxPort
	region  *muxPort

	mu      sync.Mutex
	open    int                   // ports not yet shut down
	pending map[net.Conn]struct{} // accepted streams whose first byte is awaited
	done    chan struct{}
	wg      sync.WaitGroup
}

// muxPort is one memberlist's side of a mux.
type muxPort struct {
	m       *mux
	tagged  bool
	packets chan *memberlist.Packet
	streams chan net.Conn
	done    chan struct{}
	once    sync.Once
}

var _ memberlist.NodeAwareTransport = (*muxPort)(nil)

func newMux(t memberlist.Transport, tagWait time.Duration) *mux {
	m := &mux{t: t, tagWait: tagWait, open: 2, pending: map[net.Conn]struct{}{}, done: make(chan struct{})}
	port := func(tagged bool) *muxPort {
		return &muxPort{m: m, tagged: tagged, packets: make(chan *memberlist.Packet, muxQueue),
			streams: make(chan net.Conn), done: make(chan struct{})}
	}
	m.global, m.region = port(false), port(true)
	m.wg.Add(2)
	go m.dispatchPackets()
	go m.dispatchStreams()
	return m
}

func (m *mux) dispatchPackets() {
	defer m.wg.Done()
	in := m.t.PacketCh()
	for {
		select {
		case <-m.done:
			return
		case p := <-in:
			to := m.global
			if len(p.Buf) > 0 && p.Buf[0] == regionTag {
				p.Buf = p.Buf[1:]
				to = m.region
			}
			select {
			case to.packets <- p:
			default:
			}
		}
	}
}

func (m *mux) dispatchStreams() {
	defer m.wg.Done()
	in := m.t.StreamCh()
	for {
		select {
		case <-m.done:
			return
		case c := <-in:
			m.mu.Lock()
			select {
			case <-m.done:
				m.mu.Unlock()
				c.Close()
				continue
			default:
			}
			m.pending[c] = struct{}{}
			m.wg.Add(1)
			m.mu.Unlock()
			go m.route(c)
		}
	}
}

// route reads an accepted stream's first byte and hands the stream to the
// memberlist it is for.
func (m *mux) route(c net.Conn) {
	defer m.wg.Done()
	var b [1]byte
	_ = c.SetReadDeadline(time.Now().Add(m.tagWait))
	_, err := io.ReadFull(c, b[:])
	_ = c.SetReadDeadline(time.Time{})
	m.mu.Lock()
	delete(m.pending, c)
	m.mu.Unlock()
	if err != nil {
		c.Close()
		return
	}
	to, conn := m.global, net.Conn(&peekedConn{Conn: c, first: b[0], unread: true})
	if b[0] == regionTag {
		to, conn = m.region, c
	}
	select {
	case to.streams <- conn:
	case <-to.done:
		c.Close()
	case <-m.done:
		c.Close()
	}
}

// release shuts the underlying transport down once no port uses it, and
// waits for the mux's goroutines.
func (m *mux) release() error {
	m.mu.Lock()
	m.open--
	last := m.open == 0
	m.mu.Unlock()
	if !last {
		return nil
	}
	// Keep reading while the transport shuts down: memberlist's own
	// transport blocks delivering to unbuffered channels until read.
	err := m.t.Shutdown()
	m.mu.Lock()
	close(m.done)
	for c := range m.pending {
		c.Close()
	}
	m.mu.Unlock()
	m.wg.Wait()
	return err
}

// FinalAdvertiseAddr is the underlying transport's: both memberlists
// advertise the same address.
func (p *muxPort) FinalAdvertiseAddr(ip string, port int) (net.IP, int, error) {
	return p.m.t.FinalAdvertiseAddr(ip, port)
}

func (p *muxPort) WriteTo(b []byte, addr string) (time.Time, error) {
	return p.WriteToAddress(b, memberlist.Address{Addr: addr})
}

func (p *muxPort) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	if p.tagged {
		b = append([]byte{regionTag}, b...)
	}
	if na, ok := p.m.t.(memberlist.NodeAwareTransport); ok {
		return na.WriteToAddress(b, a)
	}
	return p.m.t.WriteTo(b, a.Addr)
}

func (p *muxPort) PacketCh() <-chan *memberlist.Packet { return p.packets }

func (p *muxPort) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return p.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (p *muxPort) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	var err error
	if na, ok := p.m.t.(memberlist.NodeAwareTransport); ok {
		c, err = na.DialAddressTimeout(a, timeout)
	} else {
		c, err = p.m.t.DialTimeout(a.Addr, timeout)
	}
	if err != nil || !p.tagged {
		return c, err
	}
	_ = c.SetWriteDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte{regionTag}); err != nil {
		c.Close()
		return nil, err
	}
	_ = c.SetWriteDeadline(time.Time{})
	return c, nil
}

func (p *muxPort) StreamCh() <-chan net.Conn { return p.streams }

// Shutdown stops this port; the underlying transport is shut down with the
// last one.
func (p *muxPort) Shutdown() error {
	var err error
	p.once.Do(func() {
		close(p.done)
		err = p.m.release()
	})
	return err
}

// peekedConn gives back the byte the mux read to route the stream.
type peekedConn struct {
	net.Conn
	first  byte
	unread bool
}

func (c *peekedConn) Read(b []byte) (int, error) {
	if c.unread && len(b) > 0 {
		c.unread = false
		b[0] = c.first
		return 1, nil
	}
	return c.Conn.Read(b)
}
