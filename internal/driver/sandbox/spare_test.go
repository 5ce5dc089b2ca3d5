package sandbox

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
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
	if p1.Pid() != sp.init.h.pid {
		t.Fatalf("started init %d, not the spare %d", p1.Pid(), sp.init.h.pid)
	}
	if next := waitSpare(t, d1); next.init.h.pid == sp.init.h.pid {
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

// TestNoSpare starts machines with an init of their own, as when no spare
// is ready, and checks a spare that dies is replaced.
func TestNoSpare(t *testing.T) {
	d := newDriver(t, testConfig(t))
	sp := waitSpare(t, d)
	d.noSpare.Store(true)
	spec := testSpec(t, "busybox", "-c", "hostname; exit 3")
	p := start(t, d, spec)
	if p.Pid() == sp.init.h.pid {
		t.Fatal("started from the spare")
	}
	if e := waitExit(t, p); e.Code != 3 || e.Unknown {
		t.Fatalf("exit = %+v, want 3", e)
	}
	if got := logOf(t, spec); got != spec.MachineID+"\n" {
		t.Fatalf("log = %q", got)
	}
	d.noSpare.Store(false)

	unix.Kill(sp.init.h.pid, unix.SIGKILL)
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
		for _, e := range entries {
			if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && strings.Contains(string(b), InitCommand) {
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
		for _, k := range links {
			if k.Type() == "veth" || k.Attrs().Name == cfg.Bridge {
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
