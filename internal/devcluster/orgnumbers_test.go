package devcluster

import (
	"context"
	"log/slog"
	"sync/atomic"
	"testing"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestHostsOnlyOrgNumbers: without a control plane, two hosts that each
// see a different org first give them distinct numbers, and each org the
// same number on both hosts; the numbering outlives the cluster. Each
// host numbering by itself gave both orgs 1.
func TestHostsOnlyOrgNumbers(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	drivers := make([]*fake.Driver, 2)
	c, err := Start(ctx, Config{
		Dir: dir, Token: "t", Seed: 1, Regions: []string{"ams", "iad"}, HostsPerRegion: 1,
		Logger: slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewDriver: func(_ string, i int, _ string) (driver.Driver, error) {
			drivers[i] = fake.New()
			return drivers[i], nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if len(c.Hosts) != 2 {
		t.Fatalf("%d hosts, want 2", len(c.Hosts))
	}
	orgOn := func(host int, org string) layout.Org {
		t.Helper()
		m, err := c.HostClient(c.Hosts[host]).Create(ctx, "app-"+org, api.LaunchMachineInput{
			Org: org, Config: &api.MachineConfig{Image: "img"},
		})
		if err != nil {
			t.Fatalf("create on host %d in org %s: %v", host, org, err)
		}
		p := drivers[host].Process(m.ID)
		if p == nil {
			t.Fatalf("machine %s of org %s not started on host %d", m.ID, org, host)
		}
		return p.Spec().Org
	}
	// Each host sees a different org first.
	a0 := orgOn(0, "alpha")
	b1 := orgOn(1, "beta")
	b0 := orgOn(0, "beta")
	a1 := orgOn(1, "alpha")
	t.Logf("alpha: %d on host 0, %d on host 1; beta: %d on host 0, %d on host 1", a0, a1, b0, b1)
	if a0 == 0 || b0 == 0 {
		t.Fatalf("an org numbered 0: alpha %d, beta %d", a0, b0)
	}
	if a0 != a1 || b0 != b1 {
		t.Errorf("an org's number differs between hosts: alpha %d/%d, beta %d/%d", a0, a1, b0, b1)
	}
	if a0 == b1 || a1 == b0 {
		t.Errorf("two orgs share a number across hosts: alpha %d/%d, beta %d/%d", a0, a1, b0, b1)
	}
	// The numbering is kept: a cluster started again on the directory
	// gives the same numbers, and a new org the next one.
	again, err := loadOrgNumbers(dir)
	if err != nil {
		t.Fatal(err)
	}
	if n, _ := again.OrgNumber("alpha"); n != a0 {
		t.Errorf("alpha after a restart: %d, want %d", n, a0)
	}
	if n, _ := again.OrgNumber("gamma"); n == a0 || n == b0 || n == 0 {
		t.Errorf("a third org got %d (alpha %d, beta %d)", n, a0, b0)
	}
}
