package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver/fake"
)

// TestGroupStaysInItsRegions: a group asking ams for more than ams has room
// for runs what fits there and nothing anywhere else; the rest is pending,
// with the reason, and the other regions keep all their room.
func TestGroupStaysInItsRegions(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams", "iad", "syd"}, perReg: 1,
		capacity: cluster.Resources{CPUs: 4, MemoryMB: 4096}, server: fastReconcile()})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(),
		Regions: map[string]int{"ams": 200}}); err != nil {
		t.Fatal(err)
	}
	outside := func() []string {
		var out []string
		for _, m := range c.Plane.Cluster.Snapshot().AppMachines("shop") {
			if m.Region != "ams" {
				out = append(out, m.ID+" in "+m.Region)
			}
		}
		return out
	}
	var g *api.Group
	waitUntil(t, "ams to be full and the rest pending", 20*time.Second, func() bool {
		var err error
		if g, err = cl.GetGroup(ctx, "shop", "web"); err != nil {
			t.Fatal(err)
		}
		st := g.Status["ams"]
		return len(outside()) > 0 || (st.Started == 4 && st.PendingReason != "")
	})
	if out := outside(); len(out) > 0 {
		t.Fatalf("the group spilled out of ams: %v", out)
	}
	st := g.Status["ams"]
	if st.Pending != 196 || !strings.Contains(st.PendingReason, "room") || g.Running["ams"] != 4 {
		t.Errorf("ams status %+v, running %v: want 4 started, 196 pending for lack of room", st, g.Running)
	}
	for _, h := range c.Plane.Cluster.Snapshot().Hosts() {
		if h.Region != "ams" && h.Capacity.CPUs > 0 && h.Free != h.Capacity {
			t.Errorf("host %s in %s: free %+v of %+v", h.ID, h.Region, h.Free, h.Capacity)
		}
	}
	// The other regions' room is there for other machines.
	for _, r := range []string{"iad", "syd"} {
		if _, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Region: r, Config: demoConfig()}); err != nil {
			t.Errorf("create in %s: %v", r, err)
		}
	}
	// Asked to spill, the group uses them.
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(),
		Regions: map[string]int{"ams": 6}, Spill: true}); err != nil {
		t.Fatal(err)
	}
	spilled := func() int {
		n := 0
		for _, m := range c.Plane.Cluster.Snapshot().AppMachines("shop") {
			if m.Region != "ams" && m.ProcessGroup == "web" {
				n++
			}
		}
		return n
	}
	waitUntil(t, "the spilled group to run", 20*time.Second, func() bool {
		return groupIs(t, cl, "shop", "web", map[string]int{"ams": 6}, nil) && spilled() == 2
	})
}

// TestGroupKeepsMachinesStarted: a stopped machine of a group is started
// again; one that cannot start is reported failed, with the cause, and the
// status tells started, stopped, failed and pending apart.
func TestGroupKeepsMachinesStarted(t *testing.T) {
	o := fastReconcile()
	o.FailureBackoff = time.Hour // a failure stops the region's starts for the test's length
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 1, server: o})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	// syd has no hosts: its machine is pending.
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "app", Config: demoConfig(),
		Regions: map[string]int{"ams": 1, "iad": 2, "syd": 1}}); err != nil {
		t.Fatal(err)
	}
	var g *api.Group
	status := func() map[string]api.GroupRegionStatus {
		var err error
		if g, err = cl.GetGroup(ctx, "shop", "app"); err != nil {
			t.Fatal(err)
		}
		return g.Status
	}
	waitUntil(t, "the group to run", 20*time.Second, func() bool {
		st := status()
		return st["ams"].Started == 1 && st["iad"].Started == 2 && st["syd"].Pending == 1 && st["syd"].PendingReason != ""
	})
	if r := g.Status["syd"].PendingReason; !strings.Contains(r, "no room") {
		t.Errorf("syd pending because %q", r)
	}
	byRegion := map[string][]string{}
	for _, m := range c.Plane.Cluster.Snapshot().AppMachines("shop") {
		byRegion[m.Region] = append(byRegion[m.Region], m.ID)
	}
	// Stopped (as after a restart of its host), it is started again.
	a := byRegion["ams"][0]
	if err := cl.Stop(ctx, "shop", a, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the stopped machine to be started again", 20*time.Second, func() bool {
		m, err := cl.Get(ctx, "shop", a)
		return err == nil && m.State == api.StateStarted
	})
	// One that cannot start is failed, and the group says why.
	i1, i2 := byRegion["iad"][0], byRegion["iad"][1]
	boom := errors.New("no such device")
	for _, d := range c.drivers {
		d.FailStart(i1, boom)
	}
	if err := cl.Stop(ctx, "shop", i1, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the machine that cannot start to be failed", 20*time.Second, func() bool {
		st := status()["iad"]
		return st.Failed == 1 && st.Failures > 0
	})
	if st := g.Status["iad"]; !strings.Contains(st.LastError, "no such device") || st.RetryAt.IsZero() ||
		!strings.Contains(g.LastError, "no such device") {
		t.Errorf("iad status %+v, last error %q: the cause and the retry are not shown", st, g.LastError)
	}
	// While iad backs off, a stopped machine stays stopped and is shown so.
	if err := cl.Stop(ctx, "shop", i2, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the status to show the stopped machine", 20*time.Second, func() bool {
		st := status()
		return st["iad"].Stopped == 1
	})
	want := map[string]api.GroupRegionStatus{
		"ams": {Started: 1},
		"iad": {Stopped: 1, Failed: 1},
		"syd": {Pending: 1},
	}
	for r, w := range want {
		got := g.Status[r]
		if got.Started != w.Started || got.Stopped != w.Stopped || got.Failed != w.Failed || got.Pending != w.Pending {
			t.Errorf("%s: %+v, want %+v", r, got, w)
		}
	}
	if g.Running["iad"] != 0 {
		t.Errorf("running %v counts machines that are not started", g.Running)
	}
}

// TestGroupBadImageBacksOff: a group whose image does not exist fails each
// machine it creates; the region backs off exponentially, the group shows
// the cause, and the log says what happened.
func TestGroupBadImageBacksOff(t *testing.T) {
	const base = 300 * time.Millisecond
	o := fastReconcile()
	o.FailureBackoff, o.FailureBackoffMax = base, time.Hour
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: o})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "bad")
	cfg := demoConfig()
	cfg.Image = fake.BadImagePrefix + "-nope:1"
	start := time.Now()
	if _, err := cl.PutGroup(ctx, "bad", api.Group{Name: "app", Config: cfg, Regions: map[string]int{"ams": 1}}); err != nil {
		t.Fatal(err)
	}
	var g *api.Group
	waitUntil(t, "three failures", 30*time.Second, func() bool {
		var err error
		if g, err = cl.GetGroup(ctx, "bad", "app"); err != nil {
			t.Fatal(err)
		}
		return g.Status["ams"].Failures >= 3
	})
	elapsed := time.Since(start)
	st := g.Status["ams"]
	if !strings.Contains(st.LastError, "never resolves") || !strings.Contains(g.LastError, "never resolves") || st.RetryAt.IsZero() {
		t.Errorf("status %+v, last error %q: the cause or the retry is missing", st, g.LastError)
	}
	if g.Running["ams"] != 0 {
		t.Errorf("a failed machine counted as running: %v", g.Running)
	}
	// The k-th create comes at least base·(2^(k-1) − 1) after the first,
	// so in the time elapsed there can have been at most this many. The
	// hosts' own request logs count them, whatever each answered.
	creates := 0
	for _, l := range strings.Split(c.Logs(), "\n") {
		if strings.Contains(l, "msg=request") && !strings.Contains(l, "host=control ") &&
			strings.Contains(l, "method=POST path=/v1/apps/bad/machines ") {
			creates++
		}
	}
	bound := 1 + int(math.Log2(float64(elapsed)/float64(base)+1))
	if creates < 3 || creates > bound {
		t.Errorf("%d creates in %s: want 3 to %d with a backoff from %s", creates, elapsed, bound, base)
	}
	if strings.Contains(c.Logs(), "missing from its host") {
		t.Error("the log calls a failed machine missing")
	}
}

// TestGroupMachineThatExitsBacksOff: a group machine whose command exits at
// once (exit 0: the default restart policy leaves it stopped) is not
// started again in a loop: each start that does not last counts as a
// failure of its region, which backs off, and the group says why, exit
// code included. (A machine stopped on request is started again at once:
// TestGroupKeepsMachinesStarted.)
func TestGroupMachineThatExitsBacksOff(t *testing.T) {
	const base = 500 * time.Millisecond
	o := fastReconcile()
	o.FailureBackoff, o.FailureBackoffMax = base, time.Hour
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: o})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cl, _ := orgWithApp(t, c, "acme", "quick")
	start := time.Now()
	if _, err := cl.PutGroup(ctx, "quick", api.Group{Name: "app", Config: demoConfig(), Regions: map[string]int{"ams": 1}}); err != nil {
		t.Fatal(err)
	}
	var id string
	waitUntil(t, "the group's machine", 20*time.Second, func() bool {
		ms, err := cl.List(ctx, "quick", api.ListMachinesOptions{})
		if err == nil && len(ms) == 1 {
			id = ms[0].ID
		}
		return id != ""
	})
	// Every workload of the machine exits as soon as it starts.
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for _, d := range c.drivers {
		wg.Go(func() {
			var p *fake.Proc
			for {
				var err error
				if p, err = d.WaitProcess(ctx, id, p); err != nil {
					return
				}
				p.Exit(0)
			}
		})
	}
	starts := func() int {
		n := 0
		for _, d := range c.drivers {
			n += d.Counts(id).Start
		}
		return n
	}
	// While the region backs off, the machine is shown stopped, with the
	// cause and when it is tried again.
	var g *api.Group
	shown := false
	waitUntil(t, "four starts", 30*time.Second, func() bool {
		var err error
		if g, err = cl.GetGroup(ctx, "quick", "app"); err != nil {
			t.Fatal(err)
		}
		st := g.Status["ams"]
		shown = shown || (st.Stopped == 1 && !st.RetryAt.IsZero() && strings.Contains(st.LastError, "after it was started"))
		return starts() >= 4
	})
	elapsed := time.Since(start)
	n := starts()
	// The first start may count as good (it ran until the workloads were
	// made to exit); from the second on, each fails, so the k-th start
	// comes at least base·(2^(k−2) − 1) after the second, which came after
	// start.
	bound := 2 + int(math.Log2(float64(elapsed)/float64(base)+1))
	if n > bound {
		t.Errorf("%d starts in %s: want at most %d with a backoff from %s", n, elapsed, bound, base)
	}
	if !shown {
		t.Errorf("the group never showed the stopped machine backing off with its cause: last %+v", g.Status["ams"])
	}
	if !strings.Contains(g.LastError, id) || !strings.Contains(g.LastError, "exit code 0") {
		t.Errorf("the group's last error %q does not name machine %s and its exit code", g.LastError, id)
	}
}

// TestGroupStartRefusedIsNotStarted: a start the host refuses with 409 (the
// machine is leased by someone else) did not start the machine: the log
// says so and never that the reconciler started it.
func TestGroupStartRefusedIsNotStarted(t *testing.T) {
	o := fastReconcile()
	o.FailureBackoff, o.FailureBackoffMax = 300*time.Millisecond, time.Second
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: o})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "held")
	if _, err := cl.PutGroup(ctx, "held", api.Group{Name: "app", Config: demoConfig(), Regions: map[string]int{"ams": 1}}); err != nil {
		t.Fatal(err)
	}
	var id string
	waitUntil(t, "the group's machine to start", 20*time.Second, func() bool {
		ms, err := cl.List(ctx, "held", api.ListMachinesOptions{})
		if err == nil && len(ms) == 1 && ms[0].State == api.StateStarted {
			id = ms[0].ID
		}
		return id != ""
	})
	l, err := cl.AcquireLease(ctx, "held", id, api.LeaseInput{TTL: 600})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.WithLeaseNonce(l.Data.Nonce).Stop(ctx, "held", id, api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	refused := "reconciler did not start machine"
	waitUntil(t, "the reconciler to try the leased machine", 20*time.Second, func() bool {
		for _, line := range strings.Split(c.Logs(), "\n") {
			if strings.Contains(line, refused) && strings.Contains(line, "machine="+id) {
				return true
			}
		}
		return false
	})
	for _, line := range strings.Split(c.Logs(), "\n") {
		if strings.Contains(line, "reconciler started machine") && strings.Contains(line, "machine="+id) {
			t.Errorf("a refused start is logged as a start: %s", line)
		}
	}
	if m, err := cl.Get(ctx, "held", id); err != nil || m.State != api.StateStopped {
		t.Errorf("the leased machine: %v, %v; want it stopped", m, err)
	}
}

// TestGroupsPerAppBounded: an app declares at most api.MaxGroupsPerApp
// groups, even when it declares many at once; past it a new group is
// refused with 422 naming the limit, while declaring one it has again is
// not.
func TestGroupsPerAppBounded(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: fastReconcile()})
	ctx := context.Background()
	cl, tok := orgWithApp(t, c, "acme", "many")
	put := func(i int) error {
		_, err := cl.PutGroup(ctx, "many", api.Group{Name: fmt.Sprintf("g%d", i), Config: demoConfig(), Regions: map[string]int{"ams": 0}})
		return err
	}
	count := func() int {
		code, body := rawGet(t, c.Plane.URL()+"/v1/apps/many/groups", tok)
		var out struct{ Groups []api.Group }
		if err := json.Unmarshal([]byte(body), &out); code != 200 || err != nil {
			t.Fatalf("list groups: %d %s: %v", code, body, err)
		}
		return len(out.Groups)
	}
	const n = api.MaxGroupsPerApp + 8
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = put(i) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			refused(t, fmt.Sprintf("group g%d declared at once with %d others", i, n-1), err, "MaxGroupsPerApp")
		}
	}
	if got := count(); got > api.MaxGroupsPerApp {
		t.Fatalf("%d groups declared at once: %d kept, want at most %d", n, got, api.MaxGroupsPerApp)
	}
	// One at a time, the app fills up to the limit, and no further.
	for i := 0; count() < api.MaxGroupsPerApp; i++ {
		if err := put(i); err != nil {
			t.Fatalf("group g%d, the app having fewer than %d: %v", i, api.MaxGroupsPerApp, err)
		}
	}
	refused(t, "one group more than the limit", put(n), "MaxGroupsPerApp")
	if got := count(); got != api.MaxGroupsPerApp {
		t.Errorf("%d groups kept, want %d", got, api.MaxGroupsPerApp)
	}
	if err := put(0); err != nil {
		t.Errorf("declaring a group the app has again: %v", err)
	}
}
