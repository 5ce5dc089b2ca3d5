package sandbox

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// linkUpTimeout bounds the wait for a sandbox's interface to come up; past
// it the workload starts anyway, its network a moment late.
const linkUpTimeout = 2 * time.Second

// ensureBridge creates the host's bridge with the gateway address, or finds
// it, and returns its index.
func (d *Driver) ensureBridge() (int, error) {
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
		attrs := netlink.NewLinkAttrs()
		attrs.Name = d.cfg.Bridge
		err = netlink.LinkAdd(&netlink.Bridge{LinkAttrs: attrs})
		if err != nil && !errors.Is(err, unix.EEXIST) {
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
	// No duplicate address detection: the address is ours by
	// configuration, and a tentative address stalls the first dials.
	gw := gatewayAddr(d.cfg.HostPrefix)
	err = netlink.AddrAdd(br, &netlink.Addr{IPNet: ipNet(gw, d.cfg.HostPrefix.Bits()), Flags: unix.IFA_F_NODAD})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return 0, fmt.Errorf("address bridge %s: %w", d.cfg.Bridge, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		return 0, fmt.Errorf("bring up bridge %s: %w", d.cfg.Bridge, err)
	}
	d.bridgeIndex = br.Attrs().Index
	d.logger.Info("bridge ready", "bridge", d.cfg.Bridge, "gateway", gw)
	return d.bridgeIndex, nil
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, 128)}
}

// setupNetwork connects the network namespace of pid to the bridge: a veth
// pair, its inner end "eth0" with addr and a default route through the
// bridge. It returns once eth0 is up.
func (d *Driver) setupNetwork(pid int, machineID string, addr netip.Addr) error {
	brIndex, err := d.ensureBridge()
	if err != nil {
		return err
	}
	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("network namespace of pid %d: %w", pid, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in sandbox: %w", err)
	}
	defer h.Close()
	// Subscribed before eth0 goes up, so its "up" cannot be missed.
	events, err := nl.SubscribeAt(ns, netns.None(), unix.NETLINK_ROUTE, unix.RTNLGRP_LINK)
	if err != nil {
		return fmt.Errorf("watch sandbox links: %w", err)
	}
	defer events.Close()

	host := vethName(machineID)
	attrs := netlink.NewLinkAttrs()
	attrs.Name = host
	attrs.MasterIndex = brIndex
	attrs.Flags = net.FlagUp
	veth := &netlink.Veth{LinkAttrs: attrs, PeerName: "eth0", PeerNamespace: netlink.NsPid(pid)}
	if err := netlink.LinkAdd(veth); err != nil {
		if errors.Is(err, unix.EEXIST) {
			// A leftover of an earlier instance of the machine.
			d.deleteVeth(machineID)
			err = netlink.LinkAdd(veth)
		}
		if err != nil {
			return fmt.Errorf("create veth %s: %w", host, err)
		}
	}
	eth0, err := h.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("sandbox eth0: %w", err)
	}
	if lo, err := h.LinkByName("lo"); err == nil {
		if err := h.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bring up lo: %w", err)
		}
	}
	if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: ipNet(addr, d.cfg.HostPrefix.Bits()), Flags: unix.IFA_F_NODAD}); err != nil {
		return fmt.Errorf("address eth0: %w", err)
	}
	if err := h.LinkSetUp(eth0); err != nil {
		return fmt.Errorf("bring up eth0: %w", err)
	}
	gw := gatewayAddr(d.cfg.HostPrefix)
	if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: net.IP(gw.AsSlice())}); err != nil {
		return fmt.Errorf("default route: %w", err)
	}
	return d.waitLinkUp(h, events, eth0.Attrs().Index)
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
	l, err := netlink.LinkByName(vethName(machineID))
	if _, notFound := err.(netlink.LinkNotFoundError); notFound {
		return nil
	}
	if err != nil {
		return fmt.Errorf("find veth: %w", err)
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
