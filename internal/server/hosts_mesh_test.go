package server_test

import (
	"context"
	"testing"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestEnrollmentPlacesHostsInOneNetwork: every host enrolled gets the
// cluster's one network and a number of its own, which it keeps through a
// re-enrollment and which no host enrolled later is ever given again, not
// even after the first is revoked.
func TestEnrollmentPlacesHostsInOneNetwork(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	type place struct {
		n layout.Network
		h layout.Host
	}
	enroll := func(id, addr string) (place, string) {
		t.Helper()
		tok, err := c.admin.CreateJoinToken(ctx, api.CreateJoinTokenInput{HostID: id})
		if err != nil {
			t.Fatal(err)
		}
		dir := t.TempDir()
		if _, err := host.Enroll(ctx, host.Enrollment{DataDir: dir, PlaneURL: c.Plane.URL(), JoinToken: tok.Token,
			HostID: id, Region: "ams", APIAddr: addr}); err != nil {
			t.Fatalf("enroll %s: %v", id, err)
		}
		n, h, ok, err := host.LoadPlace(dir)
		if err != nil || !ok || n == 0 || h == 0 {
			t.Fatalf("%s's place: %v %v %v %v", id, n, h, ok, err)
		}
		return place{n, h}, dir
	}
	a, _ := enroll("mesh-a", "127.0.0.1:21")
	b, _ := enroll("mesh-b", "127.0.0.1:22")
	if a.n != b.n {
		t.Errorf("two hosts of one cluster in networks %s and %s", a.n, b.n)
	}
	if a.h == b.h {
		t.Errorf("two hosts given number %d", a.h)
	}
	again, _ := enroll("mesh-a", "127.0.0.1:21")
	if again != a {
		t.Errorf("mesh-a re-enrolled at %+v, was %+v", again, a)
	}
	if err := c.admin.RevokeHost(ctx, "mesh-b"); err != nil {
		t.Fatal(err)
	}
	d, _ := enroll("mesh-d", "127.0.0.1:23")
	if d.n != a.n || d.h == a.h || d.h == b.h {
		t.Errorf("mesh-d at %+v: a revoked host's number (%d) or a live one's (%d) given again", d, b.h, a.h)
	}
}
