package server_test

import (
	"bytes"
	"context"
	"log/slog"
	"maps"
	"net"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
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
	// Destroyed there, they are listed with include_deleted like any
	// machine destroyed through the API.
	all, err := cl.List(ctx, "shop", api.ListMachinesOptions{IncludeDeleted: true})
	if err != nil {
		t.Fatal(err)
	}
	destroyed := map[string]bool{}
	for _, m := range all {
		if m.State == api.StateDestroyed {
			destroyed[m.ID] = true
		}
	}
	for id, host := range onHost {
		if host == victim && !destroyed[id] {
			t.Errorf("machine %s, destroyed on the returning host, is not listed with include_deleted (destroyed: %v)", id, destroyed)
		}
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
	waitUntil(t, "the plane to lead", 10*time.Second, old.Leading)
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
		Server:        server.Config{AgentToken: "agent-secret", GossipKey: c.GossipKey()}}); err == nil || !strings.Contains(err.Error(), "same key") {
		t.Fatalf("a plane with another secret key started: %v", err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{DataDir: dataDir, Listener: ln,
		Cluster: cluster.Config{HostID: "control-2", Region: "ams", Transport: tr},
		Join:    []string{c.Hosts[0].Cluster.GossipAddr()},
		Server:  server.Config{AgentToken: "agent-secret", ID: "restarted", GossipKey: c.GossipKey()}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	// The old plane gave its reconciler lock up as it closed: a restarted
	// one (or another) takes over at once, not when the lock expires.
	if holder, err := p.LockHolderForTest(ctx); err != nil || holder != "" && holder != "restarted" {
		t.Fatalf("reconciler lock after a clean close: held by %q (%v)", holder, err)
	}
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

// groupMachines lists a group's machines as the cluster shows them.
func groupMachines(c *dev, app, group string) []*cluster.Machine {
	var out []*cluster.Machine
	for _, m := range c.Plane.Cluster.Snapshot().AppMachines(app) {
		if m.ProcessGroup == group {
			out = append(out, m)
		}
	}
	return out
}

// TestReconcilerTrimsExtras: a group declared smaller destroys its extras,
// the newest first, and keeps the oldest.
func TestReconcilerTrimsExtras(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2, server: fastReconcile()})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	put := func(n int) {
		t.Helper()
		if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(), Regions: map[string]int{"ams": n}}); err != nil {
			t.Fatal(err)
		}
	}
	put(1)
	waitUntil(t, "one machine", 15*time.Second, func() bool { return len(groupMachines(c, "shop", "web")) == 1 })
	first := groupMachines(c, "shop", "web")[0].ID
	put(3)
	waitUntil(t, "three machines", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "web", map[string]int{"ams": 3}, nil) && len(groupMachines(c, "shop", "web")) == 3
	})
	put(1)
	waitUntil(t, "the extras to be destroyed", 15*time.Second, func() bool {
		ms := groupMachines(c, "shop", "web")
		return len(ms) == 1 && groupIs(t, cl, "shop", "web", map[string]int{"ams": 1}, nil)
	})
	if ms := groupMachines(c, "shop", "web"); ms[0].ID != first {
		t.Errorf("kept %s, not the oldest %s", ms[0].ID, first)
	}
	if ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{}); err != nil || len(ms) != 1 {
		t.Errorf("list after trimming: %v, %d machines", err, len(ms))
	}
}

// TestOneReconcilerAtATime: of two control planes on one catalog, one holds
// the reconciler lock and reconciles; the other waits, and takes over when
// the first dies, once the lock it left has expired.
func TestOneReconcilerAtATime(t *testing.T) {
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 1,
		Logger:    slog.New(slog.NewTextHandler(tWriter{t, over, new(sync.Mutex), new(strings.Builder)}, nil)),
		NewDriver: func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		Cluster:   cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 65536}}, Identities: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	cat, err := catalog.Open(ctx, catalog.Config{DataDir: t.TempDir(), Buckets: server.Buckets()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cat.Close() })
	key := bytes.Repeat([]byte{7}, 32)
	type plane struct {
		*server.Server
		url  string
		logs *strings.Builder
		mu   *sync.Mutex
	}
	var planes [2]plane
	for i := range planes {
		p := plane{logs: new(strings.Builder), mu: new(sync.Mutex)}
		log := slog.New(slog.NewTextHandler(tWriter{t, over, p.mu, p.logs}, nil)).With("plane", i)
		if p.Server, err = server.New(server.Config{Catalog: cat, Cluster: c.Hosts[0].Cluster, AgentToken: "agent-secret",
			SecretKey: key, ReconcileInterval: 200 * time.Millisecond, Logger: log}); err != nil {
			t.Fatal(err)
		}
		if err := p.Start(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { p.Close() })
		hs := httptest.NewServer(p.Handler())
		t.Cleanup(hs.Close)
		p.url = hs.URL
		planes[i] = p
	}
	if err := c.EnrollWith(ctx, planes[0].Server, planes[0].url); err != nil {
		t.Fatal(err)
	}
	// Never both at once, sampled for the whole test.
	stop := make(chan struct{})
	both := new(atomic.Bool)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if planes[0].Leading() && planes[1].Leading() {
				both.Store(true)
			}
		}
	}()
	defer func() {
		close(stop)
		<-done
		if both.Load() {
			t.Error("both control planes held the reconciler lock at once")
		}
	}()
	var leader int
	waitUntil(t, "one plane to lead", 15*time.Second, func() bool {
		switch {
		case planes[0].Leading():
			leader = 0
		case planes[1].Leading():
			leader = 1
		default:
			return false
		}
		return true
	})
	follower := 1 - leader
	admin, err := planes[follower].Bootstrap(ctx)
	if err != nil || admin == "" {
		t.Fatalf("bootstrap: %q %v", admin, err)
	}
	tok, err := planes[follower].AddOrg(ctx, "acme", "acme")
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(planes[follower].url, tok)
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	put := func(n int) {
		t.Helper()
		if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(), Regions: map[string]int{"ams": n}}); err != nil {
			t.Fatal(err)
		}
	}
	put(1)
	waitUntil(t, "the leader to run the group", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "web", map[string]int{"ams": 1}, nil)
	})
	placedBy := func(p plane) int {
		p.mu.Lock()
		defer p.mu.Unlock()
		return strings.Count(p.logs.String(), "reconciler placed machine")
	}
	if placedBy(planes[leader]) != 1 || placedBy(planes[follower]) != 0 {
		t.Fatalf("placed by the leader %d, by the follower %d", placedBy(planes[leader]), placedBy(planes[follower]))
	}
	// The leader dies; its lock stays until its TTL runs out, and then the
	// follower, which has waited all along, takes it.
	if planes[follower].Leading() {
		t.Fatal("the follower leads beside the leader")
	}
	planes[leader].Close()
	waitUntil(t, "the follower to take over", 30*time.Second, planes[follower].Leading)
	put(2)
	waitUntil(t, "the new leader to run the group", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "web", map[string]int{"ams": 2}, nil)
	})
	if placedBy(planes[follower]) != 1 {
		t.Errorf("the new leader placed %d machines, want 1", placedBy(planes[follower]))
	}
}

// TestForgetsEntriesNeverShown: an entry whose live host never shows its
// machine (a control plane died between recording it and asking the host)
// is kept while the host may still create it, and forgotten after
// LostAfter; a group's is replaced.
func TestForgetsEntriesNeverShown(t *testing.T) {
	var skew atomic.Int64 // the control plane's clock runs this far ahead
	o := fastReconcile()
	o.LostAfter = time.Hour
	o.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 1, server: o})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	var amsHost string
	for _, h := range c.Hosts {
		if h.Region == "ams" {
			amsHost = h.ID
		}
	}
	const solo, member = "00000000000a01", "00000000000a02"
	if err := c.Plane.RecordEntryForTest(ctx, "shop", solo, amsHost, "ams", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.Plane.RecordEntryForTest(ctx, "shop", member, amsHost, "ams", "web"); err != nil {
		t.Fatal(err)
	}
	has := func(id string) bool {
		ok, err := c.Plane.HasEntryForTest(ctx, "shop", id)
		if err != nil {
			t.Fatal(err)
		}
		return ok
	}
	// Declared after the entries: a pass that runs iad's machine has read
	// them, and kept them (the member counts for ams, being created).
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(),
		Regions: map[string]int{"ams": 1, "iad": 1}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "iad's machine", 15*time.Second, func() bool {
		g, err := cl.GetGroup(ctx, "shop", "web")
		return err == nil && g.Running["iad"] == 1
	})
	if !has(solo) || !has(member) {
		t.Fatalf("entries forgotten before LostAfter: solo %v, member %v", has(solo), has(member))
	}
	if n := len(groupMachines(c, "shop", "web")); n != 1 {
		t.Fatalf("%d group machines: the entry being created was not counted", n)
	}
	skew.Store(int64(time.Hour + time.Minute))
	waitUntil(t, "the entries to be forgotten and the member replaced", 30*time.Second, func() bool {
		g, err := cl.GetGroup(ctx, "shop", "web")
		return !has(solo) && !has(member) && err == nil && g.Running["ams"] == 1
	})
}

// TestAppRecreatedInheritsNothing: an app deleted while a host of its
// machines is down, and created again under the same name by another org,
// starts empty — no machines, groups or secrets of the old one — and the
// old machines are destroyed when their host returns.
func TestAppRecreatedInheritsNothing(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2, server: fastReconcile()})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.UpdateSecrets(ctx, "shop", map[string]*string{"K": new("v")}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(), Regions: map[string]int{"ams": 2}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the group to run", 15*time.Second, func() bool {
		return groupIs(t, cl, "shop", "web", map[string]int{"ams": 2}, nil)
	})
	old := map[string]string{} // machine → host
	for _, m := range groupMachines(c, "shop", "web") {
		old[m.ID] = m.Host
	}
	victim := c.Hosts[0]
	for _, h := range c.Hosts {
		if slices.Contains(slices.Collect(maps.Values(old)), h.ID) {
			victim = h
		}
	}
	c.Net.Kill(victim.ID)
	waitUntil(t, "the host to be dead", 30*time.Second, func() bool {
		h := c.Plane.Cluster.Snapshot().Host(victim.ID)
		return h != nil && !h.Up()
	})
	if err := cl.DeleteApp(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	other, _ := orgWithApp(t, c, "other", "shop")
	if ms, err := other.List(ctx, "shop", api.ListMachinesOptions{}); err != nil || len(ms) != 0 {
		t.Errorf("the new app lists %d machines (%v)", len(ms), err)
	}
	if ss, err := other.ListSecrets(ctx, "shop"); err != nil || len(ss) != 0 {
		t.Errorf("the new app has secrets %v (%v)", ss, err)
	}
	if _, err := other.GetGroup(ctx, "shop", "web"); status(err) != 404 {
		t.Errorf("the new app has the old group: %v", err)
	}
	for id := range old {
		if _, err := other.Get(ctx, "shop", id); status(err) != 404 {
			t.Errorf("the new app shows old machine %s: %v", id, err)
		}
	}
	c.Net.Revive(victim.ID)
	waitUntil(t, "the old machines to be destroyed everywhere", 30*time.Second, func() bool {
		for _, h := range c.Hosts {
			for _, am := range h.Agent.AllMachines() {
				if _, ok := old[am.Machine.ID]; ok {
					return false
				}
			}
		}
		for id := range old {
			if ok, err := c.Plane.HasEntryForTest(ctx, "shop", id); err != nil || ok {
				return false
			}
		}
		return true
	})
	if ms, err := other.List(ctx, "shop", api.ListMachinesOptions{}); err != nil || len(ms) != 0 {
		t.Errorf("the new app lists %d machines after the host returned (%v)", len(ms), err)
	}
}

// TestRevokedHostsMachinesReplaced: a revoked host's facts are refused for
// good, whatever its membership says; its group machines are lost, and
// replaced on the hosts that remain at once — not after LostAfter (an hour
// here), and never left counted as being created.
func TestRevokedHostsMachinesReplaced(t *testing.T) {
	o := fastReconcile()
	o.LostAfter = time.Hour
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2, server: o})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: demoConfig(), Regions: map[string]int{"ams": 1}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the group's machine", 15*time.Second, func() bool {
		return len(groupMachines(c, "shop", "web")) == 1 && groupIs(t, cl, "shop", "web", map[string]int{"ams": 1}, nil)
	})
	first := groupMachines(c, "shop", "web")[0]
	if err := c.admin.RevokeHost(ctx, first.Host); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "a replacement on the other host", 15*time.Second, func() bool {
		ms := groupMachines(c, "shop", "web")
		return len(ms) == 1 && ms[0].ID != first.ID && ms[0].Host != first.Host &&
			groupIs(t, cl, "shop", "web", map[string]int{"ams": 1}, nil)
	})
}
