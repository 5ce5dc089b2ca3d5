package server_test

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// TestIncludeDeletedSkewedClocks: an app deleted and made again under the
// same name by another org sees none of the earlier app's destroyed
// machines, though the hosts' clocks run an hour ahead of the control
// plane's (so the earlier machines look created after the new app).
func TestIncludeDeletedSkewedClocks(t *testing.T) {
	var behind atomic.Int64 // the control plane's clock runs this far behind the hosts'
	o := fastReconcile()
	o.Now = func() time.Time { return time.Now().Add(-time.Duration(behind.Load())) }
	c := startDev(t, devOptions{server: o})
	ctx := context.Background()
	acme, _ := orgWithApp(t, c, "acme", "shop")
	var old []string
	for range 3 {
		m, err := acme.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			t.Fatal(err)
		}
		old = append(old, m.ID)
	}
	if err := acme.Destroy(ctx, "shop", old[0], true); err != nil {
		t.Fatal(err)
	}
	ms, err := acme.List(ctx, "shop", api.ListMachinesOptions{IncludeDeleted: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 3 {
		t.Fatalf("acme's list with include_deleted has %d machines, want 3", len(ms))
	}
	if err := acme.DeleteApp(ctx, "shop"); err != nil {
		t.Fatal(err)
	}

	behind.Store(int64(time.Hour))
	other, _ := orgWithApp(t, c, "other", "shop")
	list := func() []string {
		t.Helper()
		ms, err := other.List(ctx, "shop", api.ListMachinesOptions{IncludeDeleted: true})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, m := range ms {
			out = append(out, m.ID+"/"+m.State)
		}
		slices.Sort(out)
		return out
	}
	if got := list(); len(got) != 0 {
		t.Fatalf("the new app lists the earlier app's machines: %v (earlier: %v)", got, old)
	}
	m, err := other.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if err := other.Destroy(ctx, "shop", m.ID, true); err != nil {
		t.Fatal(err)
	}
	if got, want := list(), []string{m.ID + "/destroyed"}; !slices.Equal(got, want) {
		t.Fatalf("list with include_deleted = %v, want %v (earlier: %v)", got, want, old)
	}
}

// TestIncludeDeletedAsksOnlyItsHosts: a list with include_deleted asks for
// destroyed machines only the host that keeps them, not every live host.
func TestIncludeDeletedAsksOnlyItsHosts(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 2}) // four hosts
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if err := cl.Destroy(ctx, "shop", m.ID, true); err != nil {
		t.Fatal(err)
	}
	// Hosts log each request they serve (a request line names the host).
	asked := func(logs string) map[string]int {
		out := map[string]int{}
		for _, l := range strings.Split(logs, "\n") {
			if !strings.Contains(l, "msg=request ") || !strings.Contains(l, `path=/v1/apps/shop/machines query="include_deleted=true"`) {
				continue
			}
			f := strings.Fields(l[strings.Index(l, "msg=request "):])
			if len(f) > 1 && strings.HasPrefix(f[1], "host=") && f[1] != "host=control" {
				out[strings.TrimPrefix(f[1], "host=")]++
			}
		}
		return out
	}
	before := len(c.Logs())
	ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{IncludeDeleted: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 1 || ms[0].ID != m.ID || ms[0].State != "destroyed" {
		t.Fatalf("list with include_deleted = %v, want %s destroyed", ms, m.ID)
	}
	// A host logs a request as its handler returns, before the server
	// flushes a small answer; the wait covers the case where it does not.
	waitUntil(t, "the host's request line", 10*time.Second, func() bool { return len(asked(c.Logs()[before:])) > 0 })
	if got := asked(c.Logs()[before:]); len(got) != 1 {
		t.Fatalf("include_deleted asked %d hosts (%v), want only the one that keeps the machine", len(got), got)
	}
}
