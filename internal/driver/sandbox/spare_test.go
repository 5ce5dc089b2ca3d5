package sandbox

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
)

// TestSpare starts a machine from the spare init and checks it is a
// machine like any other: isolated, on the network, adoptable, with an
// exact exit status; and that the spare is replaced.
func TestSpare(t *testing.T) {
	cfg := testConfig(t)
	d1 := newDriver(t, cfg)
	sp := waitSpare(t, d1)
	spec := testSpec(t, "busybox", "-c", `echo "host=$(hostname) procs=$(ls /proc | grep -c '^[0-9]')"; trap "exit 7" TERM; httpd -p [::]:8080 -h /www; while :; do sleep 0.05; done`)
	p1 := start(t, d1, spec)
	if p1.Pid() != sp.init.h.Pid {
		t.Fatalf("started init %d, not the spare %d", p1.Pid(), sp.init.h.Pid)
	}
	if next := waitSpare(t, d1); next.init.h.Pid == sp.init.h.Pid {
		t.Fatal("the spare was not replaced")
	}
	out := waitLog(t, spec.LogPath, "host=")
	if !strings.Contains(out, "host="+spec.MachineID+" ") {
		t.Errorf("workload printed %q", out)
	}
	addr, _ := d1.PrivateIP(spec)
	if body, _ := httpGet(t, netip.AddrPortFrom(addr, 8080)); body != "hello from the sandbox\n" {
		t.Fatalf("body = %q", body)
	}
	handle := p1.Handle()
	d1.Close()

	d2 := newDriver(t, cfg)
	ctx := context.Background()
	p2, err := d2.Adopt(ctx, spec, handle)
	if err != nil {
		t.Fatal(err)
	}
	res, err := d2.Exec(ctx, spec, []string{"hostname"}, nil)
	if err != nil || strings.TrimSpace(string(res.Stdout)) != spec.MachineID {
		t.Fatalf("exec: %v %+v", err, res)
	}
	e, err := p2.Stop(ctx, syscall.SIGTERM, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if e.Code != 7 || e.Unknown {
		t.Fatalf("exit = %+v, want the exact code 7", e)
	}
}

// TestSpareNetwork checks the network a spare is made with: the host end
// of its veth pair a port of the bridge, up, without IPv6, eth0 up inside;
// and that Start names the host end after the machine, and Cleanup removes
// it.
func TestSpareNetwork(t *testing.T) {
	d := newDriver(t, testConfig(t))
	sp := waitSpare(t, d)
	host, err := netlink.LinkByIndex(sp.net.host)
	if err != nil {
		t.Fatal(err)
	}
	br, err := netlink.LinkByName(d.cfg.Bridge)
	if err != nil {
		t.Fatal(err)
	}
	name := host.Attrs().Name
	if !strings.HasPrefix(name, spareLinkPrefix) || len(name) != 15 {
		t.Errorf("spare's host end is called %q", name)
	}
	if host.Attrs().MasterIndex != br.Attrs().Index || host.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("spare's host end: master %d (bridge %d), flags %v", host.Attrs().MasterIndex, br.Attrs().Index, host.Attrs().Flags)
	}
	sysctl := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(string(b))
	}
	if v := sysctl("/proc/sys/net/ipv6/conf/" + name + "/disable_ipv6"); v != "1" {
		t.Errorf("IPv6 on the spare's host end: disable_ipv6 = %s", v)
	}
	eth0, err := sp.net.h.LinkByIndex(sp.net.eth0)
	if err != nil || eth0.Attrs().OperState != netlink.OperUp {
		t.Fatalf("spare's eth0: %v %v", eth0, err)
	}
	// A new port forwards at once, and the bridge's MAC address stays.
	sys := "/sys/class/net/" + d.cfg.Bridge
	for f, want := range map[string]string{"bridge/stp_state": "0", "bridge/forward_delay": "0", "addr_assign_type": "3"} {
		if v := sysctl(filepath.Join(sys, f)); v != want {
			t.Errorf("bridge %s = %s, want %s", f, v, want)
		}
	}

	spec := testSpec(t, "busybox", "-c", "exec sleep 1000")
	p := start(t, d, spec)
	if p.Pid() != sp.init.h.Pid {
		t.Fatalf("started init %d, not the spare %d", p.Pid(), sp.init.h.Pid)
	}
	named, err := netlink.LinkByName(vethName(spec.MachineID))
	if err != nil || named.Attrs().Index != sp.net.host {
		t.Fatalf("veth by the machine's name: %v %v", named, err)
	}
	addr, _ := d.PrivateIP(spec)
	res, err := d.Exec(context.Background(), spec, []string{"ip", "-6", "addr", "show", "eth0"}, nil)
	if err != nil || !strings.Contains(string(res.Stdout), addr.String()+"/80") {
		t.Fatalf("eth0 inside: %v %q", err, res.Stdout)
	}
	if err := d.Cleanup(context.Background(), spec); err != nil {
		t.Fatal(err)
	}
	if _, err := netlink.LinkByIndex(sp.net.host); err == nil {
		t.Error("the machine's veth outlived Cleanup")
	}
}

// TestSpareFailedStart checks a start that fails once the spare is
// configured leaves nothing behind, the spare's veth pair included.
func TestSpareFailedStart(t *testing.T) {
	d := newDriver(t, testConfig(t))
	ctx := context.Background()
	warm := testSpec(t, "busybox", "-c", "true")
	waitExit(t, start(t, d, warm))
	if err := d.Cleanup(ctx, warm); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, d)
	for _, noSpare := range []bool{false, true} {
		waitSpare(t, d)
		d.noSpare.Store(noSpare)
		spec := testSpec(t, "busybox")
		spec.Entrypoint = []string{"/bin/broken"}
		if _, err := d.Prepare(ctx, spec); err != nil {
			t.Fatal(err)
		}
		_, err := d.Start(ctx, spec)
		if err == nil || errors.Is(err, driver.ErrImage) {
			t.Fatalf("Start = %v, want the init's error", err)
		}
		t.Logf("no spare %v: %v", noSpare, err)
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	d.noSpare.Store(false)
	before.check(t, snapshot(t, d))
}

// TestNoSpare starts machines with an init of their own, as when no spare
// is ready, and checks a spare that dies is replaced.
func TestNoSpare(t *testing.T) {
	d := newDriver(t, testConfig(t))
	sp := waitSpare(t, d)
	d.noSpare.Store(true)
	spec := testSpec(t, "busybox", "-c", "hostname; exit 3")
	p := start(t, d, spec)
	if p.Pid() == sp.init.h.Pid {
		t.Fatal("started from the spare")
	}
	if e := waitExit(t, p); e.Code != 3 || e.Unknown {
		t.Fatalf("exit = %+v, want 3", e)
	}
	if got := logOf(t, spec); got != spec.MachineID+"\n" {
		t.Fatalf("log = %q", got)
	}
	// Its veth is made now, named after the machine.
	spec = testSpec(t, "busybox")
	spec.Entrypoint = []string{"httpd", "-f", "-p", "[::]:8080", "-h", "/www"}
	start(t, d, spec)
	if l, err := netlink.LinkByName(vethName(spec.MachineID)); err != nil || l.Attrs().Name != vethName(spec.MachineID) {
		t.Fatalf("veth: %v %v", l, err)
	}
	addr, _ := d.PrivateIP(spec)
	if body, _ := httpGet(t, netip.AddrPortFrom(addr, 8080)); body != "hello from the sandbox\n" {
		t.Fatalf("body = %q", body)
	}
	d.noSpare.Store(false)

	unix.Kill(sp.init.h.Pid, unix.SIGKILL)
	deadline := time.Now().Add(10 * time.Second)
	for sp2 := d.idle.Load(); sp2 == nil || sp2 == sp; sp2 = d.idle.Load() {
		if time.Now().After(deadline) {
			t.Fatal("a dead spare was not replaced")
		}
		time.Sleep(10 * time.Millisecond)
	}
	spec = testSpec(t, "busybox", "-c", "exit 4")
	if e := waitExit(t, start(t, d, spec)); e.Code != 4 {
		t.Fatalf("exit = %+v, want 4", e)
	}
}

// TestCloseTeardown checks a driver leaves nothing once closed and torn
// down: no init (spare or not), cgroup, link or mount.
func TestCloseTeardown(t *testing.T) {
	cfg := testConfig(t)
	count := func() leaks {
		l := leaks{}
		entries, _ := os.ReadDir("/proc")
		// Only this driver's: other tests in other packages may run
		// sandboxes at the same time.
		for _, e := range entries {
			b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil || !strings.Contains(string(b), InitCommand) {
				continue
			}
			if cgs, err := os.ReadFile("/proc/" + e.Name() + "/cgroup"); err == nil && strings.Contains(string(cgs), "/"+cfg.CgroupParent+"/") {
				l["init processes"]++
			}
		}
		if cg, err := detectCgroups(cfg.CgroupParent); err == nil {
			for _, r := range cg.roots {
				if _, err := os.Stat(r); err == nil {
					l["cgroups"]++
				}
			}
		}
		links, _ := netlink.LinkList()
		bridge := 0
		for _, k := range links {
			if k.Attrs().Name == cfg.Bridge {
				bridge = k.Attrs().Index
				l["links"]++
			}
		}
		for _, k := range links {
			if k.Type() == "veth" && bridge != 0 && k.Attrs().MasterIndex == bridge {
				l["links"]++
			}
		}
		mi, _ := os.ReadFile("/proc/self/mountinfo")
		l["mounts"] = strings.Count(string(mi), testRoot)
		l["zombies"] = countZombies()
		return l
	}
	before := count()
	d := newDriver(t, cfg)
	ctx := context.Background()
	for _, noSpare := range []bool{false, true} {
		waitSpare(t, d)
		d.noSpare.Store(noSpare)
		spec := testSpec(t, "busybox", "-c", "sleep 1000")
		p := start(t, d, spec)
		if _, err := p.Stop(ctx, syscall.SIGKILL, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Cleanup(ctx, spec); err != nil {
			t.Fatal(err)
		}
	}
	waitSpare(t, d)
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := d.Teardown(); err != nil {
		t.Fatal(err)
	}
	before.check(t, count())
}
