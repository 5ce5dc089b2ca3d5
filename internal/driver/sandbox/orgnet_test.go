package sandbox

import (
	"context"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// bridgeAddrs lists the bridge's global IPv6 addresses.
func bridgeAddrs(t *testing.T, d *Driver) []netip.Addr {
	t.Helper()
	br, err := netlink.LinkByName(d.cfg.Bridge)
	if err != nil {
		t.Fatal(err)
	}
	as, err := netlink.AddrList(br, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range as {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && !ip.IsLinkLocalUnicast() {
			out = append(out, ip)
		}
	}
	return out
}

// TestOrgAddresses: machines of two orgs on one host get addresses in their
// orgs' networks (FLY_PRIVATE_IP among them), the bridge the gateway of
// each org while a machine of it is here, and the host reaches both.
func TestOrgAddresses(t *testing.T) {
	d := newDriver(t, testConfig(t))
	a := testSpec(t, "busybox", "-c", "echo ip=$FLY_PRIVATE_IP; exec httpd -f -p [::]:8080 -h /www")
	b := testSpec(t, "busybox", "-c", "echo ip=$FLY_PRIVATE_IP; exec httpd -f -p [::]:8080 -h /www")
	a.Org, b.Org = 3, 9
	start(t, d, a)
	start(t, d, b)
	for _, spec := range []struct {
		org  layout.Org
		name string
	}{{3, "a"}, {9, "b"}} {
		sp := a
		if spec.name == "b" {
			sp = b
		}
		addr, ok := d.PrivateIP(sp)
		if !ok {
			t.Fatalf("machine %s: no private IP", spec.name)
		}
		place, m, ok := layout.Locate(addr)
		want := layout.Place{Network: d.cfg.Network, Org: spec.org, Host: d.cfg.Host}
		if !ok || place != want || m < 2 {
			t.Fatalf("machine %s: address %s is at %+v (machine %d), want %+v", spec.name, addr, place, m, want)
		}
		waitLog(t, sp.LogPath, "ip="+addr.String()+"\n")
		if !slices.Contains(bridgeAddrs(t, d), want.Gateway()) {
			t.Errorf("bridge lacks org %d's gateway %s: %v", spec.org, want.Gateway(), bridgeAddrs(t, d))
		}
		if body, _ := httpGet(t, netip.AddrPortFrom(addr, 8080)); body != "hello from the sandbox\n" {
			t.Errorf("machine %s from the host: %q", spec.name, body)
		}
	}
	// The last machine of org 9 goes, and with it org 9's gateway.
	if err := d.Cleanup(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	gw9 := layout.Place{Network: d.cfg.Network, Org: 9, Host: d.cfg.Host}.Gateway()
	gw3 := layout.Place{Network: d.cfg.Network, Org: 3, Host: d.cfg.Host}.Gateway()
	if got := bridgeAddrs(t, d); slices.Contains(got, gw9) || !slices.Contains(got, gw3) {
		t.Errorf("after org 9's last machine: bridge addresses %v, want %s and not %s", got, gw3, gw9)
	}
	// A spec without an org has no address in any org's network.
	c := testSpec(t, "busybox", "-c", "true")
	c.Org = 0
	if _, err := d.Prepare(context.Background(), c); err == nil {
		t.Error("a machine without an org was prepared")
	}
}
