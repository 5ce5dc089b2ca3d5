package server_test

import (
	"context"
	"log/slog"
	"net/http"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/server"
)

// BenchmarkControlPlaneOverhead times create→started (create, then wait)
// of a machine whose driver costs nothing, through the control plane and
// straight through the host, in the same run: what the control plane adds
// (auth, catalog reads and the entry's write, placement, a hop).
func BenchmarkControlPlaneOverhead(b *testing.B) {
	ctx := context.Background()
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: b.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 1,
		Logger:    slog.New(slog.DiscardHandler),
		NewDriver: func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		Cluster:   cluster.Config{Capacity: cluster.Resources{CPUs: 4096, MemoryMB: 1 << 20}}, ControlPlane: true,
		// The control plane's own cost: its calls to the host over
		// loopback, not the dev cluster's simulated network.
		Server: server.Config{HTTPClient: &http.Client{}},
	})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		b.Fatal(err)
	}
	tok, err := c.Plane.AddOrg(ctx, "acme", "Acme")
	if err != nil {
		b.Fatal(err)
	}
	plane := api.NewClient(c.Plane.URL(), tok)
	host := c.HostClient(c.Hosts[0])
	if _, err := plane.CreateApp(ctx, api.CreateAppInput{AppName: "bench", OrgSlug: "acme"}); err != nil {
		b.Fatal(err)
	}
	once := func(cl *api.Client) time.Duration {
		t0 := time.Now()
		m, err := cl.Create(ctx, "bench", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			b.Fatal(err)
		}
		if err := cl.Wait(ctx, "bench", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 10 * time.Second}); err != nil {
			b.Fatal(err)
		}
		return time.Since(t0)
	}
	var viaPlane, direct []time.Duration
	for b.Loop() {
		viaPlane = append(viaPlane, once(plane))
		direct = append(direct, once(host))
	}
	p50 := func(ds []time.Duration) float64 {
		s := append([]time.Duration(nil), ds...)
		for i := range s {
			for j := i + 1; j < len(s); j++ {
				if s[j] < s[i] {
					s[i], s[j] = s[j], s[i]
				}
			}
		}
		return float64(s[len(s)/2].Microseconds()) / 1000
	}
	b.ReportMetric(p50(viaPlane), "plane-p50-ms")
	b.ReportMetric(p50(direct), "host-p50-ms")
	b.ReportMetric(p50(viaPlane)-p50(direct), "overhead-p50-ms")
	b.ReportMetric(0, "ns/op")
}
