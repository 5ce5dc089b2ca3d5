package devcluster

import (
	"context"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
)

// What the chaos runs found, each pinned by a test of its own.

// heldPrepare is a fake driver whose Prepare waits until released: a
// create that takes as long as a slow image pull.
type heldPrepare struct {
	*fake.Driver
	entered chan struct{}
	release chan struct{}
}

func (d *heldPrepare) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	select {
	case d.entered <- struct{}{}:
	default:
	}
	select {
	case <-d.release:
	case <-ctx.Done():
		return driver.Image{}, ctx.Err()
	}
	return d.Driver.Prepare(ctx, spec)
}

// TestKillControlPlaneMidCreate: a control plane killed while its
// reconciler waits on a host's create dies at once, as a crashed process
// does, and starts again — found by a chaos run (seed 101 of the first
// sweep), where KillControlPlane waited for the create, which waits out a
// silenced network for up to five minutes.
func TestKillControlPlaneMidCreate(t *testing.T) {
	d := &heldPrepare{Driver: fake.New(), entered: make(chan struct{}, 1), release: make(chan struct{})}
	c := startPlaneDev(t, []string{"ams"}, func(string) driver.Driver { return d })
	t.Cleanup(func() { close(d.release) }) // before the cluster closes
	cl := appClient(t, c)
	ctx := context.Background()
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "app", Regions: map[string]int{"ams": 1},
		Config: &api.MachineConfig{Image: "demo", Guest: smallGuest}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the reconciler never asked the host for the group's machine")
	}
	killed := make(chan error, 1)
	go func() { killed <- c.KillControlPlane(ctx) }()
	// A kill takes what closing the plane's parts takes — its member's
	// leave (1 s), NATS — never the five minutes a create may wait.
	select {
	case err := <-killed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("KillControlPlane is still waiting for the reconciler's create, 30 s on")
	}
	if err := c.RestartControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
}
