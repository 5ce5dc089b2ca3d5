package devcluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/http"
	"sync/atomic"
	"testing"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
)

// TestChaosAPIForgetsRevokedAdmin: the chaos API remembers the admin tokens
// the control plane verified, to be usable while the plane is down; a
// token the plane revokes is forgotten at once, so it opens nothing while
// the plane is up nor after it is killed.
func TestChaosAPIForgetsRevokedAdmin(t *testing.T) {
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(ctx, Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 1,
		Logger:       slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewDriver:    func(string, int, string) (driver.Driver, error) { return fake.New(), nil },
		ControlPlane: true, Chaos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	old := ChaosClient{URL: c.Plane.URL(), Token: c.Plane.AdminToken}
	next, err := api.NewClient(c.Plane.URL(), c.Plane.AdminToken).CreateToken(ctx, api.CreateTokenInput{Name: "admin-2", Admin: true})
	if err != nil {
		t.Fatal(err)
	}
	fresh := ChaosClient{URL: c.Plane.URL(), Token: next.Token}
	for _, cl := range []ChaosClient{old, fresh} {
		if _, err := cl.Status(ctx); err != nil {
			t.Fatalf("chaos status as admin: %v", err)
		}
	}
	if err := api.NewClient(c.Plane.URL(), next.Token).RevokeToken(ctx, hashHex(c.Plane.AdminToken)); err != nil {
		t.Fatal(err)
	}
	if err := c.KillControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
	var ae *api.Error
	if _, err := old.Status(ctx); !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable {
		t.Errorf("revoked admin token with the plane down: %v, want the 503 of an unverified token", err)
	}
	if _, err := fresh.Status(ctx); err != nil {
		t.Errorf("live admin token with the plane down: %v", err)
	}
	if _, err := fresh.Do(ctx, "restart-control-plane", ChaosRequest{}); err != nil {
		t.Fatalf("restart the plane: %v", err)
	}
	if _, err := old.Status(ctx); !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized {
		t.Errorf("revoked admin token with the plane back: %v, want 401", err)
	}
}

// hashHex is a token's id: the hex SHA-256 of its secret.
func hashHex(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}
