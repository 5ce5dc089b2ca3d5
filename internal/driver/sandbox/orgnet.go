package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// The private network of a driver with a Network (see Config): each org has
// a /80 of its own on this host, layout.Place{Network, org, Host}, whose
// machine number 1 (the Gateway) the bridge holds while a machine of the
// org is leased an address here; machines take the other numbers, hashed
// from their ids. A sandbox's default route goes through the bridge's
// link-local address, bridgeLinkLocal, the same for every org, so that a
// spare's network is ready before its machine's org is known; its org's
// /80 is on-link (the prefix route of its address).

// bridgeLinkLocal is the bridge's link-local address: the next hop of every
// sandbox's default route.
var bridgeLinkLocal = netip.MustParseAddr("fe80::1")

// layoutMode reports whether the driver gives machines addresses in their
// org's network (else in the one HostPrefix of a legacy instance).
func (d *Driver) layoutMode() bool { return d.cfg.Network != 0 }

// place is where spec's machine is in the private network.
func (d *Driver) place(spec driver.Spec) (layout.Place, error) {
	if spec.Org == 0 {
		return layout.Place{}, fmt.Errorf("machine %s: no org number: its address is in its org's network", spec.MachineID)
	}
	return layout.Place{Network: d.cfg.Network, Org: spec.Org, Host: d.cfg.Host}, nil
}

// machinePrefix is the prefix spec's machine takes its address from: its
// org's on this host, or a legacy instance's one prefix.
func (d *Driver) machinePrefix(spec driver.Spec) (netip.Prefix, error) {
	if d.rl != nil {
		return d.rl.prefix, nil
	}
	if !d.layoutMode() {
		return d.cfg.HostPrefix, nil
	}
	p, err := d.place(spec)
	if err != nil {
		return netip.Prefix{}, err
	}
	return p.HostPrefix(), nil
}

// addrBits is the prefix length a machine's address is given on eth0.
func (d *Driver) addrBits() int {
	if d.layoutMode() {
		return 128 - layout.MachineBits
	}
	return d.cfg.HostPrefix.Bits()
}

// ensureGateway gives the bridge the gateway address of spec's org on this
// host, unless it has it, after checking no other link routes the org's
// prefix here. A legacy instance's bridge has its one gateway already.
func (d *Driver) ensureGateway(spec driver.Spec) error {
	if !d.layoutMode() {
		return nil
	}
	p, err := d.place(spec)
	if err != nil {
		return err
	}
	brIndex, err := d.ensureBridge()
	if err != nil {
		return err
	}
	d.netMu.Lock()
	defer d.netMu.Unlock()
	if d.gateways[p.Org] {
		return nil
	}
	if err := checkPrefixFree(p.HostPrefix(), brIndex); err != nil {
		return err
	}
	br := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: brIndex}}
	a := &netlink.Addr{IPNet: ipNet(p.Gateway(), 128-layout.MachineBits), Flags: unix.IFA_F_NODAD}
	if err := netlink.AddrAdd(br, a); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("gateway of org %d: %w", p.Org, err)
	}
	d.gateways[p.Org] = true
	return nil
}

// releaseAddr frees spec's machine's address and, in its org's network,
// takes the org's gateway off the bridge when no machine of the org holds
// an address on this host any more. Under netMu, so that a start of the
// org's next machine (which leases its address, then ensures the gateway)
// never loses it: either the scan sees the new lease, or the gateway is
// added again after.
func (d *Driver) releaseAddr(spec driver.Spec) error {
	prefix, err := d.machinePrefix(spec)
	if err != nil {
		// No org, so no address in any org's network; a lease of the
		// machine elsewhere still goes.
		return d.leases.release(netip.Prefix{}, spec.MachineID)
	}
	if err := d.leases.release(prefix, spec.MachineID); err != nil {
		return err
	}
	if !d.layoutMode() {
		return nil
	}
	d.netMu.Lock()
	defer d.netMu.Unlock()
	if d.leases.any(prefix) {
		return nil
	}
	p, _ := d.place(spec)
	delete(d.gateways, p.Org)
	br, err := netlink.LinkByName(d.cfg.Bridge)
	if err != nil {
		return nil // no bridge, no gateway
	}
	a := &netlink.Addr{IPNet: ipNet(p.Gateway(), 128-layout.MachineBits)}
	if err := netlink.AddrDel(br, a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove gateway of org %d: %w", p.Org, err)
	}
	return nil
}

// any reports whether some machine holds an address in prefix.
func (l leases) any(prefix netip.Prefix) bool {
	entries, err := os.ReadDir(filepath.Join(l.dir, "addrs"))
	if err != nil {
		return true // unknown: keep what is there
	}
	for _, e := range entries {
		a, err := netip.ParseAddr(strings.ReplaceAll(e.Name(), "_", ":"))
		if err == nil && prefix.Contains(a) {
			return true
		}
	}
	return false
}

// readyLayoutBridge gives a bridge of the layout its link-local next hop,
// and takes from it the addresses of the network that are not a gateway of
// this host (what an earlier layout left: a /64 per host).
func (d *Driver) readyLayoutBridge(br netlink.Link) error {
	if err := d.enableForwarding(); err != nil {
		return err
	}
	ll := &netlink.Addr{IPNet: ipNet(bridgeLinkLocal, 64), Flags: unix.IFA_F_NODAD}
	if err := netlink.AddrAdd(br, ll); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("link-local address: %w", err)
	}
	addrs, err := netlink.AddrList(br, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("addresses: %w", err)
	}
	network := layout.NetworkPrefix(d.cfg.Network)
	clear(d.gateways) // a bridge made again has none
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || !network.Contains(ip) {
			continue
		}
		if p, m, ok := layout.Locate(ip); ok && p.Host == d.cfg.Host && m == 1 {
			ones, _ := a.Mask.Size()
			if ones == 128-layout.MachineBits {
				d.gateways[p.Org] = true
				continue
			}
		}
		if err := netlink.AddrDel(br, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove stale address %s: %w", ip, err)
		}
	}
	return nil
}

// checkHostFree fails when a link other than the bridge (index brIndex, 0
// when there is none yet) routes a prefix of this host in the network: an
// org's /80 here, or anything that holds one. Routes to other hosts' parts
// of the network (a mesh's) and to whole org networks are not this host's.
func checkHostFree(n layout.Network, h layout.Host, brIndex int) error {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("routes of network %s: %w", n, err)
	}
	network := layout.NetworkPrefix(n)
	for _, r := range routes {
		if r.Dst == nil || r.LinkIndex == 0 || r.LinkIndex == brIndex {
			continue
		}
		dst, ok := prefixOf(r.Dst)
		if !ok || !network.Overlaps(dst) || dst.Bits() <= network.Bits() {
			continue
		}
		if p, _, ok := layout.Locate(dst.Addr()); !ok || p.Host != h || dst.Bits() < 128-layout.MachineBits {
			continue
		}
		name := fmt.Sprintf("link %d", r.LinkIndex)
		if l, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
			name = l.Attrs().Name
		}
		return fmt.Errorf("host %d of network %s: %s is already routed to %s: another Flame on this machine uses it", h, n, dst, name)
	}
	return nil
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones).Masked(), true
}

// refilter installs the filter of an adopted machine's veth again: a new
// driver starts from empty tables.
func (d *Driver) refilter(spec driver.Spec) error {
	if d.filter == nil {
		return nil
	}
	l, err := netlink.LinkByName(vethName(spec.MachineID))
	if err != nil {
		return fmt.Errorf("veth of %s: %w", spec.MachineID, err)
	}
	prefix, err := d.machinePrefix(spec)
	if err != nil {
		return err
	}
	addr, ok := d.leases.lookup(prefix, spec.MachineID)
	if !ok {
		return fmt.Errorf("machine %s holds no address", spec.MachineID)
	}
	if err := d.ensureGateway(spec); err != nil {
		return err
	}
	return d.filterPort(spec.MachineID, l.Attrs().Index, addr, spec.Org)
}

// filterPort lets machine id send, from the host end (index) of its veth,
// what its org may, and remembers the port so that teardown finds it even
// when the veth went with the sandbox's namespace.
func (d *Driver) filterPort(id string, index int, addr netip.Addr, org layout.Org) error {
	p := port{index: index, mac: machineMAC(id), addr: addr, org: org}
	d.netMu.Lock()
	old, had := d.ports[id]
	d.netMu.Unlock()
	if had && old.index != index {
		if err := d.filter.forget(old); err != nil {
			return err
		}
	}
	if err := d.filter.allow(p); err != nil {
		return err
	}
	d.netMu.Lock()
	d.ports[id] = p
	d.netMu.Unlock()
	return nil
}

// unfilter removes machine id's elements from the filter, if this driver
// added them. (A driver restarted while a sandbox had ended finds none:
// its elements stay, naming a port that is gone, until the tables are
// made again.) The removal is done in the background: a transaction that
// deletes set elements waits for an RCU grace period (10 ms and more on a
// busy host), and elements that name a port gone let nothing through
// (interface indexes are handed out cyclically, so a new veth does not get
// the old one's before 2^31 more were made). Close waits for it.
func (d *Driver) unfilter(id string) error {
	if d.filter == nil {
		return nil
	}
	d.netMu.Lock()
	p, ok := d.ports[id]
	delete(d.ports, id)
	d.netMu.Unlock()
	if !ok {
		return nil
	}
	d.mu.Lock()
	closed := d.closed
	if !closed {
		d.wg.Add(1)
	}
	d.mu.Unlock()
	if closed {
		return d.filter.forget(p)
	}
	go func() {
		defer d.wg.Done()
		if err := d.filter.forget(p); err != nil {
			d.logger.Warn("remove a machine's filter", "machine", id, "err", err)
		}
	}()
	return nil
}
