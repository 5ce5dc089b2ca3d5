package cli

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/host"
)

// TestBenchFailover runs `flame bench failover` against a dev cluster of
// two regions, one demo machine in each behind the edges, for two seconds
// of load on each side of the default fault: killing ams, the region
// serving the global entry's client. No request fails, every request is
// served from iad soon after, and the latencies are there. The demo app
// also declares a group of one machine per region (exec machines share the
// host's ports: these serve nothing), whose count in iad, the remaining
// region, never falls short.
func TestBenchFailover(t *testing.T) {
	ctx := context.Background()
	dev := startDemoDev(t, 1)
	plane := declareDemoGroup(t, dev)
	waitFor(t, "the group's machines running", func() bool {
		g, err := plane.GetGroup(ctx, "demo", "app")
		return err == nil && g.Running["ams"] == 1 && g.Running["iad"] == 1
	})
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	edges := dev.Edges()
	for _, r := range []string{"ams", "iad"} {
		waitFor(t, "the "+r+" edge to serve its region's machine", func() bool {
			got, err := demoRegion(client, "http://"+edges[r])
			return err == nil && got == r
		})
	}
	code, out, stderr := run("bench", "failover", "--json", "--rate", "20", "--concurrency", "4", "--duration", "2s",
		"--api", dev.Plane.URL(), "--token-file", secretFile(t, dev.Plane.AdminToken), "--global", "http://"+dev.GlobalAddr)
	if code != 0 {
		t.Fatalf("flame bench failover: exit %d, %s", code, stderr)
	}
	t.Logf("%s%s", stderr, out)
	var r failoverReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("flame bench failover printed %q: %v", out, err)
	}
	if r.Fault != "kill-region ams" {
		t.Errorf("fault %q, want kill-region ams (the region serving the client)", r.Fault)
	}
	// 20 a second for four seconds, give or take the machine's pace.
	if r.Requests < 40 || r.Failed != 0 || len(r.FailedByCause) != 0 {
		t.Errorf("%d requests, %d failed %v; want some, none failed", r.Requests, r.Failed, r.FailedByCause)
	}
	if r.ServedElsewhereMS == nil || *r.ServedElsewhereMS < 0 || *r.ServedElsewhereMS > 2000 {
		t.Errorf("served elsewhere %v ms, want a time within the load after the fault", r.ServedElsewhereMS)
	}
	for name, l := range map[string]latencyFigure{"before": r.Before, "during": r.During, "after": r.After} {
		if l.Requests == 0 || l.P50MS <= 0 || l.P99MS < l.P50MS {
			t.Errorf("latency %s: %+v", name, l)
		}
	}
	if d := r.Declared; d.Group != "demo/app" || d.Regions["iad"] != 1 || !slices.Equal(d.Remaining, []string{"iad"}) ||
		d.FellShort || d.RestoredMS != nil || !strings.Contains(d.Note, "never fell short") {
		t.Errorf("declared counts %+v, want demo/app watched in iad, never short", d)
	}
	if !strings.Contains(stderr, "kill-region ams") || !strings.Contains(stderr, "sent") {
		t.Errorf("no progress on stderr: %q", stderr)
	}

	// The control-plane case: killed under load, not one request fails.
	code, out, stderr = run("bench", "failover", "--json", "--rate", "20", "--concurrency", "4", "--duration", "1s",
		"--fault", "kill-control-plane",
		"--api", dev.Plane.URL(), "--token-file", secretFile(t, dev.Plane.AdminToken), "--global", "http://"+dev.GlobalAddr)
	if code != 0 {
		t.Fatalf("flame bench failover --fault kill-control-plane: exit %d, %s", code, stderr)
	}
	t.Logf("%s%s", stderr, out)
	r = failoverReport{}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("flame bench failover printed %q: %v", out, err)
	}
	if r.Fault != "kill-control-plane" || r.Requests < 20 || r.Failed != 0 || !dev.PlaneDown() {
		t.Errorf("%s: %d requests, %d failed %v, plane down %v; want some, none failed, the plane down",
			r.Fault, r.Requests, r.Failed, r.FailedByCause, dev.PlaneDown())
	}
}

// TestBenchFailoverNoDeclaredCounts: an app without the group has no
// declared counts to restore, and the report says so rather than a figure.
func TestBenchFailoverNoDeclaredCounts(t *testing.T) {
	var b strings.Builder
	r := failoverReport{Fault: "kill-region ams", Declared: declaredFigure{Note: "no declared counts"}}
	if err := printFailoverReport(&b, r, false); err != nil || !strings.Contains(b.String(), "declared counts   no declared counts\n") {
		t.Errorf("report %q, %v", b.String(), err)
	}
}

func TestBenchFailoverUsage(t *testing.T) {
	t.Setenv("FLAME_ADMIN_TOKEN", "")
	for _, args := range [][]string{
		{"--rate", "0"},
		{"--rate", "100000"},
		{"--concurrency", "0"},
		{"--concurrency", "5000"},
		{"--duration", "1ms"},
		{"--duration", "2h"},
		{"--work", "-1s"},
		{"--restore-timeout", "1h"},
		{"--standbys", "-2"},
		{"--fault", "partition ams iad"},
		{"--fault", "kill-host"},
		{"--fault", "kill-control-plane ams"},
		{"--fault", "kill-machine a/b"},
		{"--global", "127.0.0.1:4379"},
		{"--app", "Demo!"},
		{"--client-region", "a b"},
		{"--rate", "many"},
		{"extra"},
		{}, // no admin token
	} {
		args = append([]string{"bench", "failover"}, args...)
		if len(args) > 2 {
			args = append(args, "--token-file", secretFile(t, "x"))
		}
		if code, _, stderr := run(args...); code != 2 || !strings.HasPrefix(stderr, "flame: ") {
			t.Errorf("flame %s: exit %d, stderr %q; want 2", strings.Join(args, " "), code, stderr)
		}
	}
}

// declareDemoGroup makes the org personal and its app demo on dev's control
// plane, declares the group app of one demo machine per region (exec
// machines share the host's ports: these serve nothing) and returns the
// org's client.
func declareDemoGroup(t *testing.T, dev *devcluster.Cluster) *api.Client {
	t.Helper()
	ctx := context.Background()
	org, err := dev.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	plane := api.NewClient(dev.Plane.URL(), org)
	if _, err := plane.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	if _, err := plane.PutGroup(ctx, "demo", api.Group{Name: "app", Regions: map[string]int{"ams": 1, "iad": 1},
		Config: &api.MachineConfig{Image: host.DemoImage, Env: map[string]string{"PORT": "0"}}}); err != nil {
		t.Fatal(err)
	}
	return plane
}
