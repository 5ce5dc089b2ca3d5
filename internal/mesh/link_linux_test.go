package mesh

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/netsim"
)

// kernelHost is one host of a `flame dev`-like kernel test: a bridge with
// its org's gateway, one machine (a network namespace with a veth into
// the bridge), and its mesh over a TUN.
type kernelHost struct {
	id      string
	num     layout.Host
	bridge  string
	machine netns.NsHandle
	addr    netip.Addr
	link    *Link
	mesh    *Mesh
	facts   *cluster.Host
}

// newKernelHost makes host num's bridge and machine (of org) in this
// kernel, with names no other test or Flame has.
func newKernelHost(t testing.TB, tag string, network layout.Network, num layout.Host, org layout.Org) *kernelHost {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("needs root: bridges, namespaces and TUNs")
	}
	place := layout.Place{Network: network, Org: org, Host: num}
	h := &kernelHost{id: fmt.Sprintf("h%d", num), num: num, bridge: fmt.Sprintf("mb%s%d", tag, num)}
	h.addr, _ = place.Addr(2)

	// The links are removed, at the end, by name in the namespace they
	// were made in (this thread's now), whatever thread the cleanup runs on.
	home, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	hh, err := netlink.NewHandleAt(home)
	if err != nil {
		t.Fatal(err)
	}
	delLink := func(name string) {
		if l, err := hh.LinkByName(name); err == nil {
			hh.LinkDel(l)
		}
	}
	t.Cleanup(func() { hh.Close(); home.Close() })
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: h.bridge}}
	if err := netlink.LinkAdd(br); err != nil {
		t.Fatalf("bridge %s: %v", h.bridge, err)
	}
	t.Cleanup(func() { delLink(br.Name) })
	for _, a := range []*net.IPNet{
		{IP: net.ParseIP("fe80::1"), Mask: net.CIDRMask(64, 128)},
		{IP: place.Gateway().AsSlice(), Mask: net.CIDRMask(128-layout.MachineBits, 128)},
	} {
		if err := netlink.AddrAdd(br, &netlink.Addr{IPNet: a, Flags: unix.IFA_F_NODAD}); err != nil {
			t.Fatalf("bridge address %s: %v", a, err)
		}
	}
	if err := netlink.LinkSetUp(br); err != nil {
		t.Fatal(err)
	}

	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := netns.New()
	netns.Set(orig)
	runtime.UnlockOSThread()
	if err != nil {
		t.Fatalf("machine namespace: %v", err)
	}
	h.machine = ns
	t.Cleanup(func() { ns.Close() })

	veth := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: fmt.Sprintf("mv%s%d", tag, num), MasterIndex: br.Attrs().Index},
		PeerName:  "eth0", PeerNamespace: netlink.NsFd(ns),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatalf("veth: %v", err)
	}
	t.Cleanup(func() { delLink(veth.Name) })
	if err := netlink.LinkSetUp(veth); err != nil {
		t.Fatal(err)
	}
	nh, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer nh.Close()
	eth0, err := nh.LinkByName("eth0")
	if err != nil {
		t.Fatal(err)
	}
	lo, _ := nh.LinkByName("lo")
	nh.LinkSetUp(lo)
	if err := nh.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: h.addr.AsSlice(), Mask: net.CIDRMask(128-layout.MachineBits, 128)}, Flags: unix.IFA_F_NODAD}); err != nil {
		t.Fatal(err)
	}
	if err := nh.LinkSetUp(eth0); err != nil {
		t.Fatal(err)
	}
	if err := nh.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, Gw: net.ParseIP("fe80::1")}); err != nil {
		t.Fatalf("default route: %v", err)
	}
	return h
}

// startMesh gives h its link (keyed on its bridge, as in `flame dev`) and
// its mesh over the simulated network.
func (h *kernelHost) startMesh(t testing.TB, n *netsim.Network, tag string, network layout.Network) {
	t.Helper()
	ip, err := n.AddHost(h.id)
	if err != nil {
		t.Fatal(err)
	}
	h.startMeshOn(t, tag, network, &PacketBind{Listen: func(port int) (net.PacketConn, error) { return n.ListenPacket(h.id, port) }},
		netip.AddrFrom4([4]byte(ip.To4())))
}

// startMeshOn is startMesh over any bind, advertised at ip.
func (h *kernelHost) startMeshOn(t testing.TB, tag string, network layout.Network, bind conn.Bind, ip netip.Addr) {
	t.Helper()
	var err error
	h.link, err = OpenLink(LinkConfig{Name: LinkName(tag, int(h.num)), Network: network, Bridge: h.bridge, LockDir: lockDir(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.link.Close() })
	key, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	h.mesh, err = New(Config{
		HostID: h.id, Network: network, Host: h.num, Key: key, TUN: h.link.TUN(),
		Bind: bind, Advertise: ip,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.mesh.Close() })
	h.facts = &cluster.Host{ID: h.id, Status: cluster.StatusAlive, Addrs: map[string]string{},
		Machines: []*cluster.Machine{{ID: "m" + h.id, PrivateIP: h.addr.String()}}}
	Advertise(h.facts.Addrs, h.mesh.PublicKey(), h.mesh.Endpoint())
}

func lockDir(t testing.TB) string {
	// The real lock dir: the slots are the kernel's, shared with every
	// Flame on the machine.
	return "/run/flame"
}

// inNS runs f with its thread in ns: sockets it opens stay there.
func inNS(t testing.TB, ns netns.NsHandle, f func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig)
	f()
}

func randTag(t testing.TB) string {
	b := make([]byte, 3)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// echo listens on TCP in h's machine and echoes every connection.
// meshAndDial gives a and b each other's facts and connects a's machine
// to an echo server on b's, within patience.
func meshAndDial(t testing.TB, a, b *kernelHost) net.Conn {
	t.Helper()
	for _, h := range []*kernelHost{a, b} {
		if err := h.mesh.Apply([]*cluster.Host{a.facts, b.facts}); err != nil {
			t.Fatal(err)
		}
	}
	addr := b.echo(t)
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	c, err := a.dial(t, ctx, addr)
	if err != nil {
		t.Fatalf("a's machine to %s: %v", addr, err)
	}
	return c
}

func (h *kernelHost) echo(t testing.TB) string {
	t.Helper()
	var ln net.Listener
	inNS(t, h.machine, func() {
		var err error
		if ln, err = net.Listen("tcp6", "[::]:0"); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return net.JoinHostPort(h.addr.String(), port)
}

// dial connects from h's machine.
func (h *kernelHost) dial(t testing.TB, ctx context.Context, addr string) (net.Conn, error) {
	var c net.Conn
	var err error
	inNS(t, h.machine, func() {
		fd, serr := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if serr != nil {
			err = serr
			return
		}
		// A socket made here stays in this namespace; connecting it may
		// happen anywhere.
		f := os.NewFile(uintptr(fd), "tcp")
		defer f.Close()
		err = connectFile(ctx, fd, addr)
		if err == nil {
			c, err = net.FileConn(f)
		}
	})
	return c, err
}

func connectFile(ctx context.Context, fd int, addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return err
	}
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if dl, ok := ctx.Deadline(); ok {
		tv := unix.NsecToTimeval(time.Until(dl).Nanoseconds())
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	}
	return unix.Connect(fd, sa)
}

// roundTrip writes b on c and reads it back, returning how long it took.
func roundTrip(c net.Conn, b []byte) (time.Duration, error) {
	start := time.Now()
	if _, err := c.Write(b); err != nil {
		return 0, err
	}
	if _, err := io.ReadFull(c, b); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

func TestLinkCarriesBridgeTrafficThroughTunnel(t *testing.T) {
	const oneWay = 25 * time.Millisecond
	tag := randTag(t)
	network := layout.Network(0xfe000000 | uint32(time.Now().UnixNano()&0xffffff))
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return oneWay }})
	defer n.Close()
	a := newKernelHost(t, tag, network, 1, 7)
	b := newKernelHost(t, tag, network, 2, 7)
	a.startMesh(t, n, tag, network)
	b.startMesh(t, n, tag, network)
	c := meshAndDial(t, a, b)
	defer c.Close()
	msg := []byte("through the tunnel")
	if _, err := roundTrip(c, msg); err != nil {
		t.Fatal(err)
	}
	// The shared kernel's direct path (bridge to bridge) takes
	// microseconds; only the tunnel over the simulated link pays its
	// latency, both ways.
	d, err := roundTrip(c, msg)
	if err != nil {
		t.Fatal(err)
	}
	if d < 2*oneWay {
		t.Errorf("round trip took %v, under the link's %v: the packets skipped the tunnel", d, 2*oneWay)
	}
	if _, _, sent, _ := n.Stats(a.id); sent == 0 {
		t.Error("a's mesh sent nothing over the simulated network")
	}

	// Closed, the link leaves no rule, table or TUN behind.
	name, table := a.link.cfg.Name, a.link.rule.Table
	a.mesh.Close()
	if err := a.link.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(name); err == nil {
		t.Errorf("TUN %s still there", name)
	}
	rules, _ := netlink.RuleList(netlink.FAMILY_V6)
	for _, r := range rules {
		if r.Table == table {
			t.Errorf("rule %v still there", r)
		}
	}
}
