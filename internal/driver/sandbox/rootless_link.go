package sandbox

// The inside half of a rootless sandbox's outbound traffic (see
// rootless_out.go for the driver's half). The init, which holds
// CAP_NET_ADMIN and CAP_NET_RAW over the sandbox's network namespace (its
// user namespace owns it), makes there a veth pair: eth0, the machine's,
// with its addresses, default routes through the gateway and the gateway's
// link address fixed (static neighbours: nothing to resolve), and its peer
// outLink, with no address, on which it opens a packet socket. The
// driver asks for a copy of that socket over the init's command socket
// ("link"), as it asks for connections ("dial"), and reads and writes the
// machine's frames on it. A packet socket needs no device node: a TUN
// device would need /dev/net/tun opened by the user, which hosts often
// keep to root. The workload has neither capability: it can change neither
// the devices, addresses and routes nor open packet sockets.

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The addresses of a rootless sandbox's outbound network, the same in
// every sandbox (each has its own network namespace and its own stack in
// the driver): the machine's, and the gateway's, which is the host's
// loopback seen from inside (see rootless_out.go).
var (
	outAddr4    = netip.MustParseAddr("10.0.2.100")
	outGateway4 = netip.MustParseAddr("10.0.2.2")
	outAddr6    = netip.MustParseAddr("fd00::100")
	outGateway6 = netip.MustParseAddr("fd00::2")
	// outMAC is eth0's link address, outGatewayMAC the gateway's.
	outMAC        = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x64}
	outGatewayMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
)

const (
	outBits4 = 24
	outBits6 = 64
	// outDevice is the machine's device, outLink its peer.
	outDevice = "eth0"
	outLink   = "flame-out"
	// outMTU is the devices' MTU.
	outMTU = 1500
)

// linkFd is, in a rootless sandbox's init, the packet socket on outLink
// (-1 when it could not be made; the machine then has no outbound traffic,
// as its log says).
var (
	linkFd  = -1
	linkErr error
)

// earlyLink makes the link, in an init waiting for its configuration (a
// spare's wait), when its user namespace maps one id: a rootless
// sandbox's (root's map a range, and get their device from the driver).
// Otherwise setupRootless makes it.
func earlyLink() {
	b, err := os.ReadFile("/proc/self/uid_map")
	f := strings.Fields(string(b))
	if err != nil || len(f) != 3 || f[2] != "1" {
		return
	}
	linkFd, linkErr = linkUp()
}

// linkUp makes the devices, addresses, routes and packet socket of a
// rootless sandbox, in the init's network namespace, and returns the
// socket.
func linkUp() (fd int, err error) {
	h, err := netlink.NewHandle()
	if err != nil {
		return -1, err
	}
	defer h.Close()
	attrs := netlink.NewLinkAttrs()
	attrs.Name, attrs.MTU, attrs.HardwareAddr = outDevice, outMTU, outMAC
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: outLink, PeerHardwareAddr: outGatewayMAC}
	if err := h.LinkAdd(veth); err != nil {
		return -1, fmt.Errorf("make %s: %w", outDevice, err)
	}
	eth, err := h.LinkByName(outDevice)
	if err != nil {
		return -1, err
	}
	peer, err := h.LinkByName(outLink)
	if err != nil {
		return -1, err
	}
	// The peer says nothing of its own (no IPv6 link-local address).
	_ = os.WriteFile("/proc/sys/net/ipv6/conf/"+outLink+"/disable_ipv6", []byte("1"), 0)
	for _, l := range []netlink.Link{peer, eth} {
		if err := h.LinkSetUp(l); err != nil {
			return -1, fmt.Errorf("bring up %s: %w", l.Attrs().Name, err)
		}
	}
	idx := eth.Attrs().Index
	if err := h.AddrAdd(eth, &netlink.Addr{IPNet: ipNet(outAddr4, outBits4)}); err != nil {
		return -1, fmt.Errorf("%s address: %w", outDevice, err)
	}
	neigh := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET, State: netlink.NUD_PERMANENT, IP: outGateway4.AsSlice(), HardwareAddr: outGatewayMAC}
	if err := h.NeighAdd(neigh); err != nil {
		return -1, fmt.Errorf("%s gateway: %w", outDevice, err)
	}
	if err := h.RouteAdd(&netlink.Route{LinkIndex: idx, Gw: outGateway4.AsSlice()}); err != nil {
		return -1, fmt.Errorf("%s default route: %w", outDevice, err)
	}
	if v6, _ := os.ReadFile("/proc/sys/net/ipv6/conf/" + outDevice + "/disable_ipv6"); len(v6) > 0 && v6[0] == '0' {
		a := &netlink.Addr{IPNet: ipNet(outAddr6, outBits6), Flags: unix.IFA_F_NODAD}
		if err := h.AddrAdd(eth, a); err != nil {
			return -1, fmt.Errorf("%s address: %w", outDevice, err)
		}
		neigh := &netlink.Neigh{LinkIndex: idx, Family: unix.AF_INET6, State: netlink.NUD_PERMANENT, IP: outGateway6.AsSlice(), HardwareAddr: outGatewayMAC}
		if err := h.NeighAdd(neigh); err != nil {
			return -1, fmt.Errorf("%s gateway (IPv6): %w", outDevice, err)
		}
		r := &netlink.Route{LinkIndex: idx, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, Gw: outGateway6.AsSlice()}
		if err := h.RouteAdd(r); err != nil {
			return -1, fmt.Errorf("%s default route (IPv6): %w", outDevice, err)
		}
	}
	proto := int(htons(unix.ETH_P_ALL))
	fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, fmt.Errorf("packet socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: peer.Attrs().Index}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("packet socket on %s: %w", outLink, err)
	}
	return fd, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// serveLink answers a "link" request on conn, in a rootless sandbox's
// init: it sends its packet socket, or an "error" message.
func serveLink(conn *net.UnixConn) {
	if !inRootless || linkFd < 0 {
		_ = writeMessage(conn, message{Op: "error", Err: "link: this sandbox has no outbound device"})
		return
	}
	_ = sendFiles(conn, []int{linkFd})
}
