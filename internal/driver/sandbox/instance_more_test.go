package sandbox

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// requireNothingOf fails t when anything of cfg's names exists on the
// machine: its bridge or its cgroup parent.
func requireNothingOf(t *testing.T, cfg Config) {
	t.Helper()
	if _, err := netlink.LinkByName(cfg.Bridge); err == nil {
		t.Errorf("bridge %s left behind", cfg.Bridge)
	}
	cg, err := detectCgroups(cfg.CgroupParent)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range cg.roots {
		if _, err := os.Stat(r); err == nil {
			t.Errorf("cgroup %s left behind", r)
		}
	}
}

// TestPrefixRefusedByNew forces a second driver onto the prefix of a
// first: New refuses it, naming the first's bridge, and makes nothing —
// while the first runs (it holds the prefix), and once it is closed but its
// bridge remains (the bridge routes the prefix).
func TestPrefixRefusedByNew(t *testing.T) {
	cfgA := testConfig(t)
	a := newDriver(t, cfgA)
	waitSpare(t, a) // its bridge is up, with the prefix's route
	spec := testSpec(t, "busybox", "-c", "exec sleep 1000")
	start(t, a, spec) // its bridge has org 1's gateway, with its prefix's route
	cfgB := testConfig(t)
	cfgB.Network, cfgB.Host = cfgA.Network, cfgA.Host

	b, err := New(cfgB)
	if err == nil {
		b.Close()
		t.Fatalf("a second driver on host %d of network %s started", cfgA.Host, cfgA.Network)
	}
	if !strings.Contains(err.Error(), cfgA.Network.String()) || !strings.Contains(err.Error(), cfgA.Bridge) {
		t.Errorf("error %q: want it to name the network and the other's bridge %s", err, cfgA.Bridge)
	}
	requireNothingOf(t, cfgB)

	a.Close()
	b, err = New(cfgB)
	if err == nil {
		b.Close()
		t.Fatalf("a driver started on host %d of network %s, which bridge %s routes", cfgA.Host, cfgA.Network, cfgA.Bridge)
	}
	if !strings.Contains(err.Error(), "routed to "+cfgA.Bridge) {
		t.Errorf("error %q: want it to name bridge %s", err, cfgA.Bridge)
	}
	requireNothingOf(t, cfgB)

	// Once the bridge is gone, the prefix is free again.
	if err := a.Cleanup(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	if err := a.Teardown(); err != nil {
		t.Fatal(err)
	}
	newDriver(t, cfgB)
}

// TestPrefixClaimRace starts drivers on one prefix at once: one gets it.
func TestPrefixClaimRace(t *testing.T) {
	const n = 4
	cfgs := make([]Config, n)
	for i := range cfgs {
		cfgs[i] = testConfig(t)
		cfgs[i].Network, cfgs[i].Host = cfgs[0].Network, cfgs[0].Host
	}
	drivers := make([]*Driver, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range cfgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			drivers[i], errs[i] = New(cfgs[i])
		}()
	}
	wg.Wait()
	started := 0
	for i, d := range drivers {
		if errs[i] != nil {
			requireNothingOf(t, cfgs[i])
			continue
		}
		started++
		t.Cleanup(func() { d.Close() })
	}
	if started != 1 {
		t.Fatalf("%d drivers started on host %d of network %s, want 1: %v", started, cfgs[0].Host, cfgs[0].Network, errs)
	}
}

// TestBridgeRefusedLeavesNothing gives the driver's prefix to another link
// after New: the bridge is refused before it is made.
func TestBridgeRefusedLeavesNothing(t *testing.T) {
	cfg := testConfig(t)
	other := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "fld" + randHex(12)}}
	if err := netlink.LinkAdd(other); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netlink.LinkDel(other) })
	if err := netlink.LinkSetUp(other); err != nil {
		t.Fatal(err)
	}
	gw := layout.Place{Network: cfg.Network, Org: 7, Host: cfg.Host}.Gateway()
	if err := netlink.AddrAdd(other, &netlink.Addr{IPNet: ipNet(gw, 80), Flags: unix.IFA_F_NODAD}); err != nil {
		t.Fatal(err)
	}
	d := &Driver{cfg: cfg, logger: cfg.Logger, gateways: map[layout.Org]bool{}}
	_, err := d.ensureBridge()
	if err == nil || !strings.Contains(err.Error(), other.Name) {
		t.Fatalf("bridge on a prefix %s routes: %v", other.Name, err)
	}
	if _, err := netlink.LinkByName(cfg.Bridge); err == nil {
		t.Errorf("refused bridge %s left behind", cfg.Bridge)
	}
}

// TestInstancePrefixes: the whole instance id is the network, so ids that
// share their first 16 bits do not share one, a host index is the host's
// number + 1, an id of zeros is no network, and legacy prefixes never meet
// an instance's network.
func TestInstancePrefixes(t *testing.T) {
	a, _ := InstanceNames("12340001", 0)
	b, _ := InstanceNames("12340002", 0)
	if a.Network == b.Network {
		t.Errorf("instances 12340001 and 12340002 share network %s", a.Network)
	}
	if a.Network != 0x12340001 || a.Host != 1 || a.HostPrefix.IsValid() {
		t.Errorf("names %+v, want network 12340001, host 1 and no prefix", a)
	}
	last, _ := InstanceNames("ffffffff", MaxHostIndex)
	if last.Network != 0xffffffff || last.Host != MaxHostIndex+1 {
		t.Errorf("names %+v", last)
	}
	if _, err := InstanceNames("00000000", 0); err == nil {
		t.Error("instance 00000000 accepted: it is no network")
	}
	for _, n := range []Names{a, last} {
		net := layout.NetworkPrefix(n.Network)
		if net.Contains(layout.DNS) {
			t.Errorf("network %s holds the nameserver %s", net, layout.DNS)
		}
		for _, h := range []int{0, 1, MaxHostIndex} {
			l, _ := InstanceNames(LegacyInstance, h)
			if l.HostPrefix.Overlaps(net) {
				t.Errorf("legacy prefix %s overlaps %s", l.HostPrefix, net)
			}
		}
	}
}

// TestLoadInstanceLeftovers: what a crash leaves — a temporary file, empty
// or partly written, or (from an earlier version) an empty instance file —
// does not stop the next start.
func TestLoadInstanceLeftovers(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "."+instanceFile+".tmp-1"), nil, 0o644)
	os.WriteFile(filepath.Join(dir, "."+instanceFile+".tmp-2"), []byte("12"), 0o644)
	os.WriteFile(filepath.Join(dir, instanceFile), nil, 0o644)
	id, err := LoadInstance(dir)
	if err != nil || len(id) != instanceIDLen {
		t.Fatalf("load: %q %v", id, err)
	}
	if again, err := LoadInstance(dir); err != nil || again != id {
		t.Fatalf("second load: %q %v, want %q", again, err, id)
	}
	b, _ := os.ReadFile(filepath.Join(dir, instanceFile))
	if string(b) != id+"\n" {
		t.Errorf("instance file holds %q", b)
	}
	// A file with something else than an id is not taken for one.
	os.WriteFile(filepath.Join(dir, instanceFile), []byte("12"), 0o644)
	if _, err := LoadInstance(dir); err == nil {
		t.Error("a partial instance id accepted")
	}
}

// TestLoadInstanceConcurrent: starts racing on a fresh dir agree on one id.
func TestLoadInstanceConcurrent(t *testing.T) {
	for range 20 {
		dir := t.TempDir()
		const n = 8
		ids := make([]string, n)
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ids[i], errs[i] = LoadInstance(dir)
			}()
		}
		wg.Wait()
		for i := range n {
			if errs[i] != nil || ids[i] != ids[0] {
				t.Fatalf("loads disagree: %q %v", ids, errs)
			}
		}
		left, _ := filepath.Glob(filepath.Join(dir, ".*"))
		if len(left) > 0 {
			t.Fatalf("temporary files left: %v", left)
		}
	}
}

// TestLegacyInstance: a data dir an older Flame left — sandbox state, no
// instance id — keeps the names it ran under, and says so in its instance
// file; a fresh dir gets an instance of its own.
func TestLegacyInstance(t *testing.T) {
	oldState := func(dir string) {
		t.Helper()
		for _, d := range []string{"addrs", "machines"} {
			if err := os.MkdirAll(filepath.Join(dir, "leases", d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		os.WriteFile(filepath.Join(dir, "leases", "machines", "e784079b449483"), []byte("fdaa:0:1::e7:8407:9b44:9483"), 0o644)
		os.WriteFile(filepath.Join(dir, "leases", "addrs", "fdaa_0_1__e7_8407_9b44_9483"), []byte("e784079b449483"), 0o644)
	}
	for _, layout := range []struct{ name, state string }{
		{"agent", "sandbox"},     // an agent's data dir
		{"dev", "sea-1/sandbox"}, // a dev cluster's: each host's dir
		{"state dir", ""},        // a driver's own state dir
	} {
		dir := t.TempDir()
		oldState(filepath.Join(dir, layout.state))
		id, err := LoadInstance(dir)
		if err != nil || id != LegacyInstance {
			t.Errorf("%s: instance %q %v, want %q", layout.name, id, err, LegacyInstance)
			continue
		}
		if b, _ := os.ReadFile(filepath.Join(dir, instanceFile)); string(b) != LegacyInstance+"\n" {
			t.Errorf("%s: instance file %q", layout.name, b)
		}
		if again, err := LoadInstance(dir); again != id || err != nil {
			t.Errorf("%s: second load %q %v", layout.name, again, err)
		}
	}
	for h, want := range map[int]Names{
		0: {Bridge: "flame0", CgroupParent: "flame-0", HostPrefix: netip.MustParsePrefix("fdaa:0:1::/64")},
		2: {Bridge: "flame2", CgroupParent: "flame-2", HostPrefix: netip.MustParsePrefix("fdaa:0:3::/64")},
	} {
		if n, err := InstanceNames(LegacyInstance, h); err != nil || n != want {
			t.Errorf("legacy names of host %d: %+v %v, want %+v", h, n, err, want)
		}
	}

	// A fresh dir, or one whose driver of today kept its id first.
	dir := t.TempDir()
	id, err := LoadInstance(dir)
	if err != nil || !validInstance(id) || id == LegacyInstance {
		t.Fatalf("fresh dir: instance %q %v", id, err)
	}
	oldState(filepath.Join(dir, "sandbox"))
	if again, _ := LoadInstance(dir); again != id {
		t.Errorf("instance %q became %q", id, again)
	}
	if n, _ := InstanceNames(id, 0); n.Bridge != "fl"+id+"-0" || n.CgroupParent != "flame-"+id+"-0" {
		t.Errorf("instance names %+v", n)
	}
}

// TestPrefixLockFiles: a closed driver's prefix lock file is gone, so a
// machine that runs many drivers over time is not left a file per prefix
// (package lockfile tests the lock itself).
func TestPrefixLockFiles(t *testing.T) {
	d := newDriver(t, testConfig(t))
	held := d.prefixLock.Name()
	if _, err := os.Stat(held); err != nil {
		t.Fatalf("a running driver's lock file: %v", err)
	}
	d.Close()
	if _, err := os.Stat(held); !os.IsNotExist(err) {
		t.Fatalf("a closed driver's lock file %s: %v", held, err)
	}
}
