package proccluster_test

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/proccluster"
)

func TestMain(m *testing.M) { proccluster.Main(m) }

// topology is the cluster of the end-to-end tests: a control plane in ams
// and two hosts in each of two regions, one edge in each.
var topology = proccluster.Config{Hosts: []proccluster.HostSpec{
	{ID: "ams-1", Region: "ams", Edge: true}, {ID: "ams-2", Region: "ams"},
	{ID: "iad-1", Region: "iad", Edge: true}, {ID: "iad-2", Region: "iad"},
}}

// app is the demo app the tests deploy: a group of one machine in each
// region. The exec driver's machines share their host's ports, so a group
// never has two on one host: the declared count of a region is below its
// hosts, and a lost machine has a host to be replaced on.
const app = "web"

var declared = map[string]int{"ams": 1, "iad": 1}

// members is the cluster's size (the control plane and the hosts), for
// the bounds.
var members = len(topology.Hosts) + 1

// TestRealCluster runs a control plane and four agents as processes, each
// host in its own network namespace, deploys the demo app in both regions
// and then breaks the cluster in each way the harness can — a host
// SIGKILLed, a host partitioned by nftables, a host SIGSTOPped, and a short
// seeded schedule of these — under steady load through an edge, checking
// after each that no idempotent request failed and that every host's view
// and the catalog converge within their bounds. The subtests share one
// cluster (starting one is most of the cost), each starting from a healed,
// converged cluster and leaving one.
func TestRealCluster(t *testing.T) {
	c := proccluster.New(t, topology)
	start := time.Now()
	deploy(t, c)
	t.Logf("deployed and served through both edges in %v", time.Since(start).Round(time.Millisecond))

	t.Run("ServesThroughEdges", func(t *testing.T) {
		for _, edge := range []string{"ams-1", "iad-1"} {
			for _, region := range []string{"ams", "iad"} {
				s := loadConfig(c, edge, region).Send()
				if s.Failed() || s.Region != region {
					t.Errorf("through %s preferring %s: %d %s from %q", edge, region, s.Status, s.Err, s.Region)
				}
			}
		}
	})
	t.Run("KillHostUnderLoad", func(t *testing.T) {
		// Held until the control plane has replaced the machine the host
		// ran: the catalog converges without it, then with it back.
		f := proccluster.Fault{Kind: proccluster.KillHost, Target: machineHost(t, c, "ams")}
		runFault(t, c, f, step{catalogDuring: true, catalogAfter: true})
	})
	t.Run("PartitionAndHeal", func(t *testing.T) {
		f := proccluster.Fault{Kind: proccluster.PartitionHost, Target: machineHost(t, c, "ams"), Hold: 2 * time.Second}
		runFault(t, c, f, step{catalogAfter: true})
		// A partition between groups named by region is a rule in each
		// namespace for each address of the other side (the control plane
		// is named on its own), both ways; heal leaves none.
		if err := c.Partition([]string{"ams", proccluster.ControlID}, []string{"iad"}); err != nil {
			t.Fatal(err)
		}
		for _, m := range c.Members() {
			want := 2 * 2 // input and output, for each of the other side's two members
			if m.Region == "iad" {
				want = 2 * 3
			}
			if n, err := c.Rules(m.ID); err != nil || n != want {
				t.Errorf("%s has %d rules (%v), want %d", m.ID, n, err, want)
			}
		}
		if err := c.Heal(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("StallAndResume", func(t *testing.T) {
		f := proccluster.Fault{Kind: proccluster.StallHost, Target: machineHost(t, c, "ams"), Hold: 2 * time.Second}
		runFault(t, c, f, step{catalogAfter: true})
	})
	t.Run("ChaosSchedule", func(t *testing.T) {
		seed := uint64(time.Now().UnixNano())
		if s := os.Getenv("FLAME_PROCCLUSTER_SEED"); s != "" {
			var err error
			if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
				t.Fatalf("FLAME_PROCCLUSTER_SEED: %v", err)
			}
		}
		// Faults on every host but the edge the load enters by, one after
		// the other, each from a converged cluster: a machine left behind
		// on a host that returned holds its host's port until the
		// reconciler destroys it (the exec driver's machines share their
		// host's ports), so a replacement placed there meanwhile would
		// fail for want of the port, not for the fault.
		sched := proccluster.Schedule(rand.New(rand.NewPCG(seed, seed)), []string{"ams-1", "ams-2", "iad-2"}, 3, time.Second, 2*time.Second)
		t.Logf("seed %d, schedule:\n%s", seed, proccluster.ScheduleString(sched))
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("seed %d (FLAME_PROCCLUSTER_SEED=%d replays the schedule), schedule:\n%s", seed, seed, proccluster.ScheduleString(sched))
			}
		})
		for i, f := range sched {
			if !runFault(t, c, f, step{catalogAfter: true}) {
				t.Fatalf("step %d of the schedule (%s) failed", i+1, f)
			}
		}
	})
}

// deploy creates the app and its group and waits until the catalog holds
// the declared counts and both edges serve it from both regions.
func deploy(t *testing.T, c *proccluster.Cluster) {
	t.Helper()
	ctx := context.Background()
	cl := c.Client()
	if _, err := cl.CreateOrg(ctx, api.Org{Slug: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: app, OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	port80 := 80
	cfg := &api.MachineConfig{Image: "flame/demo-app", Env: map[string]string{"PORT": "8080"},
		Services: []api.MachineService{{Protocol: "tcp", InternalPort: 8080, Ports: []api.MachinePort{{Port: &port80, Handlers: []string{"http"}}}}}}
	if _, err := cl.PutGroup(ctx, app, api.Group{Name: app, Config: cfg, Regions: declared}); err != nil {
		t.Fatal(err)
	}
	bound := proccluster.ReconcileBound(members)
	if err := waitFor(bound, func() string { return catalogDiff(c) }); err != nil {
		t.Fatalf("the group was not deployed within %v: %v", bound, err)
	}
	// The machines' facts reach the edges by gossip.
	bound = proccluster.FactsBound(members)
	err := waitFor(bound, func() string {
		for _, edge := range []string{"ams-1", "iad-1"} {
			for _, region := range []string{"ams", "iad"} {
				if s := loadConfig(c, edge, region).Send(); s.Failed() || s.Region != region {
					return fmt.Sprintf("%s preferring %s answers %d %s from %q", edge, region, s.Status, s.Err, s.Region)
				}
			}
		}
		return ""
	})
	if err != nil {
		t.Fatalf("the edges do not serve both regions within %v: %v", bound, err)
	}
}

// loadConfig is GETs of the app through the edge of host edge,
// preferring region.
func loadConfig(c *proccluster.Cluster, edge, region string) devcluster.LoadConfig {
	return devcluster.LoadConfig{URL: c.Member(edge).EdgeURL(), Host: app + ".localhost",
		Header: map[string]string{"fly-prefer-region": region}, Rate: 25, Concurrency: 4,
		// A request stuck this long has failed: nothing in a healthy
		// cluster or a fault's recovery takes it.
		Client: &http.Client{Timeout: proccluster.Slack * 5 * time.Second}}
}

// step says what runFault waits for beyond the views.
type step struct {
	// catalogDuring holds the fault until the catalog and the hosts that
	// are up hold the declared counts without the target (instead of for
	// the fault's Hold).
	catalogDuring bool
	// catalogAfter waits, after the fault is undone, until the catalog and
	// the hosts hold the declared counts exactly.
	catalogAfter bool
}

// runFault injects f under steady load through the iad edge preferring
// ams, holds it, undoes it, and checks that no request failed and that the
// views (and the catalog, as st says) converged within their bounds. It
// reports whether all went well.
func runFault(t *testing.T, c *proccluster.Cluster, f proccluster.Fault, st step) bool {
	t.Helper()
	ok := true
	fail := func(format string, args ...any) {
		t.Helper()
		t.Errorf(format, args...)
		ok = false
	}
	ctx := context.Background()
	if err := waitFor(proccluster.HealBound(members), func() string { return c.Diff(ctx) }); err != nil {
		fail("before %s the views have not converged: %v", f, err)
		return false
	}
	load := devcluster.StartLoad(loadConfig(c, "iad-1", "ams"))
	defer load.Halt()
	lag := watchLag()
	defer lag.stop()
	time.Sleep(300 * time.Millisecond) // some requests before the fault
	begin := time.Now()
	if err := c.Apply(f); err != nil {
		fail("%s: %v", f, err)
		return false
	}
	applied := time.Now()
	switch f.Kind {
	case proccluster.KillHost:
		// Its machines are gone with it.
		if pids, err := c.Pids(f.Target); err != nil || len(pids) != 0 {
			fail("after the kill %s's namespace has processes %v (%v)", f.Target, pids, err)
		}
	case proccluster.PartitionHost:
		if n, err := c.Rules(f.Target); err != nil || n == 0 {
			fail("partitioned %s has %d rules (%v)", f.Target, n, err)
		}
	}
	// Every other host holds the target dead. (The target's own view, cut
	// off from all, is slower: its Lifeguard health stretches its probes
	// as it misses every ack. It is checked after the heal.)
	var others []string
	for _, h := range c.Hosts() {
		if h != f.Target {
			others = append(others, h)
		}
	}
	bound := proccluster.DetectBound(members)
	if err := waitCtx(bound, func(ctx context.Context) error { return c.WaitViews(ctx, others...) }); err != nil {
		fail("%s: the views did not converge within %v: %v", f, bound, err)
	} else {
		t.Logf("%s: every other host holds it dead after %v (bound %v)", f, since(begin), bound)
	}
	if st.catalogDuring {
		bound := proccluster.ReconcileBound(members)
		if err := waitFor(bound, func() string { return catalogDiff(c) }); err != nil {
			fail("%s: the catalog did not converge within %v: %v", f, bound, err)
		} else {
			t.Logf("%s: the catalog converged without it after %v (bound %v)", f, since(begin), bound)
		}
	} else if rest := f.Hold - time.Since(begin); rest > 0 {
		time.Sleep(rest)
	}
	undone := time.Now()
	if err := c.Undo(f); err != nil {
		fail("undo %s: %v", f, err)
		return false
	}
	bound = proccluster.HealBound(members)
	if err := waitCtx(bound, func(ctx context.Context) error { return c.WaitViews(ctx) }); err != nil {
		fail("after %s was undone the views did not converge within %v: %v", f, bound, err)
	} else {
		t.Logf("%s undone: every view converged after %v (bound %v)", f, since(undone), bound)
	}
	if st.catalogAfter {
		bound := proccluster.ReconcileBound(members)
		if err := waitFor(bound, func() string { return catalogDiff(c) }); err != nil {
			fail("after %s was undone the catalog did not converge within %v: %v", f, bound, err)
		} else {
			t.Logf("%s undone: the catalog converged after %v (bound %v)", f, since(undone), bound)
		}
	}
	load.Halt()
	ss := load.Samples()
	failed := map[string]int{}
	regions := map[string]int{}
	cut := 0
	worst := lag.stop()
	for _, s := range ss {
		if cutByKill(f, s, applied) {
			cut++
			t.Logf("a request sent %v after the fault was cut: its answer had begun on the killed host (%s)", s.Sent.Sub(begin).Round(time.Millisecond), s.Err)
			continue
		}
		if s.Failed() {
			cause := fmt.Sprintf("%d %s", s.Status, s.Cause)
			if failed[cause]++; failed[cause] == 1 {
				t.Logf("a request sent %v after the fault failed: %d %s", s.Sent.Sub(begin).Round(time.Millisecond), s.Status, s.Err)
			}
		}
		regions[s.Region]++
	}
	t.Logf("%s: %d requests, answered from %v; this process's 10 ms timer fired up to %v late", f, len(ss), regions, worst)
	if len(failed) > 0 {
		fail("%s: failed requests by cause: %v", f, failed)
	}
	if max := loadConfig(c, "iad-1", "ams").Concurrency; cut > max {
		fail("%s: %d answers cut by the kill, more than the %d requests in flight at once", f, cut, max)
	}
	return ok
}

// cutByKill reports whether s is a request whose answer the killed host
// had begun — the machine's 200 came, then the connection was cut — sent
// before the kill was over: the edge had passed the answer's head on to
// the client when the host died, so it could not send the request
// elsewhere. Only the requests in flight at the kill can be; any other
// failure counts.
func cutByKill(f proccluster.Fault, s devcluster.Sample, applied time.Time) bool {
	return f.Kind == proccluster.KillHost && s.Status == http.StatusOK && s.Err != "" && s.Sent.Before(applied)
}

// lagWatch measures how late a 10 ms ticker fires in this process: how
// long a runnable goroutine waits for a core, which the cluster's
// processes wait alike. A failure under a lag of tens of milliseconds is
// the machine's starvation meeting a protocol's fixed budget.
type lagWatch struct {
	done chan struct{}
	max  chan time.Duration
}

func watchLag() *lagWatch {
	w := &lagWatch{done: make(chan struct{}), max: make(chan time.Duration, 1)}
	go func() {
		var worst time.Duration
		tk := time.NewTicker(10 * time.Millisecond)
		defer tk.Stop()
		last := time.Now()
		for {
			select {
			case <-w.done:
				w.max <- worst
				return
			case now := <-tk.C:
				worst = max(worst, now.Sub(last)-10*time.Millisecond)
				last = now
			}
		}
	}()
	return w
}

// stop ends the watch and returns the worst lag (once; then zero).
func (w *lagWatch) stop() time.Duration {
	select {
	case <-w.done:
		return 0
	default:
	}
	close(w.done)
	return (<-w.max).Round(time.Millisecond)
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }

// waitCtx runs f with a context that ends after bound.
func waitCtx(bound time.Duration, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	return f(ctx)
}

// catalogDiff describes how the app's machines differ from the declared
// counts, as the control plane lists them (one started machine on a
// reachable host per declared slot, and no other) and as the hosts that
// are up run them (the same machines started, and no other: none left
// running that the catalog lost). "" when they all agree.
func catalogDiff(c *proccluster.Cluster) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ms, err := c.Client().List(ctx, app, api.ListMachinesOptions{})
	if err != nil {
		return "list: " + err.Error()
	}
	got := map[string]int{}
	var listed, other []string
	for _, m := range ms {
		if m.State == api.StateStarted && m.HostStatus == api.HostStatusOK {
			got[m.Region]++
			listed = append(listed, m.ID)
		} else {
			other = append(other, fmt.Sprintf("%s in %s %s (host %s)", m.ID, m.Region, m.State, m.HostStatus))
		}
	}
	if !maps.Equal(got, declared) || len(other) > 0 {
		return fmt.Sprintf("the catalog has started per region %v, want %v; and %v", got, declared, other)
	}
	var running []string
	where := map[string]string{}
	for _, h := range c.Members()[1:] {
		if c.State(h.ID) != proccluster.Up {
			continue
		}
		ms, err := c.HostClient(h).List(ctx, app, api.ListMachinesOptions{})
		if err != nil {
			return fmt.Sprintf("machines of %s: %v", h.ID, err)
		}
		for _, m := range ms {
			if m.State == api.StateStarted {
				running = append(running, m.ID)
				where[m.ID] = h.ID
			}
		}
	}
	slices.Sort(listed)
	slices.Sort(running)
	if !slices.Equal(listed, running) {
		return fmt.Sprintf("the catalog lists %v started, the hosts run %v (%v)", listed, running, where)
	}
	return ""
}

// machineHost returns the host running the app's machine in region, as
// the hosts' own APIs say.
func machineHost(t *testing.T, c *proccluster.Cluster, region string) string {
	t.Helper()
	for _, m := range c.Members()[1:] {
		if m.Region != region {
			continue
		}
		ms, err := c.HostClient(m).List(context.Background(), app, api.ListMachinesOptions{})
		if err != nil {
			t.Fatalf("machines of %s: %v", m.ID, err)
		}
		for _, mm := range ms {
			if mm.State == api.StateStarted {
				return m.ID
			}
		}
	}
	t.Fatalf("no host of %s runs a machine of %s", region, app)
	return ""
}

// waitFor polls diff until it returns "" or bound passes, and returns the
// last difference then.
func waitFor(bound time.Duration, diff func() string) error {
	deadline := time.Now().Add(bound)
	for {
		d := diff()
		if d == "" {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s", d)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
