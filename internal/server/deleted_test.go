package server_test

import (
	"context"
	"slices"
	"testing"

	"github.com/flamehq/flame/api"
)

// TestListIncludeDeleted: include_deleted=true on the control plane lists
// the app's destroyed machines beside its live ones; an app deleted and
// created again under the same name sees none of the earlier app's.
func TestListIncludeDeleted(t *testing.T) {
	c := startDev(t, devOptions{})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ids := func(ms []*api.Machine) []string {
		var out []string
		for _, m := range ms {
			out = append(out, m.ID+"/"+m.State)
		}
		slices.Sort(out)
		return out
	}
	list := func(deleted bool) []string {
		t.Helper()
		ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{IncludeDeleted: deleted})
		if err != nil {
			t.Fatal(err)
		}
		return ids(ms)
	}
	create := func() string {
		t.Helper()
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			t.Fatal(err)
		}
		return m.ID
	}
	keep, gone := create(), create()
	if err := cl.Destroy(ctx, "shop", gone, true); err != nil {
		t.Fatal(err)
	}
	if got, want := list(false), []string{keep + "/started"}; !slices.Equal(got, want) {
		t.Fatalf("list = %v, want %v", got, want)
	}
	want := []string{keep + "/started", gone + "/destroyed"}
	slices.Sort(want)
	if got := list(true); !slices.Equal(got, want) {
		t.Fatalf("list with include_deleted = %v, want %v", got, want)
	}

	// The app goes, with its machines; a new app of the same name starts
	// with nothing, destroyed or not.
	if err := cl.DeleteApp(ctx, "shop"); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	if got := list(true); len(got) != 0 {
		t.Fatalf("the new app lists the old app's machines: %v", got)
	}
	again := create()
	if err := cl.Destroy(ctx, "shop", again, true); err != nil {
		t.Fatal(err)
	}
	if got, want := list(true), []string{again + "/destroyed"}; !slices.Equal(got, want) {
		t.Fatalf("list with include_deleted = %v, want %v", got, want)
	}
}
