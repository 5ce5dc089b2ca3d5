package layout

import (
	"net/netip"
	"testing"
)

func TestAddressesRoundTrip(t *testing.T) {
	p := Place{Network: 0x1234abcd, Org: 7, Host: 0xfffe}
	for _, m := range []uint64{2, 3, 0xdeadbeef, 1<<MachineBits - 1} {
		a, ok := p.Addr(m)
		if !ok {
			t.Fatalf("Addr(%#x) refused", m)
		}
		got, gm, ok := Locate(a)
		if !ok || got != p || gm != m {
			t.Errorf("Locate(%s) = %+v %#x %v, want %+v %#x", a, got, gm, ok, p, m)
		}
		if !p.HostPrefix().Contains(a) || !OrgPrefix(p.Network, p.Org).Contains(a) || !NetworkPrefix(p.Network).Contains(a) {
			t.Errorf("%s outside its prefixes", a)
		}
	}
	if a, _ := p.Addr(0xdeadbeef); a.String() != "fdaa:1234:abcd:7:fffe:0:dead:beef" {
		t.Errorf("layout moved: %s", a)
	}
	if got := p.HostPrefix().String(); got != "fdaa:1234:abcd:7:fffe::/80" {
		t.Errorf("HostPrefix = %s", got)
	}
	if got := OrgPrefix(p.Network, p.Org).String(); got != "fdaa:1234:abcd:7::/64" {
		t.Errorf("OrgPrefix = %s", got)
	}
	if got := NetworkPrefix(p.Network).String(); got != "fdaa:1234:abcd::/48" {
		t.Errorf("NetworkPrefix = %s", got)
	}
	if got := p.Gateway().String(); got != "fdaa:1234:abcd:7:fffe::1" {
		t.Errorf("Gateway = %s", got)
	}
}

func TestAddrRefuses(t *testing.T) {
	ok := Place{Network: 1, Org: 1, Host: 1}
	for _, c := range []struct {
		p Place
		m uint64
	}{
		{Place{Org: 1, Host: 1}, 5}, {Place{Network: 1, Host: 1}, 5}, {Place{Network: 1, Org: 1}, 5},
		{ok, 0}, {ok, 1}, {ok, 1 << MachineBits},
	} {
		if a, got := c.p.Addr(c.m); got {
			t.Errorf("%+v.Addr(%#x) = %s, want refused", c.p, c.m, a)
		}
	}
}

func TestLocateRefuses(t *testing.T) {
	for _, s := range []string{"fdaa::3", "10.0.0.1", "::ffff:10.0.0.1", "fdab:1:2:3:4::5", "fdaa:0:1:0:1::5", "fdaa:0:1:1:0::5"} {
		if p, _, ok := Locate(netip.MustParseAddr(s)); ok {
			t.Errorf("Locate(%s) = %+v, want not ours", s, p)
		}
	}
	if DNS.String() != "fdaa::3" {
		t.Errorf("DNS = %s", DNS)
	}
}

func TestSameOrg(t *testing.T) {
	a, _ := Place{Network: 9, Org: 1, Host: 1}.Addr(2)
	b, _ := Place{Network: 9, Org: 1, Host: 2}.Addr(2)
	c, _ := Place{Network: 9, Org: 2, Host: 1}.Addr(3)
	d, _ := Place{Network: 8, Org: 1, Host: 1}.Addr(3)
	if !SameOrg(a, b) {
		t.Error("one org across hosts kept apart")
	}
	if SameOrg(a, c) || SameOrg(a, d) || SameOrg(a, DNS) {
		t.Error("different orgs or networks joined")
	}
}

func TestParseNetwork(t *testing.T) {
	if n, err := ParseNetwork("0012abcd"); err != nil || n != 0x12abcd || n.String() != "0012abcd" {
		t.Errorf("ParseNetwork = %v %v", n, err)
	}
	for _, s := range []string{"", "00000000", "12345", "zzzzzzzz", "123456789"} {
		if _, err := ParseNetwork(s); err == nil {
			t.Errorf("ParseNetwork(%q) accepted", s)
		}
	}
}
