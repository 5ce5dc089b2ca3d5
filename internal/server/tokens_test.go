package server_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/server"
)

// clock is a settable time for the control plane.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// refusedEverywhere checks that tok opens neither the API nor the registry.
func refusedEverywhere(t *testing.T, d *dev, tok, want string) {
	t.Helper()
	ctx := context.Background()
	_, err := api.NewClient(d.Plane.URL(), tok).ListApps(ctx, "")
	if status(err) != 401 || !strings.Contains(err.Error(), want) {
		t.Errorf("API: %v, want a 401 saying %q", err, want)
	}
	if _, err := d.Plane.RegistryScope(ctx, tok); !errors.Is(err, registry.ErrUnauthorized) {
		t.Errorf("the registry still takes the token (%v)", err)
	}
}

// TestTokenManagement: tokens are listed without their secrets, each caller
// sees and revokes only the tokens the rules give it, and a revoked token
// is refused by the API and the registry from the very next request.
func TestTokenManagement(t *testing.T) {
	ctx := context.Background()
	d := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	orgA, tokA := orgWithApp(t, d, "acme", "web")
	orgB, _ := orgWithApp(t, d, "other", "db")

	appTok, err := orgA.CreateToken(ctx, api.CreateTokenInput{Name: "deploy", OrgSlug: "acme", App: "web"})
	if err != nil {
		t.Fatal(err)
	}
	roTok, err := orgA.CreateToken(ctx, api.CreateTokenInput{Name: "viewer", OrgSlug: "acme", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if appTok.ID == "" || appTok.CreatedAt == "" || appTok.ExpiresAt != "" || appTok.App != "web" {
		t.Fatalf("minted token: %+v", appTok.TokenInfo)
	}

	ids := func(cl *api.Client) []string {
		t.Helper()
		l, err := cl.ListTokens(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, ti := range l.Tokens {
			out = append(out, ti.Name)
		}
		return out
	}
	// The org's read-write token sees its org's tokens, not the admin's nor
	// another org's; narrower tokens see themselves.
	if got := strings.Join(ids(orgA), ","); got != "acme,deploy,viewer" {
		t.Errorf("org token lists %s, want acme,deploy,viewer", got)
	}
	if got := strings.Join(ids(api.NewClient(d.Plane.URL(), appTok.Token)), ","); got != "deploy" {
		t.Errorf("app token lists %s, want deploy", got)
	}
	if got := strings.Join(ids(api.NewClient(d.Plane.URL(), roTok.Token)), ","); got != "viewer" {
		t.Errorf("read-only token lists %s, want viewer", got)
	}
	if got := strings.Join(ids(d.admin), ","); got != "admin,acme,other,deploy,viewer" {
		t.Errorf("admin lists %s", got)
	}
	// Never a secret, in any form.
	code, body := rawGet(t, d.Plane.URL()+"/v1/tokens", d.Plane.AdminToken)
	if code != 200 {
		t.Fatalf("list: %d %s", code, body)
	}
	for _, secret := range []string{d.Plane.AdminToken, tokA, appTok.Token, roTok.Token, `"token"`} {
		if strings.Contains(body, secret) {
			t.Fatalf("the list shows %q: %s", secret, body)
		}
	}

	// Another org's token cannot revoke (nor see) acme's tokens: 404.
	if err := orgB.RevokeToken(ctx, appTok.ID); status(err) != 404 {
		t.Errorf("other org revoking: %v, want 404", err)
	}
	// The read-only token cannot revoke its siblings, only itself.
	ro := api.NewClient(d.Plane.URL(), roTok.Token)
	if err := ro.RevokeToken(ctx, appTok.ID); status(err) != 404 {
		t.Errorf("read-only token revoking a sibling: %v, want 404", err)
	}
	if err := ro.RevokeToken(ctx, roTok.ID); err != nil {
		t.Fatalf("revoking itself: %v", err)
	}
	refusedEverywhere(t, d, roTok.Token, "revoked")
	if err := orgA.RevokeToken(ctx, "nothex"); status(err) != 404 {
		t.Errorf("bad id: %v, want 404", err)
	}

	// Revoked by the org's token: refused at once, with no wait for the
	// catalog watch.
	if sc, err := d.Plane.RegistryScope(ctx, appTok.Token); err != nil || !sc.MayPush("acme/web") {
		t.Fatalf("the registry refuses a live token: %+v %v", sc, err)
	}
	appCl := api.NewClient(d.Plane.URL(), appTok.Token)
	if _, err := appCl.GetApp(ctx, "web"); err != nil {
		t.Fatal(err)
	}
	if err := orgA.RevokeToken(ctx, appTok.ID); err != nil {
		t.Fatal(err)
	}
	refusedEverywhere(t, d, appTok.Token, "revoked")
	if err := orgA.RevokeToken(ctx, appTok.ID); status(err) != 404 {
		t.Errorf("revoking twice: %v, want 404", err)
	}
	if _, err := orgA.GetApp(ctx, "web"); err != nil {
		t.Errorf("the org token stopped working: %v", err)
	}

	// The last admin token cannot be revoked; after minting another, it can.
	adminID := ""
	l, _ := d.admin.ListTokens(ctx)
	for _, ti := range l.Tokens {
		if ti.Admin {
			adminID = ti.ID
		}
	}
	if err := d.admin.RevokeToken(ctx, adminID); status(err) != 409 {
		t.Fatalf("revoking the last admin token: %v, want 409", err)
	}
	if _, err := orgA.CreateToken(ctx, api.CreateTokenInput{Admin: true}); status(err) != 403 {
		t.Errorf("org token minting an admin token: %v, want 403", err)
	}
	next, err := d.admin.CreateToken(ctx, api.CreateTokenInput{Name: "admin-2", Admin: true})
	if err != nil || !next.Admin || next.OrgSlug != "" {
		t.Fatalf("mint admin: %+v, %v", next, err)
	}
	if err := d.admin.RevokeToken(ctx, adminID); err != nil {
		t.Fatal(err)
	}
	refusedEverywhere(t, d, d.Plane.AdminToken, "revoked")
	if err := d.Plane.RequireAdmin(authRequest(d.Plane.AdminToken)); status(err) != 401 {
		t.Errorf("RequireAdmin with the revoked admin token: %v, want 401", err)
	}
	if err := d.Plane.RequireAdmin(authRequest(next.Token)); err != nil {
		t.Errorf("RequireAdmin with the new admin token: %v", err)
	}
}

// TestTokenExpiry: a token minted with a TTL works until then and is
// refused after with a 401 saying when it expired; a token minted by an
// expiring token expires no later; bad expiries are 422s naming the field.
func TestTokenExpiry(t *testing.T) {
	ctx := context.Background()
	clk := &clock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	d := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: server.Config{Now: clk.Now}})
	org, _ := orgWithApp(t, d, "acme", "web")

	for _, tc := range []struct {
		in    api.CreateTokenInput
		field string
	}{
		{api.CreateTokenInput{OrgSlug: "acme", TTLSeconds: 60, ExpiresAt: "2030-02-01T00:00:00Z"}, "expires_at and ttl_seconds"},
		{api.CreateTokenInput{OrgSlug: "acme", TTLSeconds: -1}, "ttl_seconds"},
		{api.CreateTokenInput{OrgSlug: "acme", TTLSeconds: 1 << 40}, "ttl_seconds"},
		{api.CreateTokenInput{OrgSlug: "acme", ExpiresAt: "2029-12-31T00:00:00Z"}, "expires_at"},
		{api.CreateTokenInput{OrgSlug: "acme", ExpiresAt: "tomorrow"}, "expires_at"},
	} {
		if _, err := org.CreateToken(ctx, tc.in); status(err) != 422 || !strings.Contains(err.Error(), tc.field) {
			t.Errorf("%+v: %v, want a 422 naming %s", tc.in, err, tc.field)
		}
	}

	tok, err := org.CreateToken(ctx, api.CreateTokenInput{Name: "ci", OrgSlug: "acme", TTLSeconds: 3600})
	if err != nil {
		t.Fatal(err)
	}
	if tok.ExpiresAt != "2030-01-01T01:00:00Z" {
		t.Fatalf("expires_at %q", tok.ExpiresAt)
	}
	ci := api.NewClient(d.Plane.URL(), tok.Token)
	// Minted by an expiring token: inherits its expiry, cannot exceed it.
	child, err := ci.CreateToken(ctx, api.CreateTokenInput{Name: "child", OrgSlug: "acme"})
	if err != nil || child.ExpiresAt != tok.ExpiresAt {
		t.Fatalf("child of an expiring token: %+v, %v", child, err)
	}
	if _, err := ci.CreateToken(ctx, api.CreateTokenInput{OrgSlug: "acme", TTLSeconds: 7200}); status(err) != 422 {
		t.Errorf("child outliving its parent: %v, want 422", err)
	}

	clk.add(time.Hour - time.Second)
	if _, err := ci.GetApp(ctx, "web"); err != nil {
		t.Fatalf("a second before expiry: %v", err)
	}
	if sc, err := d.Plane.RegistryScope(ctx, tok.Token); err != nil || !sc.MayPull("acme/web") {
		t.Fatalf("the registry refuses a live token: %+v %v", sc, err)
	}
	clk.add(time.Second)
	refusedEverywhere(t, d, tok.Token, "token expired at 2030-01-01T01:00:00Z")
	refusedEverywhere(t, d, child.Token, "token expired at")
	// The list still shows it, with its expiry, until it is revoked.
	l, err := org.ListTokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(l)
	if !strings.Contains(string(b), `"expires_at":"2030-01-01T01:00:00Z"`) {
		t.Errorf("list: %s", b)
	}
}

// TestAppTokenCannotDeleteApp: a token narrowed to an app works the app
// but cannot delete it.
func TestAppTokenCannotDeleteApp(t *testing.T) {
	ctx := context.Background()
	d := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	org, _ := orgWithApp(t, d, "acme", "web")
	tok, err := org.CreateToken(ctx, api.CreateTokenInput{OrgSlug: "acme", App: "web"})
	if err != nil {
		t.Fatal(err)
	}
	app := api.NewClient(d.Plane.URL(), tok.Token)
	v := "v"
	if _, err := app.UpdateSecrets(ctx, "web", map[string]*string{"K": &v}); err != nil {
		t.Fatalf("the app token cannot work its app: %v", err)
	}
	if err := app.DeleteApp(ctx, "web"); status(err) != 403 {
		t.Fatalf("app token deleting its app: %v, want 403", err)
	}
	if _, err := org.GetApp(ctx, "web"); err != nil {
		t.Fatalf("the app is gone: %v", err)
	}
	if err := org.DeleteApp(ctx, "web"); err != nil {
		t.Fatalf("the org token deleting the app: %v", err)
	}
}

func authRequest(tok string) *http.Request {
	r, _ := http.NewRequest("GET", "/", nil)
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}
