package devcluster

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/proxy/route"
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
