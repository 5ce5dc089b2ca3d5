package sandbox

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// Machines ask layout.DNS (fdaa::3) for names. The bridge holds that address
// (/128, the same on every Flame's bridge of this machine), and the
// sockets that answer it are bound to it and to the bridge
// (SO_BINDTODEVICE): several Flames on one machine each answer their own
// machines, the kernel telling their sockets apart by device. The driver's
// filter lets machines send only DNS to it (see filter.go).

// Network is the private network the driver's machines are in (zero for a
// legacy instance, whose machines have no org).
// A rootless driver's machines are in none (0): they have no 6PN address
// and no DNS (see rootless.go).
func (d *Driver) Network() layout.Network {
	if d.rl != nil {
		return 0
	}
	return d.cfg.Network
}

// DNSSockets gives the bridge layout.DNS and returns a UDP and a TCP socket
// on port 53 of it, bound to the bridge, for the caller to serve (and
// close). Only a driver with a Network has them.
func (d *Driver) DNSSockets() (net.PacketConn, net.Listener, error) {
	if !d.layoutMode() {
		return nil, nil, errors.New("dns sockets: a legacy instance's machines have no org")
	}
	brIndex, err := d.ensureBridge()
	if err != nil {
		return nil, nil, err
	}
	br := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: brIndex}}
	a := &netlink.Addr{IPNet: ipNet(layout.DNS, 128), Flags: unix.IFA_F_NODAD}
	if err := netlink.AddrAdd(br, a); err != nil && !errors.Is(err, unix.EEXIST) {
		return nil, nil, fmt.Errorf("dns sockets: address %s on %s: %w", layout.DNS, d.cfg.Bridge, err)
	}
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE, d.cfg.Bridge)
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	addr := netip.AddrPortFrom(layout.DNS, 53).String()
	pc, err := lc.ListenPacket(context.Background(), "udp6", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns sockets: %w", err)
	}
	ln, err := lc.Listen(context.Background(), "tcp6", addr)
	if err != nil {
		pc.Close()
		return nil, nil, fmt.Errorf("dns sockets: %w", err)
	}
	return pc, ln, nil
}
