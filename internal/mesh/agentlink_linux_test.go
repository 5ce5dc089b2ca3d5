package mesh

import (
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// newNS makes a network namespace, closed at the end of the test (it goes
// with its last reference, and everything in it).
func newNS(t *testing.T) netns.NsHandle {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	netns.Set(orig)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	return ns
}

// TestAgentLinksOverRealUDP runs two hosts as `flame agent`s run: each in
// a network namespace of its own (a bridge with a machine behind it), the
// cluster's /48 routed into its TUN in the main table, the tunnel over the
// kernel's UDP across a veth between the hosts. A machine of one reaches
// its org's machine on the other; closed, a link leaves no TUN or route.
func TestAgentLinksOverRealUDP(t *testing.T) {
	tag := randTag(t)
	network := layout.Network(0xfc000000 | uint32(time.Now().UnixNano()&0xffffff))
	nsA, nsB := newNS(t), newNS(t)
	under := []netip.Addr{netip.MustParseAddr("192.168.77.1"), netip.MustParseAddr("192.168.77.2")}

	// The underlay: a veth between the two hosts' namespaces.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mu" + tag, Namespace: netlink.NsFd(nsA)}, PeerName: "mv" + tag, PeerNamespace: netlink.NsFd(nsB)}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("underlay veth: %v", err)
	}
	for i, ns := range []netns.NsHandle{nsA, nsB} {
		name := []string{"mu" + tag, "mv" + tag}[i]
		nh, err := netlink.NewHandleAt(ns)
		if err != nil {
			t.Fatal(err)
		}
		l, err := nh.LinkByName(name)
		if err == nil {
			err = nh.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: under[i].AsSlice(), Mask: net.CIDRMask(24, 32)}})
		}
		if err == nil {
			err = nh.LinkSetUp(l)
		}
		if lo, lerr := nh.LinkByName("lo"); lerr == nil {
			nh.LinkSetUp(lo)
		}
		nh.Close()
		if err != nil {
			t.Fatalf("underlay in host %d: %v", i, err)
		}
	}

	hosts := make([]*kernelHost, 2)
	for i, ns := range []netns.NsHandle{nsA, nsB} {
		inNS(t, ns, func() {
			h := newKernelHost(t, tag, network, layout.Host(i+1), 7)
			link, err := OpenLink(LinkConfig{Name: LinkName(tag, 0), Network: network})
			if err != nil {
				t.Fatal(err)
			}
			key, err := NewPrivateKey()
			if err != nil {
				t.Fatal(err)
			}
			// The bind's sockets are made in this namespace, by Up.
			h.mesh, err = New(Config{HostID: h.id, Network: network, Host: h.num, Key: key, Link: link,
				Bind: conn.NewStdNetBind(), Advertise: under[i]})
			if err != nil {
				link.Close()
				t.Fatal(err)
			}
			h.link = link
			h.facts = &cluster.Host{ID: h.id, Status: cluster.StatusAlive, Addrs: map[string]string{},
				Machines: []*cluster.Machine{{ID: "m" + h.id, PrivateIP: h.addr.String()}}}
			Advertise(h.facts.Addrs, h.mesh.PublicKey(), h.mesh.Endpoint())
			hosts[i] = h
		})
	}
	a, b := hosts[0], hosts[1]
	defer func() {
		for i, ns := range []netns.NsHandle{nsA, nsB} {
			inNS(t, ns, func() { hosts[i].mesh.Close() })
		}
	}()
	c := meshAndDial(t, a, b)
	defer c.Close()
	if _, err := roundTrip(c, []byte("over real UDP")); err != nil {
		t.Fatal(err)
	}

	// The route is the main table's, the TUN's; Close takes both.
	inNS(t, nsA, func() {
		name := a.link.cfg.Name
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_V6, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, r := range routes {
			if r.Dst != nil && r.Dst.String() == layout.NetworkPrefix(network).String() && r.LinkIndex == a.link.index {
				found = true
			}
		}
		if !found {
			t.Errorf("no route of %s into %s in the main table", layout.NetworkPrefix(network), name)
		}
		a.mesh.Close()
		if _, err := netlink.LinkByName(name); err == nil {
			t.Errorf("TUN %s still there after Close", name)
		}
	})
}
