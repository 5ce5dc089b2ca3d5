package mesh

import (
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
)

func planHost(t *testing.T, id string, status cluster.HostStatus, ep string, ips ...string) *cluster.Host {
	t.Helper()
	k, err := NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	h := &cluster.Host{ID: id, Status: status, Addrs: map[string]string{AddrKey: k.Public().String(), AddrEndpoint: ep}}
	for _, ip := range ips {
		h.Machines = append(h.Machines, &cluster.Machine{ID: "m" + ip, PrivateIP: ip, Host: id})
	}
	return h
}

func TestPlan(t *testing.T) {
	const n = layout.Network(0x11223344)
	at := func(o layout.Org, h layout.Host, m uint64) string {
		a, _ := layout.Place{Network: n, Org: o, Host: h}.Addr(m)
		return a.String()
	}
	other, _ := layout.Place{Network: n + 1, Org: 1, Host: 2}.Addr(9)
	self := planHost(t, "self", cluster.StatusAlive, "10.0.0.1:1", at(1, 1, 2))
	b := planHost(t, "b", cluster.StatusAlive, "10.0.0.2:51820",
		at(1, 2, 2), at(1, 2, 3), at(5, 2, 2), other.String(), "not an address", "10.9.9.9")
	// c claims b's org-5 prefix too (and self's): neither gets those.
	c := planHost(t, "c", cluster.StatusSuspect, "10.0.0.3:51820", at(5, 2, 7), at(1, 1, 9), at(3, 3, 2))
	dead := planHost(t, "dead", cluster.StatusDead, "10.0.0.4:51820", at(1, 4, 2))
	nokey := planHost(t, "nokey", cluster.StatusAlive, "10.0.0.5:51820", at(1, 5, 2))
	nokey.Addrs[AddrKey] = "short"
	noep := planHost(t, "noep", cluster.StatusAlive, "0.0.0.0:51820", at(1, 6, 2))
	twin := planHost(t, "twin", cluster.StatusAlive, "10.0.0.7:51820", at(1, 7, 2))
	twin2 := planHost(t, "twin2", cluster.StatusAlive, "10.0.0.8:51820", at(1, 8, 2))
	twin2.Addrs[AddrKey] = twin.Addrs[AddrKey]

	got := Plan("self", n, 1, []*cluster.Host{self, b, c, dead, nokey, noep, twin, twin2})
	pre := func(o layout.Org, h layout.Host) netip.Prefix {
		return layout.Place{Network: n, Org: o, Host: h}.HostPrefix()
	}
	want := map[string][]netip.Prefix{
		"b": {pre(1, 2)},
		"c": {pre(3, 3)},
	}
	if len(got) != len(want) {
		t.Fatalf("Plan = %+v, want peers b and c only", got)
	}
	for _, p := range got {
		w := want[p.Host]
		if len(p.Prefixes) != len(w) {
			t.Errorf("%s: prefixes %v, want %v", p.Host, p.Prefixes, w)
			continue
		}
		for i := range w {
			if p.Prefixes[i] != w[i] {
				t.Errorf("%s: prefixes %v, want %v", p.Host, p.Prefixes, w)
			}
		}
	}
	if got[0].Host != "b" || got[0].Endpoint.String() != "10.0.0.2:51820" {
		t.Errorf("first peer %+v, want b at its endpoint", got[0])
	}
}

func TestLoadKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	k1, err := LoadKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	k2, err := LoadKey(dir)
	if err != nil || k1 != k2 {
		t.Fatalf("second load: %v, same key %v", err, k1 == k2)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v %v, want 0600", fi.Mode(), err)
	}
	if di, _ := os.Stat(dir); di.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode %v, want 0700", di.Mode().Perm())
	}
	if k1.Public() == (PublicKey{}) {
		t.Error("zero public key")
	}
	if pk, err := ParsePublicKey(k1.Public().String()); err != nil || pk != k1.Public() {
		t.Errorf("public key round trip: %v", err)
	}
	os.Chmod(filepath.Join(dir, KeyFile), 0o644)
	if _, err := LoadKey(dir); err == nil {
		t.Error("a key readable by others was used")
	}
}
