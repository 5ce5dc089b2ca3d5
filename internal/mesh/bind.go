package mesh

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"golang.zx2c4.com/wireguard/conn"
)

// PacketBind is a conn.Bind over any datagram endpoint: Listen opens one at
// a port (0: any). `flame dev` listens on its simulated network
// (netsim.Network.ListenPacket), so the tunnels between its hosts pay the
// latency, loss and partitions of the links between them.
type PacketBind struct {
	Listen func(port int) (net.PacketConn, error)

	mu sync.Mutex
	pc net.PacketConn
}

var _ conn.Bind = (*PacketBind)(nil)

// endpoint is a peer's address on a PacketBind.
type endpoint netip.AddrPort

func (e endpoint) ClearSrc()           {}
func (e endpoint) SrcToString() string { return "" }
func (e endpoint) DstToString() string { return netip.AddrPort(e).String() }
func (e endpoint) DstToBytes() []byte {
	b, _ := netip.AddrPort(e).MarshalBinary()
	return b
}
func (e endpoint) DstIP() netip.Addr { return netip.AddrPort(e).Addr() }
func (e endpoint) SrcIP() netip.Addr { return netip.Addr{} }

// Open listens at port and returns the one function that receives.
func (b *PacketBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc != nil {
		return nil, 0, conn.ErrBindAlreadyOpen
	}
	pc, err := b.Listen(int(port))
	if err != nil {
		return nil, 0, fmt.Errorf("mesh bind: %w", err)
	}
	ap, err := netip.ParseAddrPort(pc.LocalAddr().String())
	if err != nil {
		pc.Close()
		return nil, 0, fmt.Errorf("mesh bind: local address %s: %w", pc.LocalAddr(), err)
	}
	b.pc = pc
	recv := func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, from, err := pc.ReadFrom(packets[0])
		if err != nil {
			return 0, err
		}
		ap, err := netip.ParseAddrPort(from.String())
		if err != nil {
			// Not an address a peer could have: dropped.
			return 0, nil
		}
		sizes[0] = n
		eps[0] = endpoint(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		return 1, nil
	}
	return []conn.ReceiveFunc{recv}, ap.Port(), nil
}

// Close closes the endpoint; its receive function then fails.
func (b *PacketBind) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.pc == nil {
		return nil
	}
	err := b.pc.Close()
	b.pc = nil
	return err
}

// SetMark does nothing: there is no socket to mark.
func (b *PacketBind) SetMark(uint32) error { return nil }

// Send sends each packet to ep.
func (b *PacketBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	e, ok := ep.(endpoint)
	if !ok {
		return conn.ErrWrongEndpointType
	}
	b.mu.Lock()
	pc := b.pc
	b.mu.Unlock()
	if pc == nil {
		return net.ErrClosed
	}
	to := net.UDPAddrFromAddrPort(netip.AddrPort(e))
	var errs []error
	for _, buf := range bufs {
		if _, err := pc.WriteTo(buf, to); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ParseEndpoint reads "ip:port".
func (b *PacketBind) ParseEndpoint(s string) (conn.Endpoint, error) {
	ap, err := netip.ParseAddrPort(s)
	if err != nil {
		return nil, err
	}
	return endpoint(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())), nil
}

// BatchSize is 1: one datagram per call.
func (b *PacketBind) BatchSize() int { return 1 }
