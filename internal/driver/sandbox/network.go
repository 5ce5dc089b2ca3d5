package sandbox

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/lockfile"
)

// linkUpTimeout bounds the wait for a sandbox's interface to come up; past
// it the workload starts anyway, its network a moment late.
const linkUpTimeout = 2 * time.Second

// ensureBridge creates the host's bridge with the gateway address, or finds
// it, and returns its index. A bridge it creates and cannot ready is
// deleted again.
func (d *Driver) ensureBridge() (_ int, err error) {
	d.netMu.Lock()
	defer d.netMu.Unlock()
	if d.bridgeIndex != 0 {
		if l, err := netlink.LinkByIndex(d.bridgeIndex); err == nil && l.Attrs().Name == d.cfg.Bridge {
			return d.bridgeIndex, nil
		}
		d.bridgeIndex = 0
	}
	br, err := netlink.LinkByName(d.cfg.Bridge)
	if _, notFound := err.(netlink.LinkNotFoundError); notFound {
		// Checked before the bridge is made, so a refused prefix leaves
		// nothing behind.
		if err := d.checkFree(0); err != nil {
			return 0, err
		}
		attrs := netlink.NewLinkAttrs()
		attrs.Name = d.cfg.Bridge
		err = netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs})
		if err == nil {
			defer func() {
				if err != nil {
					if l, lerr := netlink.LinkByName(d.cfg.Bridge); lerr == nil {
						netlink.LinkDel(l)
					}
				}
			}()
		} else if !errors.Is(err, unix.EEXIST) {
			return 0, fmt.Errorf("create bridge %s: %w", d.cfg.Bridge, err)
		}
		br, err = netlink.LinkByName(d.cfg.Bridge)
	}
	if err != nil {
		return 0, fmt.Errorf("bridge %s: %w", d.cfg.Bridge, err)
	}
	if _, ok := br.(*netlink.Bridge); !ok {
		return 0, fmt.Errorf("bridge %s: is a %s, not a bridge", d.cfg.Bridge, br.Type())
	}
	if err := d.checkFree(br.Attrs().Index); err != nil {
		return 0, err
	}
	// No duplicate address detection: the address is ours by
	// configuration, and a tentative address stalls the first dials.
	var gw netip.Addr
	if d.layoutMode() {
		gw = bridgeLinkLocal
		err = d.readyLayoutBridge(br)
	} else {
		gw = gatewayAddr(d.cfg.HostPrefix)
		err = netlink.AddrAdd(br, &netlink.Addr{IPNet: ipNet(gw, d.cfg.HostPrefix.Bits()), Flags: unix.IFA_F_NODAD})
		if errors.Is(err, unix.EEXIST) {
			err = nil
		}
	}
	if err != nil {
		return 0, fmt.Errorf("address bridge %s: %w", d.cfg.Bridge, err)
	}
	if err := d.tuneBridge(br); err != nil {
		return 0, fmt.Errorf("bridge %s: %w", d.cfg.Bridge, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return 0, fmt.Errorf("bring up bridge %s: %w", d.cfg.Bridge, err)
	}
	d.bridgeIndex = br.Attrs().Index
	d.logger.Info("bridge ready", "bridge", d.cfg.Bridge, "gateway", gw)
	return d.bridgeIndex, nil
}

// checkFree fails when another link than the bridge (index brIndex, 0 when
// there is none yet) routes the driver's part of the private network.
func (d *Driver) checkFree(brIndex int) error {
	if d.layoutMode() {
		return checkHostFree(d.cfg.Network, d.cfg.Host, brIndex)
	}
	return checkPrefixFree(d.cfg.HostPrefix, brIndex)
}

// prefixLockDir holds a lock file for each 6PN prefix a driver on this
// machine holds.
const prefixLockDir = "/run/flame"

// claimPrefix makes cfg's prefix the driver's, before it makes anything on
// the machine, and returns the lock that keeps it so until closed: an
// exclusive flock of the prefix's file in prefixLockDir, which holds the
// holder's bridge name (and goes with its process). It fails with an
// error naming the other when another driver holds the prefix, or another
// link than cfg's bridge routes it (a Flame that takes no lock, or a
// driver gone whose bridge and sandboxes remain). Under the lock the
// check and the bridge's address that follows are one step.
func claimPrefix(cfg Config) (*os.File, error) {
	// What is claimed: a legacy instance's prefix, or a host of a network
	// (all of its orgs' prefixes on the host).
	prefix := cfg.HostPrefix.String()
	name := "6pn-" + strings.NewReplacer(":", "_", "/", "-").Replace(prefix) + ".lock"
	if cfg.Network != 0 {
		prefix = fmt.Sprintf("host %d of network %s", cfg.Host, cfg.Network)
		name = fmt.Sprintf("6pn-%s-%d.lock", cfg.Network, cfg.Host)
	}
	if err := os.MkdirAll(prefixLockDir, 0o755); err != nil {
		return nil, fmt.Errorf("lock prefix %s: %w", prefix, err)
	}
	path := filepath.Join(prefixLockDir, name)
	f, err := lockfile.Take(path)
	if err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			holder, _ := os.ReadFile(path)
			return nil, fmt.Errorf("prefix %s is held by another driver on this machine (bridge %q, lock %s): another Flame uses it",
				prefix, strings.TrimSpace(string(holder)), path)
		}
		return nil, fmt.Errorf("lock prefix %s: %w", prefix, err)
	}
	if err := f.Truncate(0); err == nil {
		f.WriteAt([]byte(cfg.Bridge+"\n"), 0)
	}
	own := 0
	if l, err := netlink.LinkByName(cfg.Bridge); err == nil {
		own = l.Attrs().Index
	}
	check := func() error { return checkPrefixFree(cfg.HostPrefix, own) }
	if cfg.Network != 0 {
		check = func() error { return checkHostFree(cfg.Network, cfg.Host, own) }
	}
	if err := check(); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// checkPrefixFree fails when a link other than the bridge (index brIndex,
// 0 when there is none yet) has a route to prefix: another Flame on this
// machine uses the same prefix, and sharing it would send one's traffic to
// the other's machines.
func checkPrefixFree(prefix netip.Prefix, brIndex int) error {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_V6,
		&netlink.Route{Dst: ipNet(prefix.Addr(), prefix.Bits())}, netlink.RT_FILTER_DST)
	if err != nil {
		return fmt.Errorf("routes to %s: %w", prefix, err)
	}
	for _, r := range routes {
		if r.LinkIndex == 0 || r.LinkIndex == brIndex {
			continue
		}
		name := fmt.Sprintf("link %d", r.LinkIndex)
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		return fmt.Errorf("prefix %s is already routed to %s: another Flame on this machine uses it", prefix, name)
	}
	return nil
}

// tuneBridge makes a new port of br forward at once — no spanning tree,
// no forward delay: the ports are veths of this host, which make no
// loops — and fixes br's MAC address, which a bridge otherwise changes
// to the lowest of its ports' as ports come and go, leaving the
// sandboxes' neighbour entries of the gateway stale. It speaks netlink in
// the caller's network namespace, never sysfs, whose /sys/class/net is the
// namespace's that mounted it: an agent started in a network namespace of
// its own without a mount namespace to match would find its bridge
// missing there, or another's of the same name.
func (d *Driver) tuneBridge(br netlink.Link) error {
	// Spanning tree off first: the kernel takes a forward delay of 0 only
	// without it.
	for _, a := range []struct {
		name string
		typ  int
	}{{"stp_state", nl.IFLA_BR_STP_STATE}, {"forward_delay", nl.IFLA_BR_FORWARD_DELAY}} {
		req := nl.NewNetlinkRequest(unix.RTM_NEWLINK, unix.NLM_F_ACK)
		msg := nl.NewIfInfomsg(unix.AF_UNSPEC)
		msg.Index = int32(br.Attrs().Index)
		req.AddData(msg)
		info := nl.NewRtAttr(unix.IFLA_LINKINFO, nil)
		info.AddRtAttr(nl.IFLA_INFO_KIND, nl.NonZeroTerminated("bridge"))
		data := info.AddRtAttr(nl.IFLA_INFO_DATA, nil)
		data.AddRtAttr(a.typ, nl.Uint32Attr(0))
		req.AddData(info)
		if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil {
			return fmt.Errorf("set %s: %w", a.name, err)
		}
	}
	// Set by the user (addr_assign_type NET_ADDR_SET), the address is kept.
	if err := netlink.LinkSetHardwareAddr(br, br.Attrs().HardwareAddr); err != nil {
		return fmt.Errorf("fix MAC address: %w", err)
	}
	return nil
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, 128)}
}

// sandboxNet is a sandbox's network made before the machine is known:
// a veth pair whose host end, IPv6 disabled, is a port of the bridge and
// up, and whose other end is "eth0" in the sandbox, up, with loopback up
// and the routes of the private network (the bridge's prefix on-link, the
// default route through the bridge). A machine's start only names the host
// end after the machine and gives eth0 the machine's address (attach):
// the link is already up, so nothing waits for it.
type sandboxNet struct {
	hostName string
	host     int             // index of the host end
	eth0     int             // index of eth0 in the sandbox
	h        *netlink.Handle // netlink in the sandbox's network namespace
}

// connectSandbox connects the network namespace of pid to the bridge (see
// sandboxNet), with the host end of the veth pair called hostName, and
// returns once eth0 is up.
func (d *Driver) connectSandbox(pid int, hostName string) (_ *sandboxNet, err error) {
	brIndex, err := d.ensureBridge()
	if err != nil {
		return nil, err
	}
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return nil, fmt.Errorf("network namespace of pid %d: %w", pid, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink in sandbox: %w", err)
	}
	sn := &sandboxNet{hostName: hostName, h: h}
	defer func() {
		if err != nil {
			sn.close(true)
		}
	}()
	// Subscribed before eth0 goes up, so its "up" cannot be missed.
	events, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK)
	if err != nil {
		return nil, fmt.Errorf("watch sandbox links: %w", err)
	}
	defer events.Close()

	attrs := netlink.NewLinkAttrs()
	attrs.Name = hostName
	attrs.MasterIndex = brIndex
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsPid(pid)}
	if err := netlink.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// A leftover of an earlier instance of the machine.
			if err = d.deleteLink(hostName); err == nil {
				err = netlink.LinkAdd(veth)
			}
		}
		if err != nil {
			return nil, fmt.Errorf("create veth %s: %w", hostName, err)
		}
	}
	host, err := netlink.LinkByName(hostName)
	if err != nil {
		return nil, fmt.Errorf("veth %s: %w", hostName, err)
	}
	sn.host = host.Attrs().Index
	// A bridge port needs no address of its own: no link-local
	// address, duplicate address detection or router solicitations.
	if err := writeFile("/proc/sys/net/ipv6/conf/"+hostName+"/disable_ipv6", "1"); err != nil {
		return nil, fmt.Errorf("veth %s: disable IPv6: %w", hostName, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return nil, fmt.Errorf("bring up veth %s: %w", hostName, err)
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return nil, fmt.Errorf("sandbox eth0: %w", err)
	}
	sn.eth0 = eth0.Attrs().Index
	if lo, err := h.LinkByName("lo"); err == nil {
		if err := h.LinkSetUp(lo); err != nil {
			return nil, fmt.Errorf("bring up lo: %w", err)
		}
	}
	if err := h.LinkSetUp(eth0); err != nil {
		return nil, fmt.Errorf("bring up eth0: %w", err)
	}
	if d.layoutMode() {
		// The machine's org is not known yet: the default route goes
		// through the bridge's link-local address, the same for every
		// org; the org's prefix comes on-link with the address.
		if err := h.RouteAdd(&netlink.Route{LinkIndex: sn.eth0, Gw: net.IP(bridgeLinkLocal.AsSlice())}); err != nil {
			return nil, fmt.Errorf("default route: %w", err)
		}
	} else {
		// The prefix is on-link whatever the machine's address, which is
		// added without a prefix route of its own (see attach).
		prefix := d.cfg.HostPrefix
		if err := h.RouteAdd(&netlink.Route{LinkIndex: sn.eth0, Dst: ipNet(prefix.Addr(), prefix.Bits())}); err != nil {
			return nil, fmt.Errorf("route to %s: %w", prefix, err)
		}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: sn.eth0, Gw: net.IP(gatewayAddr(prefix).AsSlice())}); err != nil {
			return nil, fmt.Errorf("default route: %w", err)
		}
	}
	if err := d.waitLinkUp(h, events, sn.eth0); err != nil {
		return nil, err
	}
	return sn, nil
}

// attach makes a sandbox's network the machine's: the host end of the veth
// pair gets the machine's name (as an alternative name: an interface must
// be down to be renamed, and its link would have to come up again), eth0
// the machine's address, and the bridge the gateway of the machine's org.
func (d *Driver) attach(sn *sandboxNet, spec driver.Spec, addr netip.Addr) error {
	machineID := spec.MachineID
	if err := d.ensureGateway(spec); err != nil {
		return err
	}
	host := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: sn.host}}
	if name := vethName(machineID); name != sn.hostName {
		err := netlink.LinkAddAltName(host, name)
		if errors.Is(err, unix.EEXIST) {
			// A leftover of an earlier instance of the machine.
			if err = d.deleteLink(name); err == nil {
				err = netlink.LinkAddAltName(host, name)
			}
		}
		if err != nil {
			return fmt.Errorf("name veth %s: %w", name, err)
		}
	}
	eth0 := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: sn.eth0}}
	if err := sn.h.LinkSetHardwareAddr(eth0, machineMAC(machineID)); err != nil {
		return fmt.Errorf("set eth0's hardware address: %w", err)
	}
	flags := unix.IFA_F_NODAD | unix.IFA_F_NOPREFIXROUTE
	if d.layoutMode() {
		flags = unix.IFA_F_NODAD // the org's prefix on-link: its machines here are neighbours
	}
	a := &netlink.Addr{IPNet: ipNet(addr, d.addrBits()), Flags: flags}
	if err := sn.h.AddrAdd(eth0, a); err != nil {
		return fmt.Errorf("address eth0: %w", err)
	}
	if d.filter != nil {
		if err := d.filterPort(machineID, sn.host, addr, spec.Org); err != nil {
			return err
		}
	}
	return nil
}

// machineMAC is the hardware address of machine id's eth0: the same on
// every start of the machine, so what its neighbours (the host, the other
// machines on the bridge) have cached of its address stays true across a
// restart. A new address on each start left them sending to the old one,
// and the machine unreachable, until their entries expired (30 s and
// more). Unicast and locally administered, from a hash of the id.
func machineMAC(id string) net.HardwareAddr {
	h := sha256.Sum256([]byte(id))
	mac := net.HardwareAddr(h[:6])
	mac[0] = mac[0]&^0x01 | 0x02
	return mac
}

// close releases what the driver holds of sn, and with del deletes the
// veth pair (which otherwise goes when the sandbox's network namespace
// does, some time after its last process ended).
func (sn *sandboxNet) close(del bool) {
	if del && sn.host != 0 {
		// A failure leaves it to go with the namespace.
		_ = netlink.LinkDel(&netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: sn.host}})
	}
	sn.h.Close()
}

// waitLinkUp waits for the link index to be operationally up: until then
// the kernel drops what it is sent, and the first connections stall.
func (d *Driver) waitLinkUp(h *netlink.Handle, events *nl.NetlinkSocket, index int) error {
	deadline := time.Now().Add(linkUpTimeout)
	if l, err := h.LinkByIndex(index); err == nil && l.Attrs().OperState == netlink.OperUp {
		return nil
	}
	for {
		left := time.Until(deadline)
		if left <= 0 {
			d.logger.Warn("sandbox link not up in time; starting anyway", "timeout", linkUpTimeout)
			return nil
		}
		tv := unix.NsecToTimeval(left.Nanoseconds())
		if err := events.SetReceiveTimeout(&tv); err != nil {
			return fmt.Errorf("watch sandbox links: %w", err)
		}
		msgs, _, err := events.Receive()
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EWOULDBLOCK) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return fmt.Errorf("watch sandbox links: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != syscall.RTM_NEWLINK {
				continue
			}
			l, err := netlink.LinkDeserialize(nil, m.Data)
			if err == nil && l.Attrs().Index == index && l.Attrs().OperState == netlink.OperUp {
				return nil
			}
		}
	}
}

// deleteVeth removes the host end of machine id's veth pair (and so the
// pair), if it exists.
func (d *Driver) deleteVeth(machineID string) error {
	return d.deleteLink(vethName(machineID))
}

// deleteLink removes the veth called name (or with that alternative name),
// if it exists and is this driver's: a port of its bridge, or of no bridge
// (left when a bridge went before its ports). A link of another kind, or a
// port of another bridge — another Flame's — is left alone, and is an error.
func (d *Driver) deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if _, notFound := err.(netlink.LinkNotFoundError); notFound {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find veth: %w", err)
	}
	if l.Type() != "veth" {
		return fmt.Errorf("link %s: a %s, not a veth of this driver: left alone", name, l.Type())
	}
	if m := l.Attrs().MasterIndex; m != 0 {
		br, err := netlink.LinkByIndex(m)
		if err == nil && br.Attrs().Name != d.cfg.Bridge {
			return fmt.Errorf("veth %s: a port of %s, not of this driver's %s: left alone", name, br.Attrs().Name, d.cfg.Bridge)
		}
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete veth %s: %w", l.Attrs().Name, err)
	}
	return nil
}

// ipv6Enabled reports whether the host has IPv6.
func ipv6Enabled() bool {
	b, err := os.ReadFile("/proc/sys/net/ipv6/conf/all/disable_ipv6")
	return err == nil && len(b) > 0 && b[0] == '0'
}
