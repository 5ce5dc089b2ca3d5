package devcluster

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/httpserve"
	"github.com/flamehq/flame/internal/httpserve/httpservetest"
)

// TestServersCutSlowClients plays a slowloris, a body that stops and an
// idle keep-alive against every HTTP server of a dev cluster reachable
// from outside — the control plane's address (API, registry, chaos API),
// the global entry, each host's API (inside its mutual TLS) — and checks each is cut at its
// bound: not before, and not later than the bound plus
// httpservetest.Allowance (the servers cut at their deadlines; the
// allowance is a busy machine's delay in noticing).
func TestServersCutSlowClients(t *testing.T) {
	small := httpserve.Limits{ReadHeader: 400 * time.Millisecond, Body: 400 * time.Millisecond,
		Write: 400 * time.Millisecond, Idle: 400 * time.Millisecond}
	t.Cleanup(httpserve.SetDefaults(small))
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(context.Background(), Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 2,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewDriver:    func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		ControlPlane: true, Chaos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })

	servers := map[string]string{
		"control plane": strings.TrimPrefix(c.Plane.URL(), "http://"),
		"global entry":  c.GlobalAddr,
	}
	for _, h := range c.Hosts {
		// Over the mutual TLS only the control plane's certificate opens.
		servers["host API "+h.ID] = tlsForward(t, c, h)
	}
	check := func(t *testing.T, what string, got time.Duration, err error, limit time.Duration) {
		t.Helper()
		if err != nil {
			t.Errorf("%s: %v after %v (bound %v)", what, err, got, limit)
		} else if got < limit-limit/8 {
			t.Errorf("%s: cut after %v, before its bound %v", what, got, limit)
		}
	}
	for name, addr := range servers {
		t.Run(name, func(t *testing.T) {
			d, err := httpservetest.Slowloris(addr, small.ReadHeader, small.ReadHeader/6)
			check(t, "slowloris", d, err, small.ReadHeader)
			d, err = httpservetest.SlowBody(addr, "/v1/apps", small.Body)
			check(t, "body that stops", d, err, small.Body)
			d, err = httpservetest.Idle(addr, "/v1/apps", small.Idle)
			check(t, "idle keep-alive", d, err, small.Idle)
		})
	}
}
