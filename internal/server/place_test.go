package server_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/server"
)

// TestConcurrentCreatesNeverOvercommit: 200 creates at once against hosts
// with room for 160 machines: exactly 160 are placed, no host holds more than
// it has, the rest are refused with 503 and leave no trace.
func TestConcurrentCreatesNeverOvercommit(t *testing.T) {
	c := startDev(t, devOptions{capacity: cluster.Resources{CPUs: 40, MemoryMB: 40 * 256},
		server: server.Config{PendingTimeout: -1}})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	var wg sync.WaitGroup
	var placed, refused atomic.Int64
	for range 200 {
		wg.Go(func() {
			_, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
			switch {
			case err == nil:
				placed.Add(1)
			case errors.Is(err, api.ErrUnavailable):
				refused.Add(1)
			default:
				t.Errorf("create: %v", err)
			}
		})
	}
	wg.Wait()
	if placed.Load() != 160 || refused.Load() != 40 {
		t.Fatalf("placed %d, refused %d; want 160 and 40", placed.Load(), refused.Load())
	}
	for _, h := range c.Hosts {
		if u := h.Agent.Used(); u.CPUs > 40 || u.MemoryMB > 40*256 {
			t.Errorf("host %s over-committed: %+v", h.ID, u)
		}
	}
	ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{})
	if err != nil || len(ms) != 160 {
		t.Fatalf("list: %v, %d machines", err, len(ms))
	}
	// No trace: the catalog holds an entry for each placed machine and
	// none for a refused one (List shows only what the hosts report).
	if n := catalogEntries(t, c, "shop"); n != 160 {
		t.Fatalf("the catalog holds %d machine entries, want 160", n)
	}
}

// catalogEntries counts the catalog's machine entries of an app.
func catalogEntries(t *testing.T, c *dev, app string) int {
	t.Helper()
	b, err := c.Plane.Catalog.Bucket("machines")
	if err != nil {
		t.Fatal(err)
	}
	es, err := b.List(context.Background(), app+".")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// TestRefusingHostAsksTheNext: a host that advertises the most room but
// refuses every machine is asked first, and the next host gets the machine.
func TestRefusingHostAsksTheNext(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, capacity: cluster.Resources{CPUs: 8, MemoryMB: 8192}})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")

	// The liar: a cluster member with a huge advertised capacity whose API
	// answers every create with 503.
	var asked atomic.Int64
	startLiar(t, c, "liar", &asked)
	// Both hosts are empty, so the first create may go either way; from
	// the second on, spread makes the liar the better host.
	for range 2 {
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig(), Region: "ams"})
		if err != nil {
			t.Fatalf("create: %v", err)
		}
		if got, err := c.admin.Get(ctx, "shop", m.ID); err != nil || got.State != api.StateStarted {
			t.Fatalf("machine after a refusal: %v %+v", err, got)
		}
	}
	if asked.Load() == 0 {
		t.Fatal("the best-scored host was never asked")
	}
	if n := c.Hosts[0].Agent.Used().CPUs; n != 2 {
		t.Fatalf("the real host runs %d machines, want 2", n)
	}
}

// TestUnavailableImageAsksTheNext: a host that cannot get the image now
// (its registry unreachable) answers the create with 503, and the placer
// asks the next host, which runs the machine; the create succeeds.
func TestUnavailableImageAsksTheNext(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	down, up := c.Hosts[0], c.Hosts[1]
	c.drivers[down.ID].FailPrepare(fmt.Errorf("pull demo: cannot reach registry.test: %w", driver.ErrUnavailable))

	// Both hosts are empty, so the first create may go either way; from
	// the second on, spread makes the host that cannot pull the better one.
	asked := 0
	for range 2 {
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig(), Region: "ams"})
		if err != nil {
			t.Fatalf("create with one host unable to pull: %v", err)
		}
		asked += c.drivers[down.ID].Counts(m.ID).Prepare
		if got, err := c.admin.Get(ctx, "shop", m.ID); err != nil || got.State != api.StateStarted {
			t.Fatalf("machine after a 503: %v %+v", err, got)
		}
		if n := c.drivers[up.ID].Counts(m.ID).Start; n != 1 {
			t.Fatalf("machine %s started %d times on the host that can pull", m.ID, n)
		}
	}
	if asked == 0 {
		t.Fatal("the host that cannot pull was never asked")
	}
	if n := up.Agent.Used().CPUs; n != 2 {
		t.Fatalf("the host that can pull runs %d machines, want 2", n)
	}
	if n := len(down.Agent.AllMachines()); n != 0 {
		t.Fatalf("the host that cannot pull keeps %d live machines", n)
	}
}

// startLiar joins a cluster member with a huge advertised capacity whose
// API answers every create with 503, counting them in asked, and waits
// until the control plane sees its room.
func startLiar(t *testing.T, c *dev, name string, asked *atomic.Int64) {
	t.Helper()
	ctx := context.Background()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v1/host/revocations" { // the plane's list, not a create
			w.WriteHeader(http.StatusNoContent)
			return
		}
		asked.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(api.ErrorBody{Error: "insufficient capacity"})
	})}
	// Enrolled like any host: it is the refusals that are tested here.
	tok, err := c.Plane.MintJoinToken(ctx, name, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	id, err := host.Enroll(ctx, host.Enrollment{DataDir: dir, PlaneURL: c.Plane.URL(), JoinToken: tok.Token,
		HostID: name, Region: "ams", APIAddr: ln.Addr().String()})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(tls.NewListener(ln, pki.NewSlot(id).ServerTLS(time.Now)))
	t.Cleanup(func() { srv.Close() })
	if _, err := c.Net.AddHost(name); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Net.Transport(name, 7946)
	if err != nil {
		t.Fatal(err)
	}
	// Its gossip as an enrolled host's: the keyring and its own key.
	gt, err := host.LoadGossipTrust(dir)
	if err != nil || gt == nil {
		t.Fatalf("the liar's gossip trust: %v", err)
	}
	trust, err := host.ClusterTrust(id, gt)
	if err != nil {
		t.Fatal(err)
	}
	liar, err := cluster.New(cluster.Config{HostID: name, Region: "ams", Transport: tr, GossipKeys: gt.Keys, Trust: trust,
		Capacity: cluster.Resources{CPUs: 1000, MemoryMB: 1 << 20}, Addrs: map[string]string{"api": ln.Addr().String()}})
	if err != nil {
		t.Fatal(err)
	}
	if err := liar.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { liar.Close() })
	if _, err := liar.Join([]string{c.Hosts[0].Cluster.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	if err := liar.Publish(cluster.HostFacts{Free: cluster.Resources{CPUs: 1000, MemoryMB: 1 << 20}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the control plane to see "+name+"'s room", 10*time.Second, func() bool {
		h := c.Plane.Cluster.Snapshot().Host(name)
		return h != nil && h.Up() && h.Free.CPUs == 1000
	})
}

// TestPlacementAsksAtMostEight: with ten hosts that all advertise room and
// all refuse, a create asks exactly eight of them, then answers 503 and
// leaves no entry in the catalog.
func TestPlacementAsksAtMostEight(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, capacity: cluster.Resources{CPUs: 1, MemoryMB: 256},
		server: server.Config{PendingTimeout: -1}})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	// The one real host is full, so only the liars are candidates.
	if _, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); err != nil {
		t.Fatalf("fill the real host: %v", err)
	}
	var asked atomic.Int64
	for i := range 10 {
		startLiar(t, c, fmt.Sprintf("liar-%d", i), &asked)
	}
	_, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if status(err) != http.StatusServiceUnavailable {
		t.Fatalf("create refused by every host: %v, want 503", err)
	}
	if n := asked.Load(); n != 8 {
		t.Fatalf("%d hosts asked, want 8", n)
	}
	if n := catalogEntries(t, c, "shop"); n != 1 {
		t.Fatalf("the catalog holds %d machine entries, want the real host's 1", n)
	}
}

// TestFairQueueReclaimsBurst: an org that took every CPU while nobody else
// wanted any gives back one machine when another org, below its fair share,
// waits for room; the waiting create then succeeds.
func TestFairQueueReclaimsBurst(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, capacity: cluster.Resources{CPUs: 4, MemoryMB: 4096},
		server: server.Config{PendingTimeout: 15 * time.Second}})
	ctx := context.Background()
	greedy, _ := orgWithApp(t, c, "greedy", "hog")
	modest, _ := orgWithApp(t, c, "modest", "web")
	var hogs []string
	for range 4 {
		m, err := greedy.Create(ctx, "hog", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			t.Fatalf("burst create: %v", err)
		}
		hogs = append(hogs, m.ID)
	}
	m, err := modest.Create(ctx, "web", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatalf("create while another org bursts: %v", err)
	}
	if m.State != api.StateStarted {
		t.Fatalf("machine %s is %s", m.ID, m.State)
	}
	var stopped []string
	for _, id := range hogs {
		got, err := greedy.Get(ctx, "hog", id)
		if err != nil {
			t.Fatal(err)
		}
		if got.State == api.StateStopped {
			stopped = append(stopped, id)
		}
	}
	// The newest gives back: the last created.
	if len(stopped) != 1 || stopped[0] != hogs[len(hogs)-1] {
		t.Fatalf("stopped %v of the bursting org's machines %v, want only the newest", stopped, hogs)
	}
}

// TestEveryHostUnableToPullSaysWhy: when every host refuses a create
// because it cannot get the image now, the 503 says what the hosts said,
// not that no host has room.
func TestEveryHostUnableToPullSaysWhy(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2, server: server.Config{PendingTimeout: -1}})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	for _, h := range c.Hosts {
		c.drivers[h.ID].FailPrepare(fmt.Errorf("pull demo: cannot reach registry.test: %w", driver.ErrUnavailable))
	}
	_, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig(), Region: "ams"})
	if !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("create with no host able to pull: %v, want 503", err)
	}
	msg := err.Error()
	if strings.Contains(msg, "has room") || !strings.Contains(msg, "cannot reach registry.test") {
		t.Fatalf("the 503 does not say why: %s", msg)
	}
	for _, h := range c.Hosts {
		if !strings.Contains(msg, h.ID+":") {
			t.Errorf("the 503 does not name host %s: %s", h.ID, msg)
		}
	}
}

// TestCreateToSilencedHostEndsWithItsDeath: a host cut off while a create
// waits on it holds the create only until the cluster declares it dead —
// not for the host call's whole timeout (minutes), which held every caller
// and the reconciler behind it. The answer is 503 (the host may still have
// made the machine), and the entry stays for the reconciler to settle.
func TestCreateToSilencedHostEndsWithItsDeath(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	victim := c.Hosts[0].ID
	c.Net.Kill(victim)
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	start := time.Now()
	_, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig(), Region: "ams"})
	var ae *api.Error
	if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
		t.Fatalf("create to a silenced host after %v: %v, want a 503", time.Since(start), err)
	}
	if h := c.Plane.Cluster.Snapshot().Host(victim); h != nil && h.Up() {
		t.Fatalf("the create ended before the host was seen dead: %v", err)
	}
	t.Logf("answered after %v: %v", time.Since(start), err)
}
