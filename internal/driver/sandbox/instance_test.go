package sandbox

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
)

func TestInstanceNames(t *testing.T) {
	dir := t.TempDir()
	id, err := LoadInstance(dir)
	if err != nil {
		t.Fatal(err)
	}
	if again, err := LoadInstance(dir); err != nil || again != id {
		t.Fatalf("second load: %q %v, want %q", again, err, id)
	}
	if other, _ := LoadInstance(t.TempDir()); other == id {
		t.Fatalf("two dirs share the instance id %s", id)
	}
	last, err := InstanceNames(id, MaxHostIndex)
	if err != nil {
		t.Fatal(err)
	}
	if len(last.Bridge) > 15 {
		t.Errorf("bridge %q: longer than an interface name may be", last.Bridge)
	}
	first, _ := InstanceNames(id, 0)
	if first.Bridge == last.Bridge || first.CgroupParent == last.CgroupParent || first.Host == last.Host {
		t.Errorf("hosts 0 and %d share names: %+v %+v", MaxHostIndex, first, last)
	}
	// The hosts of one instance share a 6PN network: the instance id's bits.
	if first.Network != last.Network || first.Network.String() != id {
		t.Errorf("networks %s and %s, want %s", first.Network, last.Network, id)
	}
	for _, bad := range []string{"", "ABCDEF12", "abc", "../../x"} {
		if _, err := InstanceNames(bad, 0); err == nil {
			t.Errorf("instance %q accepted", bad)
		}
	}
	if _, err := InstanceNames(id, MaxHostIndex+1); err == nil {
		t.Error("host index past the maximum accepted")
	}
	os.WriteFile(filepath.Join(dir, instanceFile), []byte("x/../y\n"), 0o644)
	if _, err := LoadInstance(dir); err == nil {
		t.Error("a damaged instance file accepted")
	}
}

// instanceConfig is a test config whose machine-global names are left to
// the driver: its instance's, from the instance id in its state dir.
func instanceConfig(t *testing.T) Config {
	cfg := testConfig(t)
	cfg.Bridge, cfg.CgroupParent, cfg.HostPrefix, cfg.Network, cfg.Host = "", "", netip.Prefix{}, 0, 0
	cfg.StateDir = t.TempDir()
	return cfg
}

// cleanupInstance removes what a driver of cfg's instance may have left.
func cleanupInstance(t *testing.T, d *Driver) {
	names := d.cfg
	t.Cleanup(func() {
		newFilter(names.Bridge, names.Network).close(true)
		if l, err := netlink.LinkByName(names.Bridge); err == nil {
			netlink.LinkDel(l)
		}
		if cg, err := detectCgroups(names.CgroupParent); err == nil {
			for _, r := range cg.roots {
				removeCgroupDir(r)
			}
		}
	})
}

// TestInstancesApart runs two drivers of two instances on this machine, as
// two Flames would, and tears one down: the other's bridge, cgroups, spare
// init and machine are untouched, and a driver restarted on its state
// finds the same names and adopts its machine.
func TestInstancesApart(t *testing.T) {
	cfgA := instanceConfig(t)
	cfgB := instanceConfig(t)
	// Two random instances share a 6PN network only when their ids are
	// equal: then the second driver would be refused. Not here.
	idA, _ := LoadInstance(cfgA.StateDir)
	idB, _ := LoadInstance(cfgB.StateDir)
	for idA == idB {
		os.Remove(filepath.Join(cfgB.StateDir, instanceFile))
		idB, _ = LoadInstance(cfgB.StateDir)
	}
	a := newDriver(t, cfgA)
	cleanupInstance(t, a)
	b := newDriver(t, cfgB)
	cleanupInstance(t, b)
	want, _ := InstanceNames(idB, 0)
	if b.cfg.Bridge != want.Bridge || b.cfg.CgroupParent != want.CgroupParent || b.cfg.Network != want.Network || b.cfg.Host != want.Host {
		t.Fatalf("driver B's names %s %s %s/%d, want its instance's %+v", b.cfg.Bridge, b.cfg.CgroupParent, b.cfg.Network, b.cfg.Host, want)
	}
	if a.cfg.Bridge == b.cfg.Bridge || a.cfg.CgroupParent == b.cfg.CgroupParent || a.cfg.Network == b.cfg.Network {
		t.Fatalf("two instances share names: %+v %+v", a.cfg, b.cfg)
	}

	script := `trap "exit 7" TERM; httpd -p [::]:8080 -h /www; while :; do sleep 0.05; done`
	specA, specB := testSpec(t, "busybox", "-c", script), testSpec(t, "busybox", "-c", script)
	pa := start(t, a, specA)
	pb := start(t, b, specB)
	addrB, _ := b.PrivateIP(specB)
	if body, _ := httpGet(t, netip.AddrPortFrom(addrB, 8080)); body != "hello from the sandbox\n" {
		t.Fatalf("machine of B: body %q", body)
	}
	spareB := waitSpare(t, b)
	waitSpare(t, a)

	// A's veth cleanup cannot take B's veth, whatever its name.
	if err := a.deleteLink(vethName(specB.MachineID)); err == nil {
		t.Error("driver A deleted driver B's veth")
	}
	if _, err := netlink.LinkByName(vethName(specB.MachineID)); err != nil {
		t.Fatalf("B's veth: %v", err)
	}

	// A goes away for good.
	ctx := context.Background()
	if _, err := pa.Stop(ctx, syscall.SIGTERM, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := a.Cleanup(ctx, specA); err != nil {
		t.Fatal(err)
	}
	a.Close()
	if err := a.Teardown(); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByName(a.cfg.Bridge); err == nil {
		t.Errorf("A's bridge %s outlived its teardown", a.cfg.Bridge)
	}

	// B is whole.
	if !spareB.init.alive() {
		t.Error("A's teardown killed B's spare init")
	}
	select {
	case <-pb.Done():
		t.Fatal("A's teardown ended B's machine")
	default:
	}
	if body, _ := httpGet(t, netip.AddrPortFrom(addrB, 8080)); body != "hello from the sandbox\n" {
		t.Errorf("B's machine after A's teardown: body %q", body)
	}
	if _, err := netlink.LinkByName(b.cfg.Bridge); err != nil {
		t.Errorf("B's bridge: %v", err)
	}
	for _, d := range b.cg.dirs(specB.MachineID) {
		if _, err := os.Stat(d); err != nil {
			t.Errorf("B's machine cgroup: %v", err)
		}
	}

	// A driver restarted on B's state has B's names and adopts its machine.
	handle := pb.Handle()
	b.Close()
	cfgB2 := cfgB
	cfgB2.Bridge, cfgB2.CgroupParent, cfgB2.HostPrefix = "", "", netip.Prefix{}
	b2 := newDriver(t, cfgB2)
	if b2.cfg.Bridge != b.cfg.Bridge || b2.cfg.CgroupParent != b.cfg.CgroupParent || b2.cfg.HostPrefix != b.cfg.HostPrefix {
		t.Fatalf("restarted driver's names %+v, want %+v", b2.cfg, b.cfg)
	}
	p2, err := b2.Adopt(ctx, specB, handle)
	if err != nil {
		t.Fatal(err)
	}
	if e, err := p2.Stop(ctx, syscall.SIGTERM, 5*time.Second); err != nil || e.Code != 7 {
		t.Fatalf("stop adopted machine: %+v %v", e, err)
	}
	if err := b2.Cleanup(ctx, specB); err != nil {
		t.Fatal(err)
	}
	b2.Close()
	if err := b2.Teardown(); err != nil {
		t.Fatal(err)
	}
	for _, r := range b2.cg.roots {
		if _, err := os.Stat(r); err == nil {
			t.Errorf("cgroup %s outlived B's teardown", r)
		}
	}
}

// TestSpareAnyMemory starts machines larger and then smaller than the
// spare's cgroup from the spare init: on cgroup v1 the memory and
// memory+swap limits must be written in the order the kernel accepts.
func TestSpareAnyMemory(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()
	for _, mb := range []int{512, 128, 1024} {
		sp := waitSpare(t, d)
		spec := testSpec(t, "busybox", "-c", "exec sleep 1000")
		spec.MemoryMB = mb
		p := start(t, d, spec)
		if p.Pid() != sp.init.h.Pid {
			t.Errorf("%d MB: started init %d, not the spare %d", mb, p.Pid(), sp.init.h.Pid)
		}
		want := int64(mb) << 20
		dir := d.cg.dirs(spec.MachineID)[0]
		files := []string{"memory.max"}
		if !d.cg.v2 {
			files = []string{"memory.limit_in_bytes", "memory.memsw.limit_in_bytes"}
		}
		for _, f := range files {
			b, err := os.ReadFile(filepath.Join(dir, f))
			if os.IsNotExist(err) && f == "memory.memsw.limit_in_bytes" {
				continue
			}
			if n, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err != nil || n != want {
				t.Errorf("%d MB: %s = %q (%v), want %d", mb, f, b, err, want)
			}
		}
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
}
