package server_test

import (
	"context"
	"log/slog"
	"net"
	"net/http"
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

// TestCatalogDownAnswers503: with the NATS server under a control plane
// stopped, calls answer 503 (try again) — never 401 for a valid token, nor
// 404 for an app that exists — and a token the plane never saw is not
// called invalid either: the catalog could not say.
func TestCatalogDownAnswers503(t *testing.T) {
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	var logMu sync.Mutex
	var logs strings.Builder
	log := slog.New(slog.NewTextHandler(tWriter{t, over, &logMu, &logs}, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 1, Logger: log,
		NewDriver: func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		Cluster:   cluster.Config{Capacity: cluster.Resources{CPUs: 8, MemoryMB: 8192}}, Identities: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	// The catalog's NATS server runs apart from the plane, as with
	// `flame server --nats-url`, so that it can be stopped under it.
	octx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	nats, err := catalog.Open(octx, catalog.Config{DataDir: t.TempDir(), ClientListen: "127.0.0.1:0", Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	natsOpen := true
	t.Cleanup(func() {
		if natsOpen {
			nats.Close()
		}
	})
	if _, err := c.Net.AddHost("control"); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Net.Transport("control", 7946)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{
		DataDir: t.TempDir(), Listener: ln, Logger: log.With("host", "control"),
		Catalog: catalog.Config{URL: nats.ClientURL()},
		Cluster: cluster.Config{HostID: "control", Region: "ams", Transport: tr},
		Join:    []string{c.Hosts[0].Cluster.GossipAddr()},
		Server:  server.Config{AgentToken: "agent-secret", GossipKey: c.GossipKey()},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if err := c.EnrollWith(ctx, p.Server, p.URL()); err != nil {
		t.Fatal(err)
	}
	tok, err := p.AddOrg(ctx, "acme", "Acme")
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(p.URL(), tok)
	waitUntil(t, "the plane to see the host", 15*time.Second, func() bool {
		h := p.Cluster.Snapshot().Host(c.Hosts[0].ID)
		return h != nil && h.Up() && h.Free.CPUs > 0
	})
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Get(ctx, "shop", m.ID); err != nil {
		t.Fatalf("get with the catalog up: %v", err)
	}

	natsOpen = false
	if err := nats.Close(); err != nil {
		t.Fatalf("stop the catalog's server: %v", err)
	}
	calls := []struct {
		name string
		do   func(ctx context.Context) error
	}{
		{"get", func(ctx context.Context) error { _, err := cl.Get(ctx, "shop", m.ID); return err }},
		{"list", func(ctx context.Context) error {
			_, err := cl.List(ctx, "shop", api.ListMachinesOptions{})
			return err
		}},
		{"create", func(ctx context.Context) error {
			_, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
			return err
		}},
		{"stop", func(ctx context.Context) error { return cl.Stop(ctx, "shop", m.ID, api.StopMachineInput{}) }},
		{"unknown token", func(ctx context.Context) error {
			_, err := api.NewClient(p.URL(), "flame_never-issued").List(ctx, "shop", api.ListMachinesOptions{})
			return err
		}},
	}
	for _, call := range calls {
		// A catalog request that finds no server gives up after the NATS
		// client's request timeout (seconds); a minute is far beyond it.
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		start := time.Now()
		err := call.do(cctx)
		cancel()
		if status(err) != http.StatusServiceUnavailable {
			t.Errorf("%s with the catalog down: %v (status %d), want 503", call.name, err, status(err))
		}
		t.Logf("%s answered in %s: %v", call.name, time.Since(start).Round(time.Millisecond), err)
	}
}
