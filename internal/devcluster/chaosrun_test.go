package devcluster

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"log/slog"
	"net"
	"net/netip"
	"os"
	osexec "os/exec"
	"os/signal"
	"reflect"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/demoapp"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/server"
)

// The chaos tests. TestChaos runs one short schedule in the normal suite;
// FLAME_CHAOS_SEED=<seed> replays another (FLAME_CHAOS_STEPS and
// FLAME_CHAOS_HOLD size it); FLAME_CHAOS_SWEEP=<n> runs TestChaosSweep
// over n seeds from FLAME_CHAOS_SEED (default: the clock), each with a
// fresh cluster. A failure prints the schedule and the line that replays
// it.

// chaosImage is the demo app listening on its machine's own loopback
// address (FLY_PRIVATE_IP), so that a group's machines, all configured
// with one port, run side by side on one kernel.
const chaosImage = "flame/chaos-demo"

// runChaosDemoApp is the test binary as chaosImage (TestMain).
func runChaosDemoApp() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	addr := net.JoinHostPort(os.Getenv("FLY_PRIVATE_IP"), os.Getenv("PORT"))
	if err := demoapp.Run(ctx, addr, os.Getenv, os.Stdout); err != nil {
		os.Exit(1)
	}
	os.Exit(0)
}

// loopDriver is the exec driver giving each machine an address of its own
// in 127.0.0.0/8, from its id: the agent dials checks there, the edges
// deliver there, and chaosImage listens there.
type loopDriver struct{ *exec.Driver }

func (d loopDriver) PrivateIP(spec driver.Spec) (netip.Addr, bool) {
	h := fnv.New32a()
	h.Write([]byte(spec.MachineID))
	v := h.Sum32()
	return netip.AddrFrom4([4]byte{127, byte(64 + v%64), byte(v >> 8), byte(1 + (v>>16)%254)}), true
}

func (d loopDriver) withIP(spec driver.Spec) driver.Spec {
	ip, _ := d.PrivateIP(spec)
	env := make(map[string]string, len(spec.Env)+1)
	for k, v := range spec.Env {
		env[k] = v
	}
	env["FLY_PRIVATE_IP"] = ip.String()
	spec.Env = env
	return spec
}

func (d loopDriver) Start(ctx context.Context, spec driver.Spec) (driver.Process, error) {
	return d.Driver.Start(ctx, d.withIP(spec))
}

func (d loopDriver) Adopt(ctx context.Context, spec driver.Spec, handle string) (driver.Process, error) {
	return d.Driver.Adopt(ctx, d.withIP(spec), handle)
}

// chaosCluster starts the cluster a chaos run needs: three regions of two
// hosts, a control plane, the app "chaos" with two machines declared in
// every region behind the edges, and the ledger app "ledger".
func chaosCluster(t testing.TB) (*Cluster, ChaosConfig) {
	t.Helper()
	ctx := context.Background()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	images := map[string][]string{chaosImage: {self, "chaos-demo-app"}}
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(ctx, Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams", "iad", "syd"}, HostsPerRegion: 2,
		Logger: slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: chaosLogLevel(t)})),
		NewDriver: func(string, int, string) (driver.Driver, error) {
			return loopDriver{exec.New(exec.Config{Images: images}, nil)}, nil
		},
		Cluster:      cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 64 * 1024}},
		ControlPlane: true,
		// An entry whose create no host answered (its host or the plane
		// killed in between) is forgotten after LostAfter: 30 s by
		// default, for creates that pull images; the exec driver's take
		// milliseconds.
		Server: server.Config{LostAfter: 10 * time.Second},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		c.Shutdown(sctx, true)
	})
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(c.Plane.URL(), tok)
	for _, app := range []string{"chaos", "ledger"} {
		if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: app, OrgSlug: "personal"}); err != nil {
			t.Fatal(err)
		}
	}
	port := strconv.Itoa(freePort(t))
	guest := &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}
	declared := map[string]int{"ams": 2, "iad": 2, "syd": 2}
	if _, err := cl.PutGroup(ctx, "chaos", api.Group{Name: "app", Regions: declared, Config: &api.MachineConfig{
		Image: chaosImage, Guest: guest, Env: map[string]string{"PORT": port},
		Services: []api.MachineService{{
			Protocol: "tcp", InternalPort: freePortNumber(port),
			Ports:  []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
			Checks: []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
		}},
	}}); err != nil {
		t.Fatal(err)
	}
	return c, ChaosConfig{
		App: "chaos", Group: "app", Declared: declared, Port: 80, Host: "chaos.localhost", Token: tok,
		Ledger: "ledger", LedgerGroup: "side",
		LedgerConfig: &api.MachineConfig{Image: chaosImage, Guest: guest, Env: map[string]string{"PORT": port}},
		Rate:         40, Concurrency: 8, Work: 2 * time.Millisecond,
	}
}

func freePortNumber(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// envInt reads a positive integer from the environment (def when unset).
func envInt(t testing.TB, name string, def int64) int64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		t.Fatalf("%s=%q: not an integer", name, v)
	}
	return n
}

// chaosLogLevel is the level of the cluster's logs a chaos run shows:
// errors, or FLAME_CHAOS_LOG's (debug, info, warn) to follow a failure.
func chaosLogLevel(t testing.TB) slog.Level {
	var l slog.Level = slog.LevelError
	if v := os.Getenv("FLAME_CHAOS_LOG"); v != "" {
		if err := l.UnmarshalText([]byte(v)); err != nil {
			t.Fatalf("FLAME_CHAOS_LOG=%q: %v", v, err)
		}
	}
	return l
}

// runChaosSeed runs one seed's schedule on a fresh cluster and fails t
// with the schedule and how to replay it if an invariant broke.
func runChaosSeed(t *testing.T, seed int64, steps int, hold time.Duration) {
	c, cfg := chaosCluster(t)
	sched, err := GenerateChaos(seed, ChaosTopology{Regions: c.cfg.Regions, HostsPerRegion: c.cfg.HostsPerRegion, ControlPlane: true}, steps, hold)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Schedule, cfg.Logf = sched, t.Logf
	replay := fmt.Sprintf("FLAME_CHAOS_SEED=%d FLAME_CHAOS_STEPS=%d FLAME_CHAOS_HOLD=%d go test -run 'TestChaos$' ./internal/devcluster/",
		seed, steps, hold.Milliseconds())
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	rep, err := c.RunChaos(ctx, cfg)
	if rep != nil {
		var b strings.Builder
		fmt.Fprintf(&b, "views and routes bound %v, reconciler bound %v\n", rep.ConvergeBound, rep.ReconcileBound)
		for i, s := range rep.Steps {
			fmt.Fprintf(&b, "  %2d. %-60s views %6v routes %6v reconciled %6v; %d requests, %d failed\n", i+1, s.Step,
				s.Views.Round(time.Millisecond), s.Routes.Round(time.Millisecond), s.Reconciled.Round(time.Millisecond), s.Requests, s.Failed)
		}
		acked := 0
		for _, call := range rep.Calls {
			if call.Err == "" {
				acked++
			}
		}
		fmt.Fprintf(&b, "%d requests, %d API calls (%d acknowledged)", len(rep.Requests), len(rep.Calls), acked)
		t.Log(b.String())
	}
	if err != nil || rep != nil && len(rep.Violations) > 0 {
		var b strings.Builder
		if err != nil {
			fmt.Fprintf(&b, "the run stopped: %v\n", err)
		}
		if rep != nil {
			for _, v := range rep.Violations {
				fmt.Fprintf(&b, "  - %s\n", v)
			}
		}
		t.Errorf("chaos %s\n%s\nreplay: %s", sched, b.String(), replay)
	}
}

// TestChaos runs a short schedule and checks every invariant: seed 13's
// five steps (a stalled host, a killed machine, loss, a killed edge host,
// a killed region with the control plane) unless FLAME_CHAOS_SEED says
// otherwise.
func TestChaos(t *testing.T) {
	seed := envInt(t, "FLAME_CHAOS_SEED", 13)
	steps := envInt(t, "FLAME_CHAOS_STEPS", 5)
	hold := time.Duration(envInt(t, "FLAME_CHAOS_HOLD", 1500)) * time.Millisecond
	runChaosSeed(t, seed, int(steps), hold)
}

// TestChaosSweep runs FLAME_CHAOS_SWEEP seeds of longer schedules; opt-in.
func TestChaosSweep(t *testing.T) {
	n := envInt(t, "FLAME_CHAOS_SWEEP", 0)
	if n <= 0 {
		t.Skip("FLAME_CHAOS_SWEEP=<seeds> runs the sweep")
	}
	first := envInt(t, "FLAME_CHAOS_SEED", time.Now().UnixNano()%1_000_000)
	steps := envInt(t, "FLAME_CHAOS_STEPS", 8)
	hold := time.Duration(envInt(t, "FLAME_CHAOS_HOLD", 3000)) * time.Millisecond
	for seed := first; seed < first+n; seed++ {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) { runChaosSeed(t, seed, int(steps), hold) })
	}
}

// TestGenerateChaos: a seed gives one schedule; every step keeps to the
// rules that keep the app serving.
func TestGenerateChaos(t *testing.T) {
	topo := ChaosTopology{Regions: []string{"ams", "iad", "syd"}, HostsPerRegion: 2, ControlPlane: true}
	a, err := GenerateChaos(7, topo, 200, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := GenerateChaos(7, topo, 200, 3*time.Second)
	if !reflect.DeepEqual(a, b) {
		t.Fatal("one seed gave two schedules")
	}
	if c, _ := GenerateChaos(8, topo, 200, 3*time.Second); reflect.DeepEqual(a.Steps, c.Steps) {
		t.Fatal("two seeds gave one schedule")
	}
	kinds := map[string]int{}
	for i, st := range a.Steps {
		if st.Hold < 750*time.Millisecond || st.Hold > 3*time.Second || st.Hold%(100*time.Millisecond) != 0 {
			t.Errorf("step %d: hold %v", i, st.Hold)
		}
		regions := map[string]bool{} // the regions a crash or link fault touches
		for _, f := range st.Faults {
			kinds[f.Kind]++
			switch f.Kind {
			case FaultKillHost, FaultStallHost:
				regions[strings.Split(f.Target, "-")[0]] = true
			case FaultKillRegion, FaultKillMachine:
				regions[f.Target] = true
			case FaultLoss, FaultSlowLink:
				regions[f.A[0]] = true
				if len(f.A) != 1 || len(f.B) != 2 {
					t.Errorf("step %d: %s: want one region against the two others", i, f)
				}
			case FaultPartition:
				if len(f.A) == 1 && strings.Contains(f.A[0], "-") {
					if strings.HasSuffix(f.A[0], "-1") {
						t.Errorf("step %d: %s cuts an edge off alone", i, f)
					}
					if len(f.B) != 1+2+1 {
						t.Errorf("step %d: %s: want the host against everyone else", i, f)
					}
				}
				for _, x := range f.A {
					if x != controlID {
						regions[strings.Split(x, "-")[0]] = true
					}
				}
			}
		}
		if len(regions) > 1 {
			t.Errorf("step %d: %s touches %d regions", i, st, len(regions))
		}
		if len(st.Faults) > 1 && (len(st.Faults) != 2 || st.Faults[1].Kind != FaultKillPlane) {
			t.Errorf("step %d: %s: only a crash and the control plane go together", i, st)
		}
	}
	for _, k := range []string{FaultKillMachine, FaultKillHost, FaultKillRegion, FaultStallHost, FaultPartition, FaultLoss, FaultSlowLink, FaultKillPlane} {
		if kinds[k] == 0 {
			t.Errorf("200 steps and no %s", k)
		}
	}
	for _, bad := range []ChaosTopology{
		{Regions: []string{"ams", "iad"}, HostsPerRegion: 2},
		{Regions: []string{"ams", "iad", "syd"}, HostsPerRegion: 0},
	} {
		if _, err := GenerateChaos(1, bad, 4, time.Second); !errors.Is(err, ErrChaosShape) {
			t.Errorf("%+v: %v, want ErrChaosShape", bad, err)
		}
	}
	if _, err := GenerateChaos(1, topo, 0, time.Second); !errors.Is(err, ErrChaosShape) {
		t.Errorf("0 steps: %v", err)
	}
	if _, err := GenerateChaos(1, topo, 4, time.Millisecond); !errors.Is(err, ErrChaosShape) {
		t.Errorf("a hold of 1ms: %v", err)
	}
}

// TestChaosChecksCatch: the invariants' checks pass on a calm cluster and
// catch each kind of violation put in front of them: a machine a host runs
// that the catalog does not know, a machine running as two processes, a
// group over its declared count, and an acknowledged create that is gone.
func TestChaosChecksCatch(t *testing.T) {
	c, cfg := chaosCluster(t)
	ctx := context.Background()
	r := &chaosRun{c: c, cfg: cfg, seen: map[string]bool{}, orgAPI: api.NewClient(c.Plane.URL(), cfg.Token)}
	r.api = &chaosAPI{cl: r.orgAPI, app: cfg.Ledger, group: cfg.LedgerGroup, config: cfg.LedgerConfig}
	if _, ok := r.checkMachinesUntil(ctx, 0, time.Now().Add(c.reconcileBound())); !ok {
		t.Fatalf("a calm cluster did not converge: %v", r.violations)
	}
	r.checkLedger(ctx, nil, 0)
	if len(r.violations) > 0 {
		t.Fatalf("violations on a calm cluster: %v", r.violations)
	}

	// A machine made behind the control plane's back, on a host.
	h := c.Hosts[0]
	stray, err := c.HostClient(h).Create(ctx, "chaos", api.LaunchMachineInput{
		Config: cfg.LedgerConfig, SkipLaunch: true})
	if err != nil {
		t.Fatal(err)
	}
	// A second process of a group machine.
	var twin string
	for _, hm := range c.hostMachines("chaos") {
		if hm.state == api.StateStarted {
			twin = hm.id
			break
		}
	}
	cmd := osexec.Command("sleep", "60")
	cmd.Env = []string{"FLY_APP_NAME=chaos", "FLY_MACHINE_ID=" + twin}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r.checkMachinesUntil(ctx, 0, time.Now())
	// A group over its count, as the sampler would read it.
	r.checkCounts("chaos", []countSample{{at: time.Now(), group: "app", started: map[string][]string{"ams": {"a", "b", "c"}}}})
	// An acknowledged create of a machine that does not exist.
	r.checkLedger(ctx, []APICall{{Op: "create", Machine: "00000000000001"}}, 0)

	all := strings.Join(r.violations, "\n")
	for _, want := range []string{
		"machine " + stray.ID + " of chaos (created on " + h.ID + ") is not in the catalog",
		"machine " + twin + " runs as 2 processes",
		"counts: group chaos/app had 3 machines started in ams",
		"acknowledged machine 00000000000001 is gone, never destroyed",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("no violation %q among:\n%s", want, all)
		}
	}
}
