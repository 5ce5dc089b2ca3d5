package devcluster

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/proxy/route"
	"github.com/flamehq/flame/internal/server"
)

// TestKillControlPlane: with the control plane killed, its API answers a
// 503 saying why at once (not a hang), while requests through the global
// entry keep being served from cluster state, none failing; restarted from
// its data dir at the same address, the same token lists the same apps.
func TestKillControlPlane(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1, ControlPlane: true, Chaos: true}, nil)
	url := c.Plane.URL()
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	org := api.NewClient(url, tok)
	if _, err := org.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	for _, h := range c.Hosts {
		port := freePort(t)
		if _, err := c.HostClient(h).Create(ctx, "demo", api.LaunchMachineInput{Config: demoConfig(port)}); err != nil {
			t.Fatalf("create on %s: %v", h.ID, err)
		}
	}
	waitUntil(t, "both machines routable at the ams edge", func() bool {
		n := 0
		for _, tg := range c.Hosts[0].Proxy.Table().Targets("demo", 80) {
			if tg.Excluded == route.Included {
				n++
			}
		}
		return n == 2
	})

	tr := &http.Transport{MaxIdleConnsPerHost: 8}
	t.Cleanup(tr.CloseIdleConnections)
	load := StartLoad(LoadConfig{URL: "http://" + c.GlobalAddr, Rate: 40, Concurrency: 4,
		Client: &http.Client{Transport: tr, Timeout: 20 * time.Second}})
	halted := false
	halt := func() {
		if !halted {
			halted = true
			load.Halt()
		}
	}
	t.Cleanup(halt) // before the cluster closes
	time.Sleep(300 * time.Millisecond)

	if err := c.KillControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.KillControlPlane(ctx); !errors.Is(err, ErrPlaneKilled) {
		t.Errorf("kill twice: %v, want ErrPlaneKilled", err)
	}
	// A refusal, not a hang: the client's deadline is far beyond what a
	// loopback answer takes on a busy machine.
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	_, err = org.ListApps(qctx, "personal")
	cancel()
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || !strings.Contains(ae.Message, "control plane is down") {
		t.Fatalf("the API with the plane down: %v, want a 503 saying why", err)
	}
	if st := c.Status(); st.ControlPlane != "killed" {
		t.Errorf("status: %+v", st)
	}
	// Traffic is served on, from cluster state alone: 20 more answers
	// (half a second of the load) with the plane down.
	served := func() int {
		n := 0
		for _, s := range load.Samples() {
			if !s.Failed() {
				n++
			}
		}
		return n
	}
	before := served()
	waitUntil(t, "20 requests served with the control plane down", func() bool { return served() >= before+20 })

	if err := c.RestartControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.RestartControlPlane(ctx); !errors.Is(err, ErrPlaneNotKilled) {
		t.Errorf("restart a live one: %v, want ErrPlaneNotKilled", err)
	}
	if c.Plane.URL() != url {
		t.Errorf("restarted at %s, want %s", c.Plane.URL(), url)
	}
	apps, err := org.ListApps(ctx, "personal")
	if err != nil || len(apps) != 1 || apps[0].Name != "demo" {
		t.Fatalf("apps after the restart, same token: %+v, %v", apps, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Errorf("the restarted plane did not rejoin: %v", err)
	}
	halt()
	samples := load.Samples()
	failed := 0
	for _, s := range samples {
		if s.Failed() {
			failed++
			t.Errorf("request sent at %s failed: %d %s (%s)", s.Sent.Format(time.StampMilli), s.Status, s.Err, s.Cause)
		}
	}
	t.Logf("%d requests, %d failed", len(samples), failed)
}

// TestPlaneRestartKeepsGroups: a control plane restarted from its data
// dir knows the hosts as members before their facts reach it; its
// reconciler must not take "shows no machine" for "has none" and destroy
// the groups' machines (it did: every machine older than LostAfter,
// replaced while traffic failed). The machines running before the restart
// are the ones running after it, through several reconciler passes.
func TestPlaneRestartKeepsGroups(t *testing.T) {
	ctx := context.Background()
	const lostAfter = 500 * time.Millisecond
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 2, ControlPlane: true, Chaos: true,
		Server: server.Config{LostAfter: lostAfter, ReconcileInterval: 100 * time.Millisecond}}, nil)
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	org := api.NewClient(c.Plane.URL(), tok)
	// A group per app, each in one region on a port of its own: exec
	// machines share the hosts' loopback.
	apps := map[string]string{"north": "ams", "west": "iad"}
	for app, region := range apps {
		if _, err := org.CreateApp(ctx, api.CreateAppInput{AppName: app, OrgSlug: "personal"}); err != nil {
			t.Fatal(err)
		}
		if _, err := org.PutGroup(ctx, app, api.Group{Name: "web", Regions: map[string]int{region: 1}, Config: demoConfig(freePort(t))}); err != nil {
			t.Fatal(err)
		}
	}
	machines := func() []string {
		var ms []string
		for _, h := range c.Hosts {
			if self := h.Cluster.Snapshot().Host(h.ID); self != nil {
				for _, m := range self.Machines {
					ms = append(ms, m.App+"/"+m.ID+" "+m.State)
				}
			}
		}
		slices.Sort(ms)
		return ms
	}
	waitUntil(t, "the groups' machines started", func() bool {
		ms := machines()
		return len(ms) == 2 && strings.HasSuffix(ms[0], " started") && strings.HasSuffix(ms[1], " started")
	})
	before := machines()
	time.Sleep(2 * lostAfter) // every machine older than LostAfter

	for round := range 3 {
		if err := c.KillControlPlane(ctx); err != nil {
			t.Fatal(err)
		}
		if err := c.RestartControlPlane(ctx); err != nil {
			t.Fatal(err)
		}
		// The restarted plane takes the reconciler lock at once (it keeps
		// its id); a pass runs every 100 ms. Watch 20 of them, on a busy
		// machine more than enough for the hosts' facts to arrive.
		end := time.Now().Add(20 * 100 * time.Millisecond)
		for time.Now().Before(end) {
			if now := machines(); !slices.Equal(now, before) {
				t.Fatalf("restart %d: the hosts hold %v, held %v: the restarted plane replaced machines", round+1, now, before)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}
