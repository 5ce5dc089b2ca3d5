package server_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	fly "github.com/superfly/fly-go"
	"github.com/superfly/fly-go/flaps"
	"github.com/superfly/fly-go/tokens"

	"github.com/flamehq/flame/api"
)

// TestFlyClientThroughControlPlane: Fly's own Go client, pointed at the
// control plane as Fly's tools are, creates an app and drives machines on
// hosts it never names.
func TestFlyClientThroughControlPlane(t *testing.T) {
	c := startDev(t, devOptions{})
	tok, err := c.Plane.AddOrg(context.Background(), "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("FLY_FLAPS_BASE_URL", c.Plane.URL())
	ctx := context.Background()
	fc, err := flaps.NewWithOptions(ctx, flaps.NewClientOpts{Tokens: tokens.Parse(tok)})
	if err != nil {
		t.Fatal(err)
	}
	app, err := fc.CreateApp(ctx, flaps.CreateAppRequest{Name: "web", Org: "personal"})
	if err != nil || app.Name != "web" || app.Organization.Slug != "personal" {
		t.Fatalf("create app: %v %+v", err, app)
	}
	m, err := fc.Launch(ctx, "web", fly.LaunchMachineInput{
		Region: "iad",
		Config: &fly.MachineConfig{Image: "demo", Guest: &fly.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256},
			Env: map[string]string{"GREETING": "hi"}},
	})
	if err != nil {
		t.Fatalf("launch: %v", err)
	}
	if len(m.ID) != 14 || m.Region != "iad" || m.State != fly.MachineStateStarted {
		t.Fatalf("launched %+v", m)
	}
	if err := fc.Wait(ctx, "web", m.ID, flaps.WithWaitStates("started"), flaps.WithWaitTimeout(10*time.Second)); err != nil {
		t.Fatalf("wait started: %v", err)
	}
	list, err := fc.List(ctx, "web", "")
	if err != nil || len(list) != 1 || list[0].ID != m.ID {
		t.Fatalf("list: %v %+v", err, list)
	}
	if err := fc.Stop(ctx, "web", fly.StopMachineInput{ID: m.ID}, ""); err != nil {
		t.Fatalf("stop: %v", err)
	}
	if err := fc.Wait(ctx, "web", m.ID, flaps.WithWaitStates("stopped"), flaps.WithWaitTimeout(10*time.Second)); err != nil {
		t.Fatalf("wait stopped: %v", err)
	}
	if _, err := fc.Start(ctx, "web", m.ID, ""); err != nil {
		t.Fatalf("start: %v", err)
	}
	got, err := fc.Get(ctx, "web", m.ID)
	if err != nil || got.State != "started" || got.Config.Env["GREETING"] != "hi" {
		t.Fatalf("get: %v %+v", err, got)
	}
	if err := fc.Destroy(ctx, "web", fly.RemoveMachineInput{ID: m.ID, Kill: true}, ""); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if list, err := fc.List(ctx, "web", ""); err != nil || len(list) != 0 {
		t.Fatalf("list after destroy: %v %+v", err, list)
	}
	regions, err := fc.GetRegions(ctx)
	if err != nil || len(regions.Regions) != 2 || regions.Regions[0].Code != "ams" || regions.Regions[0].Capacity == 0 {
		t.Fatalf("regions: %v %+v", err, regions)
	}
}

// TestAuthMatrix: no token, a bad one, another org's, an app-scoped one and a
// read-only one each get exactly what they may.
func TestAuthMatrix(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	admin := c.admin
	ctx := context.Background()
	acme, _ := orgWithApp(t, c, "acme", "shop")
	_, umbrellaTok := orgWithApp(t, c, "umbrella", "lab")
	m, err := acme.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := acme.CreateApp(ctx, api.CreateAppInput{AppName: "cart", OrgSlug: "acme"}); err != nil {
		t.Fatal(err)
	}
	appTok, err := acme.CreateToken(ctx, api.CreateTokenInput{OrgSlug: "acme", App: "shop"})
	if err != nil {
		t.Fatal(err)
	}
	roTok, err := acme.CreateToken(ctx, api.CreateTokenInput{OrgSlug: "acme", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	url := c.Plane.URL()
	none := api.NewClient(url, "")
	bad := api.NewClient(url, "flame_not-a-token")
	umbrella := api.NewClient(url, umbrellaTok)
	scoped := api.NewClient(url, appTok.Token)
	readOnly := api.NewClient(url, roTok.Token)

	get := func(cl *api.Client, app string) error { _, err := cl.Get(ctx, app, m.ID); return err }
	list := func(cl *api.Client, app string) error {
		_, err := cl.List(ctx, app, api.ListMachinesOptions{})
		return err
	}
	create := func(cl *api.Client, app string) error {
		_, err := cl.Create(ctx, app, api.LaunchMachineInput{Config: demoConfig()})
		return err
	}
	stop := func(cl *api.Client, app string) error { return cl.Stop(ctx, app, m.ID, api.StopMachineInput{}) }
	secrets := func(cl *api.Client, app string) error {
		_, err := cl.UpdateSecrets(ctx, app, map[string]*string{"K": new("v")})
		return err
	}
	for _, tc := range []struct {
		name   string
		cl     *api.Client
		app    string
		op     func(*api.Client, string) error
		status int
	}{
		{"no token", none, "shop", get, 401},
		{"bad token", bad, "shop", list, 401},
		{"other org get", umbrella, "shop", get, 404},
		{"other org list", umbrella, "shop", list, 404},
		{"other org create", umbrella, "shop", create, 404},
		{"other org secrets", umbrella, "shop", secrets, 404},
		{"app-scoped own app", scoped, "shop", get, 200},
		{"app-scoped other app", scoped, "cart", list, 404},
		{"read-only get", readOnly, "shop", get, 200},
		{"read-only list", readOnly, "shop", list, 200},
		{"read-only create", readOnly, "shop", create, 403},
		{"read-only secrets", readOnly, "shop", secrets, 403},
		{"read-only stop", readOnly, "shop", stop, 403},
		{"admin", admin, "shop", get, 200},
		{"missing app", acme, "nope", get, 404},
	} {
		if got := status(tc.op(tc.cl, tc.app)); got != tc.status {
			t.Errorf("%s: status %d, want %d", tc.name, got, tc.status)
		}
	}
	// Listing apps shows only what the token may see.
	if apps, err := umbrella.ListApps(ctx, "acme"); err != nil || len(apps) != 0 {
		t.Errorf("umbrella lists acme's apps: %v %+v", err, apps)
	}
	if apps, err := scoped.ListApps(ctx, ""); err != nil || len(apps) != 1 || apps[0].Name != "shop" {
		t.Errorf("app-scoped token lists %v %+v", err, apps)
	}
	if _, err := umbrella.CreateOrg(ctx, api.Org{Slug: "evil"}); status(err) != 403 {
		t.Errorf("an org token created an org: %v", err)
	}
	if _, err := umbrella.CreateApp(ctx, api.CreateAppInput{AppName: "shop2", OrgSlug: "acme"}); status(err) != 404 {
		t.Errorf("an org token created an app in another org: %v", err)
	}
	// Hosts' own APIs answer only the control plane's certificate: a
	// user's token without one is turned away in the TLS handshake.
	h := c.Hosts[0]
	direct := api.NewClient(h.APIURL, appTok.Token)
	direct.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	var ae *api.Error
	if _, err := direct.Get(ctx, "shop", m.ID); err == nil || errors.As(err, &ae) {
		t.Errorf("a user token reached a host's API: %v", err)
	}
	if _, err := c.HostClient(h).Get(ctx, "shop", m.ID); err != nil {
		t.Errorf("the control plane's certificate: %v", err)
	}
}

// TestSecretsNeverLeak: secrets reach machines' environments, and neither the
// API nor the control plane's logs ever show a value.
func TestSecretsNeverLeak(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	cl, tok := orgWithApp(t, c, "acme", "shop")
	const value = "hunter2-very-secret"
	if _, err := cl.UpdateSecrets(ctx, "shop", map[string]*string{"DATABASE_URL": new(value), "GONE": new("x")}); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.UpdateSecrets(ctx, "shop", map[string]*string{"GONE": nil}); err != nil {
		t.Fatal(err)
	}
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	// The workload sees it; the deleted one is gone.
	env := c.spec(t, m.ID).Env
	if env["DATABASE_URL"] != value || env["GONE"] != "" {
		t.Fatalf("workload env: DATABASE_URL=%q GONE=%q", env["DATABASE_URL"], env["GONE"])
	}
	// Nothing the API answers holds it.
	paths := []string{"/v1/apps/shop/secrets", "/v1/apps/shop/secrets/DATABASE_URL", "/v1/apps/shop/secrets?show_secrets=true",
		"/v1/apps/shop/machines", "/v1/apps/shop/machines/" + m.ID, "/v1/apps/shop/machines/" + m.ID + "/events", "/v1/apps/shop"}
	for _, p := range paths {
		code, b := rawGet(t, c.Plane.URL()+p, tok)
		if code != 200 || strings.Contains(b, value) {
			t.Errorf("GET %s: %d %s", p, code, b)
		}
	}
	// An update carries the secrets again, still without showing them.
	up, err := cl.Update(ctx, "shop", m.ID, api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := json.Marshal(up); strings.Contains(string(b), value) {
		t.Errorf("update answer shows the secret: %s", b)
	}
	if env := c.spec(t, m.ID).Env; env["DATABASE_URL"] != value {
		t.Errorf("updated workload lost the secret")
	}
	if strings.Contains(c.Logs(), value) {
		t.Error("a secret value reached the logs")
	}
	ss, err := cl.ListSecrets(ctx, "shop")
	if err != nil || len(ss) != 1 || ss[0].Name != "DATABASE_URL" || ss[0].Digest == "" {
		t.Fatalf("list secrets: %v %+v", err, ss)
	}
	// The catalog holds it sealed.
	b, err := c.Plane.Catalog.Bucket("secrets")
	if err != nil {
		t.Fatal(err)
	}
	es, err := b.List(ctx, "")
	if err != nil || len(es) != 1 || strings.Contains(string(es[0].Value), value) {
		t.Fatalf("catalog holds %v %+v", err, es)
	}
}
