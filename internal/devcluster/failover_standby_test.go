package devcluster

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
)

// Declared counts restored from warm standbys. A dev cluster of ams and iad,
// three hosts each, with its control plane; the app demo declares a group
// of two machines in ams and one in iad, with one warm standby in each
// region (created, not started). Once every machine is started and every
// standby ready, the host of one of the ams group's started machines (one
// holding no standby) is killed; the reconciler promotes the ams standby.
// Recorded, from the fault on, polling every 10 ms: when the first live
// host saw the killed host dead (the cluster's verdict, which the
// reconciler waits for), when the control plane's group first showed ams
// short, and when it showed ams back at its declared count.

// restoreRun is what a restoration run leaves to check and report.
type restoreRun struct {
	victim                string    // the host killed
	lost, standby         string    // the started machine lost with it, the standby expected to replace it
	at                    time.Time // the fault
	dead, short, restored time.Time
	overDeclared          []string // the declared counts exceeded, when seen
	standbyStarted        bool     // the standby runs afterwards
}

// groupMachines lists the demo group's machines by host: started, and the
// others (ready standbys).
func groupMachines(ctx context.Context, c *Cluster, region string) (started, standby map[string][]string, err error) {
	started, standby = map[string][]string{}, map[string][]string{}
	for _, h := range c.Hosts {
		if h.Region != region {
			continue
		}
		ms, err := h.Agent.ListMachines(ctx, "demo", api.ListMachinesOptions{})
		if err != nil {
			return nil, nil, fmt.Errorf("list machines of %s: %w", h.ID, err)
		}
		for _, m := range ms {
			switch m.State {
			case api.StateStarted:
				started[h.ID] = append(started[h.ID], m.ID)
			case api.StateStopped, api.StateCreated:
				standby[h.ID] = append(standby[h.ID], m.ID)
			}
		}
	}
	return started, standby, nil
}

func runRestore(t testing.TB) *restoreRun {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 3, ControlPlane: true}, nil)
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	plane := api.NewClient(c.Plane.URL(), tok)
	if _, err := plane.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	declared := map[string]int{"ams": 2, "iad": 1}
	if _, err := plane.PutGroup(ctx, "demo", api.Group{Name: "app", Regions: declared, Standbys: 1,
		Config: &api.MachineConfig{Image: host.DemoImage, Env: map[string]string{"PORT": "0"},
			Restart: &api.MachineRestart{Policy: api.RestartNo}}}); err != nil {
		t.Fatal(err)
	}
	run := &restoreRun{}
	var started, standby map[string][]string
	waitUntil(t, "the group's machines started and its standbys ready, a started one on a host without a standby", func() bool {
		g, err := plane.GetGroup(ctx, "demo", "app")
		if err != nil || g.Running["ams"] != 2 || g.Running["iad"] != 1 || g.Ready["ams"] != 1 || g.Ready["iad"] != 1 {
			return false
		}
		if started, standby, err = groupMachines(ctx, c, "ams"); err != nil {
			return false
		}
		// The ams edge (ams-1) is spared; the victim holds a started
		// machine and no standby.
		run.victim = ""
		for _, h := range []string{"ams-3", "ams-2"} {
			if len(started[h]) == 1 && len(standby[h]) == 0 {
				run.victim, run.lost = h, started[h][0]
				break
			}
		}
		return run.victim != ""
	})
	for _, ids := range standby {
		run.standby = ids[0]
	}
	var live *Host
	for _, h := range c.Hosts {
		if h.Region == "iad" {
			live = h
			break
		}
	}

	// Watch the group and the cluster's verdict from the fault on.
	var mu sync.Mutex
	wctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	run.at = time.Now()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for wctx.Err() == nil {
			now := time.Now()
			if h := live.Cluster.Snapshot().Host(run.victim); h != nil && h.Status == cluster.StatusDead {
				mu.Lock()
				if run.dead.IsZero() {
					run.dead = now
				}
				mu.Unlock()
			}
			if g, err := plane.GetGroup(wctx, "demo", "app"); err == nil {
				mu.Lock()
				for r, n := range g.Running {
					if n > declared[r] {
						run.overDeclared = append(run.overDeclared, fmt.Sprintf("%s: %d running of %d declared, +%v", r, n, declared[r], now.Sub(run.at)))
					}
				}
				switch {
				case g.Running["ams"] < declared["ams"] && run.short.IsZero():
					run.short = now
				case g.Running["ams"] >= declared["ams"] && !run.short.IsZero() && run.restored.IsZero():
					run.restored = now
				}
				mu.Unlock()
			}
			select {
			case <-wctx.Done():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	if err := c.KillHost(ctx, run.victim); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "ams back at its declared count", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !run.restored.IsZero()
	})
	cancel()
	wg.Wait()
	got, err := plane.GetMachine(ctx, api.MachineRef{App: "demo", ID: run.standby})
	run.standbyStarted = err == nil && got.State == api.StateStarted
	return run
}

func (run *restoreRun) String() string {
	ms := func(at time.Time) string {
		if at.IsZero() {
			return "never"
		}
		return fmt.Sprintf("%.0f ms", float64(at.Sub(run.at))/float64(time.Millisecond))
	}
	return fmt.Sprintf("host %s killed (machine %s lost, standby %s): seen dead %s, ams short %s, restored %s after the fault",
		run.victim, run.lost, run.standby, ms(run.dead), ms(run.short), ms(run.restored))
}

// TestFailoverRestoresFromStandby: when the host of a started machine of a
// group dies, the reconciler restores the declared count by promoting the
// region's warm standby — it is the standby that runs afterwards — and the
// group never runs more than it declares.
func TestFailoverRestoresFromStandby(t *testing.T) {
	run := runRestore(t)
	t.Log(run)
	if !run.standbyStarted {
		t.Errorf("standby %s is not started after the restoration", run.standby)
	}
	if len(run.overDeclared) > 0 {
		t.Errorf("declared counts exceeded: %s", strings.Join(run.overDeclared, "; "))
	}
	if run.short.IsZero() {
		t.Error("ams never showed short: the lost machine was not counted out")
	}
	if slices.Contains([]string{"", "ams-1"}, run.victim) {
		t.Errorf("victim %q", run.victim)
	}
}

// BenchmarkFailoverRestore measures the time from a host's death to its
// group's declared count restored from a warm standby (one run whatever
// b.N), and to the control plane counting the lost machine out (the
// cluster's verdict on the host: the reconciler's cue).
func BenchmarkFailoverRestore(b *testing.B) {
	for range b.N {
	}
	run := runRestore(b)
	fmt.Println(run)
	ms := func(at time.Time) float64 { return float64(at.Sub(run.at)) / float64(time.Millisecond) }
	b.ReportMetric(ms(run.short), "ms-counted-out")
	b.ReportMetric(ms(run.restored), "ms-restored")
}
