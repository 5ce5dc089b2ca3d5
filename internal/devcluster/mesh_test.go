package devcluster

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/vishvananda/netns"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestPrivateNetworkAcrossRegions runs sandboxed machines in ams and syd
// of a dev cluster with its mesh: a machine in ams reaches its org's
// machine in syd at its private address and by <app>.internal, through the
// hosts' tunnels (the round trip pays the simulated ams–syd latency), and
// does not reach another org's machine in syd.
func TestPrivateNetworkAcrossRegions(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("needs root: sandboxes, bridges and TUNs")
	}
	ctx := context.Background()
	reg, err := registry.New(registry.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	rand.Read(b)
	b[0] |= 0x80 // never 0; apart from the instances other tests draw
	instance := hex.EncodeToString(b)
	network, err := layout.ParseNetwork(instance)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(ctx, Config{
		Dir: dir, Token: "agent-secret", Seed: 1, Regions: []string{"ams", "syd"}, HostsPerRegion: 1,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		Cluster:      cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 64 * 1024}},
		ControlPlane: true, Registry: reg,
		NewHostDriver: func(h HostSpec) (driver.Driver, error) {
			d, _, err := host.NewDriver(host.DriverConfig{Kind: host.DriverSandbox, DataDir: filepath.Join(dir, h.ID),
				Registry: h.RegistryAddr, RegistryToken: "agent-secret", Dial: h.Dial, Instance: instance, Index: h.Index})
			return d, err
		},
		Mesh: &MeshConfig{Network: network, Instance: instance, Bridge: func(i int) string {
			n, _ := sandbox.InstanceNames(instance, i)
			return n.Bridge
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, h := range c.Hosts {
			h.DestroyMachines(context.Background())
		}
		c.Close()
		for _, h := range c.Hosts {
			h.Teardown()
		}
	})
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	ref := pushSleepImage(t, c.RegistryAddr())

	// Two orgs; each host numbers orgs as it first sees them, so personal's
	// machines come first everywhere.
	launch := func(org, app, region string) *api.Machine {
		t.Helper()
		tok, err := c.Plane.AddOrg(ctx, org, org)
		if err != nil {
			t.Fatal(err)
		}
		cl := api.NewClient(c.Plane.URL(), tok)
		if _, err := cl.GetApp(ctx, app); err != nil {
			if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: app, OrgSlug: org}); err != nil {
				t.Fatal(err)
			}
		}
		m, err := cl.Create(ctx, app, api.LaunchMachineInput{Region: region, Config: &api.MachineConfig{Image: ref,
			Guest: &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}}})
		if err != nil {
			t.Fatalf("create %s in %s: %v", app, region, err)
		}
		if err := cl.Wait(ctx, app, m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 60 * time.Second}); err != nil {
			t.Fatalf("wait %s: %v", m.ID, err)
		}
		if m, err = cl.Get(ctx, app, m.ID); err != nil || m.PrivateIP == "" {
			t.Fatalf("get %s: %v %+v", app, err, m)
		}
		return m
	}
	ams := launch("personal", "shop", "ams")
	syd := launch("personal", "shop", "syd")
	rival := launch("rival", "rival", "syd")
	t.Logf("ams %s, syd %s, rival %s", ams.PrivateIP, syd.PrivateIP, rival.PrivateIP)

	sydAddr := listenIn(t, machineNS(t, syd.ID), syd.PrivateIP)
	rivalAddr := listenIn(t, machineNS(t, rival.ID), rival.PrivateIP)
	from := machineNS(t, ams.ID)

	// The peers follow the facts: retry until syd's prefix reached ams.
	var conn net.Conn
	deadline := time.Now().Add(60 * time.Second)
	for {
		conn, err = dialFrom(t, from, sydAddr, 5*time.Second)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("ams machine to %s: %v", sydAddr, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	defer conn.Close()
	ra, _ := geo.Lookup("ams")
	rs, _ := geo.Lookup("syd")
	want := geo.RTT(ra, rs)
	if d := echoOnce(t, conn); d < want {
		t.Errorf("ams→syd round trip %v, under the simulated %v: the packets skipped the tunnel", d, want)
	}

	// By name: the ams host's DNS answers syd.shop.internal with the syd
	// machine's address.
	q := new(mdns.Msg)
	q.SetQuestion("syd.shop.internal.", mdns.TypeAAAA)
	r, err := mdns.Exchange(q, c.Hosts[0].DNSAddr)
	if err != nil || len(r.Answer) != 1 {
		t.Fatalf("syd.shop.internal: %v %v", err, r)
	}
	byName := net.JoinHostPort(r.Answer[0].(*mdns.AAAA).AAAA.String(), portOfAddr(sydAddr))
	c2, err := dialFrom(t, from, byName, 10*time.Second)
	if err != nil {
		t.Fatalf("ams machine to syd.shop.internal (%s): %v", byName, err)
	}
	echoOnce(t, c2)
	c2.Close()

	// Another org's machine on the same syd host: no packet of a
	// connection gets through (the tunnels carry none between orgs, and
	// the hosts' filters drop them), so the connect times out. The wait
	// is many round trips of the path just proven.
	if c3, err := dialFrom(t, from, rivalAddr, 10*want); err == nil {
		c3.Close()
		t.Fatalf("ams machine of personal connected to rival's machine at %s", rivalAddr)
	}
}

func portOfAddr(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}

// pushSleepImage pushes an image of /bin/sleep (and the libraries it
// loads) to the registry, in the public namespace, and returns its name.
func pushSleepImage(t *testing.T, regAddr string) string {
	t.Helper()
	dir := t.TempDir()
	files := map[string]string{"/bin/sleep": "bin/sleep"}
	out, err := exec.Command("ldd", "/bin/sleep").Output()
	if err != nil {
		t.Fatalf("ldd: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		for _, f := range strings.Fields(line) {
			if strings.HasPrefix(f, "/") {
				files[f] = strings.TrimPrefix(f, "/")
			}
		}
	}
	for src, dst := range files {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		os.MkdirAll(filepath.Join(dir, filepath.Dir(dst)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	img, err := image.Build(context.Background(), image.BuildSpec{Dir: dir, Entrypoint: []string{"/bin/sleep", "3600"}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	if _, err := image.Push(context.Background(), img, regAddr+"/flame/mesh-sleep:latest", image.Remote{Token: "agent-secret"}); err != nil {
		t.Fatal(err)
	}
	return "flame/mesh-sleep:latest"
}

// machineNS is the network namespace of a sandboxed machine: its init's.
func machineNS(t *testing.T, id string) netns.NsHandle {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		cg, _ := os.ReadFile("/proc/" + e.Name() + "/cgroup")
		if strings.Contains(string(cmd), "sandbox-init") && strings.Contains(string(cg), id) {
			ns, err := netns.GetFromPid(pid)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { ns.Close() })
			return ns
		}
	}
	t.Fatalf("no sandbox init for machine %s", id)
	return 0
}

// inNS runs f with its thread in ns: sockets it opens stay there.
func inNS(t *testing.T, ns netns.NsHandle, f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		return err
	}
	defer netns.Set(orig)
	return f()
}

// listenIn serves TCP echo in a machine's network namespace at its
// address.
func listenIn(t *testing.T, ns netns.NsHandle, ip string) string {
	t.Helper()
	var ln net.Listener
	if err := inNS(t, ns, func() (err error) {
		ln, err = net.Listen("tcp6", net.JoinHostPort(ip, "0"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
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
	return ln.Addr().String()
}

// dialFrom connects from a machine's network namespace. The dialer's
// socket is made there (a Go dial makes its socket on the calling
// thread, held in the namespace until it returns).
func dialFrom(t *testing.T, ns netns.NsHandle, addr string, timeout time.Duration) (net.Conn, error) {
	var c net.Conn
	err := inNS(t, ns, func() (err error) {
		c, err = net.DialTimeout("tcp6", addr, timeout)
		return err
	})
	return c, err
}

// echoOnce sends a line and reads it back, returning the round trip.
func echoOnce(t *testing.T, c net.Conn) time.Duration {
	t.Helper()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	msg := []byte("ping\n")
	start := time.Now()
	if _, err := c.Write(msg); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, msg); err != nil {
		t.Fatal(err)
	}
	return time.Since(start)
}
