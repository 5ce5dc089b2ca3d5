package server_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
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

// TestThreeServersSurviveLosingOne: three control planes share one catalog
// replicated three ways; with one of them gone, the other two still create,
// list and destroy machines, and one of them keeps the declared groups.
func TestThreeServersSurviveLosingOne(t *testing.T) {
	if testing.Short() {
		t.Skip("forms a three-server NATS cluster")
	}
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	var logMu sync.Mutex
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(tWriter{t, over, &logMu, &logs}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 2, Logger: log,
		NewDriver: func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		Cluster:   cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 65536}}, Identities: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	ports := freeRoutePorts(t, 3)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	// One key for all three, made before they start, as an operator would.
	keyFile := filepath.Join(t.TempDir(), "secret.key")
	if err := os.WriteFile(keyFile, bytes.Repeat([]byte{7}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	planes := make([]*server.Plane, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range planes {
		name := fmt.Sprintf("control-%d", i+1)
		if _, err := c.Net.AddHost(name); err != nil {
			t.Fatal(err)
		}
		tr, err := c.Net.Transport(name, 7946)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		wg.Go(func() {
			planes[i], errs[i] = server.StartPlane(ctx, server.PlaneConfig{
				DataDir: dir, Listener: ln, Logger: log.With("host", name), SecretKeyFile: keyFile,
				Catalog: catalog.Config{ServerName: name, ClusterListen: fmt.Sprintf("127.0.0.1:%d", ports[i]), Routes: routes, Replicas: 3},
				Cluster: cluster.Config{HostID: name, Region: "ams", Transport: tr},
				Join:    []string{c.Hosts[0].Cluster.GossipAddr()},
				Server:  server.Config{AgentToken: "agent-secret", GossipKey: c.GossipKey(), ReconcileInterval: 200 * time.Millisecond},
			})
		})
	}
	wg.Wait()
	for i, p := range planes {
		if errs[i] != nil {
			t.Fatalf("plane %d: %v", i+1, errs[i])
		}
		t.Cleanup(func() { p.Close() })
	}
	if err := c.EnrollWith(ctx, planes[0].Server, planes[0].URL()); err != nil {
		t.Fatal(err)
	}
	tok, err := planes[0].AddOrg(ctx, "acme", "Acme")
	if err != nil {
		t.Fatal(err)
	}
	client := func(i int) *api.Client { return api.NewClient(planes[i].URL(), tok) }
	for _, p := range planes {
		waitUntil(t, "every plane to see the hosts", 15*time.Second, func() bool {
			n := 0
			for _, h := range p.Cluster.Snapshot().Hosts() {
				if h.Up() && h.Free.CPUs > 0 {
					n++
				}
			}
			return n == 2
		})
	}
	if _, err := client(0).CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	if _, err := client(0).UpdateSecrets(ctx, "shop", map[string]*string{"K": new("v")}); err != nil {
		t.Fatal(err)
	}
	if _, err := client(1).PutGroup(ctx, "shop", api.Group{Name: "app", Config: demoConfig(), Regions: map[string]int{"ams": 2}}); err != nil {
		t.Fatal(err)
	}
	m1, err := client(2).Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the group to run", 15*time.Second, func() bool {
		return groupIs(t, client(1), "shop", "app", map[string]int{"ams": 2}, nil)
	})

	// Lose the first plane, and its catalog replica with it.
	if err := planes[0].Close(); err != nil {
		t.Logf("closing plane 1: %v", err)
	}
	// While the catalog elects new leaders for what the lost server led,
	// calls may answer 503 for a moment; clients retry those.
	var m2 *api.Machine
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if m2, err = client(1).Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); status(err) != 503 || time.Now().After(end) {
			break
		}
		t.Logf("retrying after: %v", err)
	}
	if err != nil {
		t.Fatalf("create with one server down: %v", err)
	}
	ms, err := client(2).List(ctx, "shop", api.ListMachinesOptions{})
	if err != nil || len(ms) != 4 {
		t.Fatalf("list with one server down: %v, %d machines", err, len(ms))
	}
	if err := client(2).Destroy(ctx, "shop", m1.ID, true); err != nil {
		t.Fatalf("destroy with one server down: %v", err)
	}
	if _, err := client(1).Get(ctx, "shop", m2.ID); err != nil {
		t.Fatal(err)
	}
	// A machine of the group destroyed by hand is replaced by whichever
	// plane now holds the reconciler lock.
	var victim string
	for _, m := range ms {
		if m.ID != m1.ID && m.Config != nil && m.Config.Metadata["fly_process_group"] == "app" {
			victim = m.ID
			break
		}
	}
	if victim == "" {
		t.Fatal("no group machine found")
	}
	if err := client(2).Destroy(ctx, "shop", victim, true); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the group to be whole again", 20*time.Second, func() bool {
		return groupIs(t, client(2), "shop", "app", map[string]int{"ams": 2}, nil)
	})
}

// freeRoutePorts finds free loopback ports below Linux's ephemeral range,
// where the kernel does not hand out ports by itself.
func freeRoutePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 1000 {
			t.Fatal("no free ports")
		}
		p := 20000 + rand.IntN(12768)
		if slices.Contains(ports, p) {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		ports = append(ports, p)
	}
	return ports
}
