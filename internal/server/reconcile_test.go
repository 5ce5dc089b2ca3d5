package server_test

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/server"
)

func fastReconcile() server.Config {
	return server.Config{ReconcileInterval: 200 * time.Millisecond, LostAfter: 5 * time.Second}
}

// groupIs reports whether a group runs and keeps ready what it declares.
func groupIs(t *testing.T, cl *api.Client, app, name string, running, ready map[string]int) bool {
	t.Helper()
	g, err := cl.GetGroup(context.Background(), app, name)
	if err != nil {
		t.Fatalf("get group: %v", err)
	}
	for r, n := range running {
		if g.Running[r] != n {
			return false
		}
	}
	for r, n := range ready {
		if g.Ready[r] != n {
			return false
		}
	}
	return true
}

// TestReconcilerReplacesLostHost: a group keeps its count per region and a
// standby per region; when a host dies, its machines are replaced (the
// standby first), and when the host comes back its replaced machines are
// destroyed.
func TestReconcilerReplacesLostHost(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 2, server: fastReconcile()})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "app", Config: demoConfig(),
		Regions: map[string]int{"ams": 2, "iad": 1}, Standbys: 1}); err != nil {
		t.Fatal(err)
	}
	want := map[string]int{"ams": 2, "iad": 1}
	waitUntil(t, "the group to be running", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "app", want, map[string]int{"ams": 1, "iad": 1})
	})
	// The entries are written before the hosts are asked: wait for the
	// hosts to show all five, three started.
	waitUntil(t, "five machines, three started", 10*time.Second, func() bool {
		ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{})
		started := 0
		for _, m := range ms {
			if m.State == api.StateStarted {
				started++
			}
		}
		return err == nil && len(ms) == 5 && started == 3
	})
	// The host to kill runs one of the group's started ams machines but
	// not the ams standby, so the standby must take its place.
	snap := c.Plane.Cluster.Snapshot()
	onHost := map[string]string{} // machine → host, before the kill
	var standby, victim string
	for _, m := range snap.AppMachines("shop") {
		onHost[m.ID] = m.Host
		if m.Region == "ams" && m.State == api.StateCreated {
			standby = m.ID
		}
	}
	for _, m := range snap.AppMachines("shop") {
		if m.Region == "ams" && m.State == api.StateStarted && m.Host != onHost[standby] {
			victim = m.Host
		}
	}
	if standby == "" || victim == "" {
		t.Fatalf("no ams host with a started machine and without the standby %q: %v", standby, onHost)
	}
	// A machine outside the group on the same host: spread puts it there
	// (the victim runs fewer of the app's machines); ask until it does.
	var solo *api.Machine
	for try := 0; solo == nil; try++ {
		if try == 4 {
			t.Fatalf("no solo machine placed on %s", victim)
		}
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Region: "ams", Config: demoConfig()})
		if err != nil {
			t.Fatal(err)
		}
		var host string
		waitUntil(t, "the control plane to see the solo machine", 10*time.Second, func() bool {
			if cm := c.Plane.Cluster.Snapshot().Machine(m.ID); cm != nil {
				host = cm.Host
			}
			return host != ""
		})
		if host == victim {
			solo = m
		} else if err := cl.Destroy(ctx, "shop", m.ID, true); err != nil {
			t.Fatal(err)
		}
	}
	t.Logf("killing %s", victim)
	c.Net.Kill(victim)
	var survivors []string // the started ams machines once replaced
	waitUntil(t, "machines on the dead host to be replaced", 30*time.Second, func() bool {
		if h := c.Plane.Cluster.Snapshot().Host(victim); h == nil || h.Up() {
			return false
		}
		ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{})
		if err != nil {
			return false
		}
		live := map[string]int{}
		soloUnreachable := false
		survivors = survivors[:0]
		for _, m := range ms {
			if m.State == api.StateStarted && m.HostStatus == api.HostStatusOK {
				live[m.Region]++
				if m.Region == "ams" {
					survivors = append(survivors, m.ID)
				}
			}
			soloUnreachable = soloUnreachable || (m.ID == solo.ID && m.HostStatus == api.HostStatusUnreachable)
		}
		return live["ams"] >= 2 && live["iad"] >= 1 && soloUnreachable
	})
	// The ams machine lost with the victim was replaced by the standby,
	// started in place: no new machine was placed for it.
	if !slices.Contains(survivors, standby) {
		t.Errorf("the standby %s was not started in place of the lost machine (started in ams: %v)", standby, survivors)
	}
	for _, id := range survivors {
		if host, ok := onHost[id]; !ok || host == victim {
			t.Errorf("machine %s (on %q) was placed in ams while a standby was ready", id, host)
		}
	}
	// The solo machine is not replaced (it has no group); destroyed while
	// its host is down, it leaves the API at once.
	if err := cl.Destroy(ctx, "shop", solo.ID, true); err != nil {
		t.Fatalf("destroy on a dead host: %v", err)
	}
	if _, err := cl.Get(ctx, "shop", solo.ID); status(err) != 404 {
		t.Fatalf("a destroyed machine on a dead host: %v", err)
	}
	waitUntil(t, "the group's standbys to be refilled", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "app", want, map[string]int{"ams": 1, "iad": 1})
	})
	// The host returns: what it still runs of the group was replaced, so
	// it is destroyed.
	c.Net.Revive(victim)
	var victimHost = c.Hosts[0]
	for _, h := range c.Hosts {
		if h.ID == victim {
			victimHost = h
		}
	}
	waitUntil(t, "replaced machines on the returning host to be destroyed", 30*time.Second, func() bool {
		for _, am := range victimHost.Agent.AllMachines() {
			if am.App == "shop" {
				return false
			}
		}
		return true
	})
	if !groupIs(t, cl, "shop", "app", want, map[string]int{"ams": 1, "iad": 1}) {
		t.Fatal("the group is not as declared after the host returned")
	}
}

// TestRestartKeepsEverything: a control plane restarted on its data dir
// keeps every org, app, token, secret, machine entry and group.
func TestRestartKeepsEverything(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	cl, tok := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.UpdateSecrets(ctx, "shop", map[string]*string{"K": new("v")}); err != nil {
		t.Fatal(err)
	}
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "worker", Config: demoConfig(), Regions: map[string]int{"ams": 1}}); err != nil {
		t.Fatal(err)
	}
	old := c.Plane
	dataDir := old.DataDir()
	if err := old.Close(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Net.AddHost("control-2"); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Net.Transport("control-2", 7946)
	if err != nil {
		t.Fatal(err)
	}
	// With another secret key it refuses to start: it could not open the
	// secrets in the catalog.
	if _, err := c.Net.AddHost("control-x"); err != nil {
		t.Fatal(err)
	}
	trx, err := c.Net.Transport("control-x", 7946)
	if err != nil {
		t.Fatal(err)
	}
	lnx, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lnx.Close()
	if _, err := server.StartPlane(ctx, server.PlaneConfig{DataDir: dataDir, Listener: lnx,
		SecretKeyFile: filepath.Join(t.TempDir(), "other.key"),
		Cluster:       cluster.Config{HostID: "control-x", Region: "ams", Transport: trx},
		Server:        server.Config{AgentToken: "agent-secret"}}); err == nil || !strings.Contains(err.Error(), "same key") {
		t.Fatalf("a plane with another secret key started: %v", err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{DataDir: dataDir, Listener: ln,
		Cluster: cluster.Config{HostID: "control-2", Region: "ams", Transport: tr},
		Join:    []string{c.Hosts[0].Cluster.GossipAddr()},
		Server:  server.Config{AgentToken: "agent-secret"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if p.AdminToken != "" {
		t.Error("a restarted control plane made a second admin token")
	}
	cl = api.NewClient(p.URL(), tok)
	waitUntil(t, "the restarted plane to see the host", 10*time.Second, func() bool {
		h := p.Cluster.Snapshot().Host(c.Hosts[0].ID)
		return h != nil && h.Up()
	})
	if got, err := cl.Get(ctx, "shop", m.ID); err != nil || got.State != api.StateStarted {
		t.Fatalf("machine after restart: %v %+v", err, got)
	}
	if ss, err := cl.ListSecrets(ctx, "shop"); err != nil || len(ss) != 1 {
		t.Fatalf("secrets after restart: %v %+v", err, ss)
	}
	if apps, err := cl.ListApps(ctx, "acme"); err != nil || len(apps) != 1 {
		t.Fatalf("apps after restart: %v %+v", err, apps)
	}
	waitUntil(t, "the group to run after restart", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "worker", map[string]int{"ams": 1}, nil)
	})
}
