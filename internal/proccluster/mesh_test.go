package proccluster_test

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/device"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/proccluster"
)

// meshTopology is three sandbox hosts in two regions, each a `flame agent`
// in a namespace of its own, its tunnels over the bridge between them.
var meshTopology = proccluster.Config{Sandbox: true, Hosts: []proccluster.HostSpec{
	{ID: "ams-1", Region: "ams"}, {ID: "ams-2", Region: "ams"}, {ID: "syd-1", Region: "syd"},
}}

// attempt is how long one probe from inside a machine waits for its
// answer before it is tried again (or, where nothing may answer, before
// the silence counts): a connection through the tunnels on this machine's
// bridge answers in milliseconds, and the bounds below hold whatever it is.
const attempt = 3 * time.Second

// bulkWait bounds a MiB each way through the tunnels: WireGuard in
// userspace on both hosts moves tens of MiB a second on one busy core, so a
// MiB takes a fraction of a second; the wait is many times that.
const bulkWait = 20 * time.Second

// handshakeRetry bounds how long WireGuard takes to retry a handshake
// whose initiation was lost (a peer not yet configured on the other side,
// or a link cut then): RekeyTimeout plus its largest jitter.
const handshakeRetry = device.RekeyTimeout + device.RekeyTimeoutJitterMaxMs*time.Millisecond

// TestPrivateNetworkAcrossProcesses runs a control plane and three sandbox
// hosts as processes, each host in its own network namespace with its
// WireGuard tunnels over the kernel's UDP across the harness's bridge. From
// inside a machine of org acme (exec through the Machines API) it reaches
// acme's machine on the syd host by private address and by
// syd.<app>.internal — a TCP round trip and an HTTP GET answered with that
// machine's id — and never reaches org rival's machine there: the connect
// gets no answer and rival's names do not resolve. Then the ams host and
// the syd host are cut apart by nftables: nothing the ams machine sends
// reaches syd's TUN while the machine on the other ams host still answers;
// healed, the tunnel carries again within a bound of the cluster's and
// WireGuard's timers; so it does after the syd host is cut off from every
// member until all hold it dead, and after its agent is killed and started
// again. Nothing of the cluster is left on the machine after.
func TestPrivateNetworkAcrossProcesses(t *testing.T) {
	probe := buildProbe(t)
	start := time.Now()
	c := proccluster.New(t, meshTopology)
	t.Logf("cluster formed in %v", time.Since(start).Round(time.Millisecond))
	n := len(meshTopology.Hosts) + 1
	ctx := context.Background()
	cl := c.Client()
	ref := pushProbe(t, c, probe)

	for _, org := range []string{"acme", "rival"} {
		if _, err := cl.CreateOrg(ctx, api.Org{Slug: org}); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: org + "-app", OrgSlug: org}); err != nil {
			t.Fatal(err)
		}
	}
	hosts := hostNumbers(t, c)
	launch := func(app, region string) *api.Machine {
		t.Helper()
		m, err := cl.Create(ctx, app, api.LaunchMachineInput{Region: region, Config: &api.MachineConfig{Image: ref,
			Guest: &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}}})
		if err != nil {
			t.Fatalf("create %s in %s: %v", app, region, err)
		}
		t.Cleanup(func() {
			dctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := cl.Destroy(dctx, app, m.ID, true); err != nil {
				t.Errorf("destroy %s: %v", m.ID, err)
			}
		})
		if err := cl.Wait(ctx, app, m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 60 * time.Second}); err != nil {
			t.Fatalf("wait %s: %v", m.ID, err)
		}
		if m, err = cl.Get(ctx, app, m.ID); err != nil || m.PrivateIP == "" {
			t.Fatalf("get %s: %v %+v", m.ID, err, m)
		}
		return m
	}
	client := launch("acme-app", "ams")
	near := launch("acme-app", "ams") // placement spreads an app: likely the other ams host
	far := launch("acme-app", "syd")
	rival := launch("rival-app", "syd")
	on := func(m *api.Machine) string { return hostOf(t, hosts, m) }
	t.Logf("acme: %s on %s, %s on %s, %s on %s; rival: %s on %s", client.PrivateIP, on(client),
		near.PrivateIP, on(near), far.PrivateIP, on(far), rival.PrivateIP, on(rival))
	if on(far) != "syd-1" || on(rival) != "syd-1" || on(client) == "syd-1" {
		t.Fatalf("placement: the syd machines must be on syd-1 and the client in ams")
	}
	run := func(args ...string) (string, string) {
		t.Helper()
		return execProbe(t, cl, "acme-app", client.ID, args...)
	}
	echo := func(m *api.Machine) string { return net.JoinHostPort(m.PrivateIP, "8081") }

	// First contact waits for the far machine's facts to reach the ams
	// host (its /80 becomes the syd peer's allowed IPs) and for a
	// handshake, retried once if its first initiation is lost.
	reach := proccluster.FactsBound(n) + proccluster.Slack*handshakeRetry + attempt
	rtt := until(t, reach, func() (string, string) { return run("dial", echo(far), attempt.String()) })
	t.Logf("acme ams → acme syd by address: TCP round trip %s", rtt)
	if kind, out := run("get", "http://"+echo8080(far)+"/", attempt.String()); kind != "ok" || out != far.ID {
		t.Errorf("GET from the ams machine to %s: %s %q, want ok %q", far.PrivateIP, kind, out, far.ID)
	}
	if on(near) != on(client) {
		until(t, reach, func() (string, string) { return run("dial", echo(near), attempt.String()) })
	}
	// A MiB each way: full-sized segments, wider than the TUN's MTU on
	// the machines' links, cross once path MTU discovery has the tunnel's.
	if kind, out := run("bulk", echo(far), strconv.Itoa(1<<20), bulkWait.String()); kind != "ok" {
		t.Errorf("a MiB each way between the ams and syd machines: %s %s", kind, out)
	} else {
		t.Logf("a MiB each way between the ams and syd machines: %s", out)
	}

	// By name, through the machine's DNS at fdaa::3: syd.<app>.internal is
	// the far machine, <app>.internal all of acme's and none of rival's.
	if kind, out := run("resolve", "syd.acme-app.internal", attempt.String()); kind != "ok" || out != far.PrivateIP {
		t.Errorf("syd.acme-app.internal: %s %q, want %s", kind, out, far.PrivateIP)
	}
	kind, out := run("resolve", "acme-app.internal", attempt.String())
	got := strings.Fields(out)
	slices.Sort(got)
	want := []string{client.PrivateIP, near.PrivateIP, far.PrivateIP}
	slices.Sort(want)
	if kind != "ok" || !slices.Equal(got, want) {
		t.Errorf("acme-app.internal: %s %q, want %v", kind, out, want)
	}
	if kind, out := run("get", "http://syd.acme-app.internal:8080/", attempt.String()); kind != "ok" || out != far.ID {
		t.Errorf("GET syd.acme-app.internal: %s %q, want ok %q", kind, out, far.ID)
	}
	if kind, out := run("dial", "syd.acme-app.internal:8081", attempt.String()); kind != "ok" {
		t.Errorf("dial syd.acme-app.internal: %s %s", kind, out)
	}

	// Another org's machine on the syd host: its address gets no answer
	// (the tunnels carry no packet between orgs, and syd's filter drops
	// them), its names do not resolve for acme's machine.
	for _, target := range []string{echo(rival), echo8080(rival)} {
		kind, out := run("dial", target, attempt.String())
		t.Logf("acme's machine to rival's at %s: %s %s", target, kind, out)
		if kind == "ok" {
			t.Errorf("acme's machine reached rival's at %s: %s", target, out)
		} else if kind != "timeout" && kind != "refused" {
			t.Errorf("acme's machine to rival's at %s: %s %s, want a timeout or a refusal", target, kind, out)
		}
	}
	for _, q := range []string{"rival-app.internal", "syd.rival-app.internal", rival.ID + ".vm.rival-app.internal"} {
		if kind, out := run("resolve", q, attempt.String()); kind != "notfound" {
			t.Errorf("%s from acme's machine: %s %s, want notfound", q, kind, out)
		}
	}

	// Cut the client's host from the syd host. What the client sends to
	// the far machine goes into its host's TUN and never comes out of
	// syd's; the near machine, on the other ams host, still answers.
	from := on(client)
	if err := c.Partition([]string{from}, []string{"syd-1"}); err != nil {
		t.Fatal(err)
	}
	healed := false
	t.Cleanup(func() {
		if !healed {
			c.Heal()
		}
	})
	if kind, out := run("dial", echo(far), attempt.String()); kind != "timeout" {
		t.Fatalf("partitioned, the ams machine to %s: %s %s, want a timeout", far.PrivateIP, kind, out)
	}
	sydBefore := meshCounters(t, c, "syd-1")
	amsBefore := meshCounters(t, c, from)
	if kind, out := run("dial", echo(far), attempt.String()); kind != "timeout" {
		t.Fatalf("partitioned, the ams machine to %s: %s %s, want a timeout", far.PrivateIP, kind, out)
	}
	sydAfter := meshCounters(t, c, "syd-1")
	amsAfter := meshCounters(t, c, from)
	if sydAfter.Rx != sydBefore.Rx {
		t.Errorf("partitioned, syd's TUN received %d packets from the tunnels", sydAfter.Rx-sydBefore.Rx)
	}
	if amsAfter.Tx == amsBefore.Tx {
		t.Errorf("partitioned, the ams machine's connect sent nothing into %s's TUN: it did not take the tunnel", from)
	}
	if on(near) != on(client) {
		if kind, out := run("dial", echo(near), attempt.String()); kind != "ok" {
			t.Errorf("partitioned from syd, the ams machine to the other ams host's %s: %s %s", near.PrivateIP, kind, out)
		}
	}

	// Healed, the tunnel carries again within: the views healing (a host
	// that held the other dead meanwhile removed its peer, and configures
	// it again on the change), then a lost handshake initiation retried,
	// then one probe's wait.
	if err := c.Heal(); err != nil {
		t.Fatal(err)
	}
	healed = true
	healedAt := time.Now()
	recover := proccluster.HealBound(n) + proccluster.Slack*handshakeRetry + attempt
	until(t, recover, func() (string, string) { return run("dial", echo(far), attempt.String()) })
	t.Logf("healed: the tunnel carried again after %v (bound %v)", time.Since(healedAt).Round(time.Millisecond), recover)
	if got := meshCounters(t, c, "syd-1"); got.Rx == sydAfter.Rx {
		t.Errorf("healed, syd's TUN received nothing from the tunnels")
	}
	if kind, out := run("get", "http://syd.acme-app.internal:8080/", attempt.String()); kind != "ok" || out != far.ID {
		t.Errorf("healed, GET syd.acme-app.internal: %s %q, want ok %q", kind, out, far.ID)
	}

	// Cut the syd host off from every other member until every view
	// holds it dead (and it them): the ams hosts remove it as a peer, it
	// removes them. Healed, the views heal and the peers come back, with a
	// new handshake.
	if err := c.Partition([]string{"syd-1"}, []string{"ams", proccluster.ControlID}); err != nil {
		t.Fatal(err)
	}
	healed = false
	wctx, cancel := context.WithTimeout(ctx, proccluster.DetectBound(n))
	defer cancel()
	if err := c.WaitViews(wctx); err != nil {
		t.Fatalf("syd cut off: the views did not hold it dead within %v: %v", proccluster.DetectBound(n), err)
	}
	if kind, out := run("dial", echo(far), attempt.String()); kind != "timeout" {
		t.Fatalf("syd cut off and held dead, the ams machine to %s: %s %s, want a timeout", far.PrivateIP, kind, out)
	}
	if err := c.Heal(); err != nil {
		t.Fatal(err)
	}
	healed = true
	healedAt = time.Now()
	until(t, recover, func() (string, string) { return run("dial", echo(far), attempt.String()) })
	t.Logf("syd back: the tunnel carried again after %v (bound %v)", time.Since(healedAt).Round(time.Millisecond), recover)
	if kind, out := run("get", "http://syd.acme-app.internal:8080/", attempt.String()); kind != "ok" || out != far.ID {
		t.Errorf("syd back, GET syd.acme-app.internal: %s %q, want ok %q", kind, out, far.ID)
	}

	// The syd agent killed and started again on its data dir: its
	// machines run on (their namespaces are their own) and it adopts
	// them; its new device, on the same key and endpoint, handshakes with
	// every peer as it configures them, so the ams host drops the session
	// it held with the old one. The tunnel carries again within the views
	// healing (a host that held syd dead meanwhile configures it again on
	// the change), a lost handshake retried, and one probe's wait.
	if err := c.Kill("syd-1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Revive("syd-1"); err != nil {
		t.Fatal(err)
	}
	revivedAt := time.Now()
	until(t, recover, func() (string, string) { return run("dial", echo(far), attempt.String()) })
	t.Logf("syd's agent started again: the tunnel carried again after %v (bound %v)", time.Since(revivedAt).Round(time.Millisecond), recover)
	if kind, out := run("get", "http://syd.acme-app.internal:8080/", attempt.String()); kind != "ok" || out != far.ID {
		t.Errorf("syd's agent started again, GET syd.acme-app.internal: %s %q, want ok %q", kind, out, far.ID)
	}
}

// buildProbe builds testdata/probe as a static binary.
func buildProbe(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "probe"), "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build the probe: %v\n%s", err, out)
	}
	return filepath.Join(dir, "probe")
}

// pushProbe pushes an image of the probe (its entrypoint serving) to the
// control plane's registry, in the public namespace, and returns its name
// as machines name it (the hosts pull it from the registry they were
// given).
func pushProbe(t *testing.T, c *proccluster.Cluster, bin string) string {
	t.Helper()
	dir := t.TempDir()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "probe"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	img, err := image.Build(ctx, image.BuildSpec{Dir: dir, Entrypoint: []string{"/probe", "serve"}, TempDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	reg := strings.TrimPrefix(c.Members()[0].APIURL(), "http://")
	const name = "flame/mesh-probe:latest"
	if _, err := image.Push(ctx, img, reg+"/"+name, image.Remote{Token: c.AdminToken, Insecure: true}); err != nil {
		t.Fatalf("push the probe: %v", err)
	}
	return name
}

// hostNumbers maps each host's number in the private network (its
// enrollment gave it) to its id.
func hostNumbers(t *testing.T, c *proccluster.Cluster) map[layout.Host]string {
	t.Helper()
	out := map[layout.Host]string{}
	for _, m := range c.Members()[1:] {
		_, h, ok, err := host.LoadPlace(m.DataDir())
		if err != nil || !ok {
			t.Fatalf("%s's place in the private network: %v (found %v)", m.ID, err, ok)
		}
		out[h] = m.ID
	}
	return out
}

// hostOf is the host a machine runs on, by its private address.
func hostOf(t *testing.T, hosts map[layout.Host]string, m *api.Machine) string {
	t.Helper()
	a, err := netip.ParseAddr(m.PrivateIP)
	if err != nil {
		t.Fatalf("%s: private address %q: %v", m.ID, m.PrivateIP, err)
	}
	p, _, ok := layout.Locate(a)
	if !ok || hosts[p.Host] == "" {
		t.Fatalf("%s: %s is on no host of the cluster", m.ID, a)
	}
	return hosts[p.Host]
}

func echo8080(m *api.Machine) string { return net.JoinHostPort(m.PrivateIP, "8080") }

// execProbe runs the probe in machine id of app, through the control
// plane's Machines API, and returns the first word it printed and the rest.
func execProbe(t *testing.T, cl *api.Client, app, id string, args ...string) (string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*attempt+30*time.Second)
	defer cancel()
	res, err := cl.Exec(ctx, app, id, api.ExecRequest{Command: append([]string{"/probe"}, args...),
		Timeout: int((2*attempt + 10*time.Second) / time.Second)})
	if err != nil {
		t.Fatalf("exec probe %v in %s: %v", args, id, err)
	}
	kind, rest, _ := strings.Cut(strings.TrimSpace(res.Stdout), " ")
	if kind == "" {
		return "error", fmt.Sprintf("exit %d, stderr %q", res.ExitCode, res.Stderr)
	}
	return kind, rest
}

// until runs probe until it answers ok, within bound, and returns what it
// said; it fails the test with the last answer past the bound.
func until(t *testing.T, bound time.Duration, probe func() (string, string)) string {
	t.Helper()
	deadline := time.Now().Add(bound)
	for {
		kind, out := probe()
		if kind == "ok" {
			return out
		}
		if time.Now().After(deadline) {
			t.Fatalf("no answer within %v: last %s %s", bound, kind, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// meshCounters reads a host's TUN counters.
func meshCounters(t *testing.T, c *proccluster.Cluster, id string) proccluster.MeshCounters {
	t.Helper()
	mc, err := c.Mesh(id)
	if err != nil {
		t.Fatal(err)
	}
	return mc
}
