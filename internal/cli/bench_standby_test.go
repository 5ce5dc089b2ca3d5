package cli

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
)

// TestBenchFailoverStandbys runs `flame bench failover --standbys 1
// --fault "kill-host <host>"` against a dev cluster of ams and iad, two
// hosts each, where the demo app declares one machine per region: the
// command declares a warm standby per region and waits for them, then
// kills the host of the ams machine; the report has the standbys, ams
// falling short, and the time the declared counts were restored — by the
// reconciler starting the standby. No request fails.
func TestBenchFailoverStandbys(t *testing.T) {
	ctx := context.Background()
	dev := startDemoDev(t, 2)
	plane := declareDemoGroup(t, dev)
	// The ams group machine's host is the victim: the group's machines
	// are those the control plane lists beyond the hosts' own.
	var victim string
	waitFor(t, "the group's ams machine started", func() bool {
		g, err := plane.GetGroup(ctx, "demo", "app")
		if err != nil || g.Running["ams"] != 1 || g.Running["iad"] != 1 {
			return false
		}
		ms, err := plane.ListMachines(ctx, "demo", api.ListMachinesOptions{})
		if err != nil {
			return false
		}
		for _, m := range ms {
			if m.Region == "ams" && m.Config != nil && m.Config.Env["PORT"] == "0" && m.State == api.StateStarted {
				victim = hostOf(dev, m.ID)
			}
		}
		return victim != ""
	})
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	edges := dev.Edges()
	for _, r := range []string{"ams", "iad"} {
		waitFor(t, "the "+r+" edge to serve its region's machines", func() bool {
			got, err := demoRegion(client, "http://"+edges[r])
			return err == nil && got == r
		})
	}
	code, out, stderr := run("bench", "failover", "--json", "--rate", "20", "--concurrency", "8", "--duration", "2s",
		"--standbys", "1", "--fault", "kill-host "+victim,
		"--api", dev.Plane.URL(), "--token-file", secretFile(t, dev.Plane.AdminToken), "--global", "http://"+dev.GlobalAddr)
	if code != 0 {
		t.Fatalf("flame bench failover: exit %d, %s", code, stderr)
	}
	t.Logf("%s%s", stderr, out)
	var r failoverReport
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("flame bench failover printed %q: %v", out, err)
	}
	if r.Requests < 40 || r.Failed != 0 {
		t.Errorf("%d requests, %d failed %v; want some, none failed", r.Requests, r.Failed, r.FailedByCause)
	}
	d := r.Declared
	if d.Standbys != 1 || !d.FellShort || d.RestoredMS == nil || *d.RestoredMS <= 0 {
		t.Errorf("declared counts %+v, want 1 standby, ams short, then restored", d)
	}
	g, err := plane.GetGroup(ctx, "demo", "app")
	if err != nil || g.Standbys != 1 || g.Running["ams"] != 1 {
		t.Errorf("group after: %+v, %v; want 1 standby declared, ams running its 1", g, err)
	}
}

// hostOf finds the host running machine id.
func hostOf(dev *devcluster.Cluster, id string) string {
	for _, h := range dev.Hosts {
		if _, err := h.Agent.GetMachine(context.Background(), api.MachineRef{App: "demo", ID: id}); err == nil {
			return h.ID
		}
	}
	return ""
}
