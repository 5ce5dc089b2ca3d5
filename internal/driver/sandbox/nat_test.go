package sandbox

import (
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestNATToTheWorld: a machine reaches an address outside the private
// network (a "world" in a network namespace of the test's own, behind a
// veth of the host), and the world sees the host's address, never the
// machine's.
func TestNATToTheWorld(t *testing.T) {
	d := newDriver(t, testConfig(t))
	m, addr := serving(t, d, 1)

	tag := randHex(4)
	prefix := netip.MustParsePrefix(fmt.Sprintf("2001:db8:%s::/64", tag))
	hostAddr, worldAddr := prefix.Addr().Next(), prefix.Addr().Next().Next()

	// The world: a namespace with a TCP server that says who called.
	seen := make(chan netip.Addr, 4)
	var world netns.NsHandle
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		orig, err := netns.Get()
		if err != nil {
			ready <- err
			return
		}
		world, err = netns.New()
		if err != nil {
			ready <- err
			return
		}
		defer netns.Set(orig)
		ready <- nil
	}()
	if err := <-ready; err != nil {
		t.Fatal(err)
	}
	defer world.Close()

	hostEnd := "flw" + tag
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostEnd}, PeerName: "w0", PeerNamespace: netlink.NsFd(int(world))}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	defer netlink.LinkDel(veth)
	hl, err := netlink.LinkByName(hostEnd)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(hl, &netlink.Addr{IPNet: ipNet(hostAddr, 64), Flags: unix.IFA_F_NODAD}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(hl); err != nil {
		t.Fatal(err)
	}
	wh, err := netlink.NewHandleAt(world)
	if err != nil {
		t.Fatal(err)
	}
	defer wh.Close()
	w0, err := wh.LinkByName("w0")
	if err != nil {
		t.Fatal(err)
	}
	if err := wh.AddrAdd(w0, &netlink.Addr{IPNet: ipNet(worldAddr, 64), Flags: unix.IFA_F_NODAD}); err != nil {
		t.Fatal(err)
	}
	for _, l := range []netlink.Link{w0} {
		if err := wh.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	if lo, err := wh.LinkByName("lo"); err == nil {
		wh.LinkSetUp(lo)
	}
	lnc := make(chan net.Listener, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(world); err != nil {
			t.Error(err)
			lnc <- nil
			return
		}
		ln, err := net.Listen("tcp", netip.AddrPortFrom(worldAddr, 0).String())
		if err != nil {
			t.Error(err)
			lnc <- nil
			return
		}
		lnc <- ln
	}()
	ln := <-lnc
	if ln == nil {
		t.FailNow()
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			ap, _ := netip.ParseAddrPort(c.RemoteAddr().String())
			seen <- ap.Addr()
			c.Write([]byte("world\n"))
			c.Close()
		}
	}()
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)

	if got := probe(t, d, m, "tcp", worldAddr.String(), port); got != "ok" {
		t.Fatalf("machine → the world: %s", got)
	}
	select {
	case from := <-seen:
		if from != hostAddr {
			t.Errorf("the world saw %s, want the host's %s (the machine is %s)", from, hostAddr, addr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the world's server was never called")
	}
}
