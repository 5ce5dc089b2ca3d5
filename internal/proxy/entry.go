package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"
)

// An edge behind a front that hands it connections — anycast's stand-in,
// `flame dev`'s global entry — sees the front's address, not the client's.
// So the front opens each connection to the edge with a PROXY protocol
// version 2 header naming the client, on a listener of the edge's that
// only the front reaches (in `flame dev`, one on the simulated network:
// nothing outside the process can connect to it), and the edge takes the
// client's address from that header: Fly-Client-IP, X-Forwarded-For and a
// raw TCP service's own PROXY header name the client. A client's own
// Fly-Client-IP or X-Forwarded-For is never believed: the edge sets the
// first and appends to the second from the connection's address. The
// public listener reads no such header: there a client could name anyone.

// EntryListener wraps a listener only a trusted front connects to: each
// connection must open with a PROXY protocol v2 header (within timeout of
// its first read), and reports the client the header names as its
// RemoteAddr (LOCAL: the connection's own address). A connection without a
// valid header fails its first read and is closed.
func EntryListener(ln net.Listener, timeout time.Duration) net.Listener {
	return &entryListener{Listener: ln, timeout: timeout}
}

type entryListener struct {
	net.Listener
	timeout time.Duration
}

func (l *entryListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &entryConn{Conn: c, timeout: l.timeout}, nil
}

// entryConn reads its PROXY header before anything else: at its first
// Read or RemoteAddr, whichever comes first.
type entryConn struct {
	net.Conn
	timeout time.Duration
	once    sync.Once
	remote  net.Addr
	err     error
	mu      sync.Mutex
	rd      time.Time // the read deadline its user set, restored after the header
}

func (c *entryConn) header() {
	c.once.Do(func() {
		limit := time.Now().Add(c.timeout)
		c.mu.Lock()
		if !c.rd.IsZero() && c.rd.Before(limit) {
			limit = c.rd
		}
		c.Conn.SetReadDeadline(limit)
		c.mu.Unlock()
		c.remote, c.err = parseEntryHeader(c.Conn)
		c.mu.Lock()
		c.Conn.SetReadDeadline(c.rd)
		c.mu.Unlock()
		if c.err != nil {
			c.Conn.Close()
		}
	})
}

func (c *entryConn) Read(b []byte) (int, error) {
	c.header()
	if c.err != nil {
		return 0, c.err
	}
	return c.Conn.Read(b)
}

func (c *entryConn) RemoteAddr() net.Addr {
	c.header()
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

func (c *entryConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rd = t
	return c.Conn.SetReadDeadline(t)
}

func (c *entryConn) SetDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.rd = t
	return c.Conn.SetDeadline(t)
}

// maxProxyV2 bounds the header's address and TLV bytes an entry reads.
const maxProxyV2 = 512

// errProxyHeader: an entry connection did not open with a valid PROXY
// protocol v2 header.
var errProxyHeader = errors.New("no valid PROXY protocol v2 header")

// parseEntryHeader reads a PROXY protocol v2 header from r: the client's
// address for PROXY over TCP, nil for LOCAL (or an address family the
// edge does not use).
func parseEntryHeader(r io.Reader) (net.Addr, error) {
	var fixed [16]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return nil, fmt.Errorf("%w: %v", errProxyHeader, err)
	}
	if string(fixed[:12]) != proxyV2Sig || fixed[12]>>4 != 2 {
		return nil, fmt.Errorf("%w: bad signature or version", errProxyHeader)
	}
	n := int(binary.BigEndian.Uint16(fixed[14:]))
	if n > maxProxyV2 {
		return nil, fmt.Errorf("%w: %d address bytes", errProxyHeader, n)
	}
	rest := make([]byte, n)
	if _, err := io.ReadFull(r, rest); err != nil {
		return nil, fmt.Errorf("%w: %v", errProxyHeader, err)
	}
	switch cmd := fixed[12] & 0x0f; cmd {
	case 0: // LOCAL: the front's own connection
		return nil, nil
	case 1:
	default:
		return nil, fmt.Errorf("%w: command %d", errProxyHeader, cmd)
	}
	var src netip.Addr
	var port uint16
	switch fixed[13] {
	case 0x11: // TCP over IPv4
		if n < 12 {
			return nil, fmt.Errorf("%w: short IPv4 addresses", errProxyHeader)
		}
		src = netip.AddrFrom4([4]byte(rest[:4]))
		port = binary.BigEndian.Uint16(rest[8:])
	case 0x21: // TCP over IPv6
		if n < 36 {
			return nil, fmt.Errorf("%w: short IPv6 addresses", errProxyHeader)
		}
		src = netip.AddrFrom16([16]byte(rest[:16])).Unmap()
		port = binary.BigEndian.Uint16(rest[32:])
	default:
		return nil, nil // UNSPEC or not TCP: the connection's own address
	}
	return net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, port)), nil
}

// EntryHeader is the PROXY protocol v2 header a front sends an edge's
// EntryListener first on a connection for client (dialled from local).
func EntryHeader(client, local net.Addr) []byte {
	return proxyHeaderV2(addrPortOf(client), addrPortOf(local))
}
