package server_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/image/registry"
)

// refused checks that err is a 422 whose message names field.
func refused(t *testing.T, what string, err error, field string) {
	t.Helper()
	if status(err) != 422 || !strings.Contains(err.Error(), field) {
		t.Errorf("%s: %v (status %d), want 422 naming %s", what, err, status(err), field)
	}
}

// TestCreatesThatCannotWorkAreRefused: a create the platform could never
// run is answered 422 naming the field, before anything is placed or
// started: a malformed image, an image the host cannot resolve, an
// environment the kernel would refuse, metadata and services past the
// limits every host publishes, timeouts and leases without end.
func TestCreatesThatCannotWorkAreRefused(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ctx := context.Background()
	create := func(edit func(*api.LaunchMachineInput)) error {
		in := api.LaunchMachineInput{Config: demoConfig()}
		edit(&in)
		_, err := cl.Create(ctx, "shop", in)
		return err
	}
	services := func(n int) []api.MachineService {
		var out []api.MachineService
		for i := range n {
			out = append(out, api.MachineService{Protocol: "tcp", InternalPort: 8000 + i})
		}
		return out
	}
	manyKeys := map[string]string{}
	for i := range api.MaxMetadataKeys + 1 {
		manyKeys["k"+strings.Repeat("x", i%5)+string(rune('a'+i%26))+string(rune('a'+i/26))] = "v"
	}
	for _, tc := range []struct {
		name  string
		edit  func(*api.LaunchMachineInput)
		field string
	}{
		{"malformed image", func(in *api.LaunchMachineInput) { in.Config.Image = "UPPER::bad@@ref" }, "config.image"},
		{"unresolvable image", func(in *api.LaunchMachineInput) { in.Config.Image = fake.BadImagePrefix + "/nothing:1" }, "config.image"},
		{"900 KB env value", func(in *api.LaunchMachineInput) {
			in.Config.Env = map[string]string{"BIG": strings.Repeat("x", 900<<10)}
		}, "config.env.BIG"},
		{"env total", func(in *api.LaunchMachineInput) {
			in.Config.Env = map[string]string{}
			for i := range 10 {
				in.Config.Env[string(rune('A'+i))] = strings.Repeat("x", 60<<10)
			}
		}, "config.env"},
		{"process group", func(in *api.LaunchMachineInput) {
			in.Config.Metadata = map[string]string{api.MetadataProcessGroup: "x.y"}
		}, "config.metadata.fly_process_group"},
		{"metadata value", func(in *api.LaunchMachineInput) {
			in.Config.Metadata = map[string]string{"big": strings.Repeat("x", 500<<10)}
		}, "config.metadata.big"},
		{"metadata keys", func(in *api.LaunchMachineInput) { in.Config.Metadata = manyKeys }, "config.metadata"},
		{"metadata key", func(in *api.LaunchMachineInput) {
			in.Config.Metadata = map[string]string{strings.Repeat("k", api.MaxMetadataKeyLen+1): "v"}
		}, "config.metadata"},
		{"17 services", func(in *api.LaunchMachineInput) { in.Config.Services = services(api.MaxServices + 1) }, "config.services"},
		{"concurrency", func(in *api.LaunchMachineInput) {
			in.Config.Services = services(1)
			in.Config.Services[0].Concurrency = &api.MachineServiceConcurrency{HardLimit: 1<<20 + 1}
		}, "config.services[0].concurrency.hard_limit"},
		{"stop timeout", func(in *api.LaunchMachineInput) {
			in.Config.StopConfig = &api.StopConfig{Timeout: api.Dur(100000 * time.Hour)}
		}, "config.stop_config.timeout"},
		{"lease ttl", func(in *api.LaunchMachineInput) { in.LeaseTTL = 100 * 365 * 24 * 3600 }, "lease_ttl"},
	} {
		refused(t, tc.name, create(tc.edit), tc.field)
	}
	if ms, err := cl.List(ctx, "shop", api.ListMachinesOptions{}); err != nil || len(ms) != 0 {
		t.Errorf("refused creates left %d machines (%v)", len(ms), err)
	}
}

// TestRegionsAtTheDoor: a region list with an empty entry is malformed; a
// known region without hosts is refused at once, naming those that have
// some, unless the create accepts any region.
func TestRegionsAtTheDoor(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 1})
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ctx := context.Background()
	create := func(region string) (*api.Machine, error) {
		return cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig(), Region: region})
	}
	for _, r := range []string{",,", "ams,", ",ams", "ams,,iad"} {
		_, err := create(r)
		refused(t, "region "+r, err, "region")
	}
	start := time.Now()
	_, err := create("lhr")
	refused(t, "lhr", err, "lhr")
	if err != nil && !strings.Contains(err.Error(), "ams, iad") {
		t.Errorf("lhr: %v does not name the regions with hosts", err)
	}
	if status(err) == 503 {
		t.Errorf("lhr waited %s for room", time.Since(start))
	}
	for _, r := range []string{"lhr,any", "lhr,ams", "ams"} {
		m, err := create(r)
		if err != nil {
			t.Errorf("region %s: %v", r, err)
			continue
		}
		if m.Region != "ams" && !strings.HasSuffix(r, "any") {
			t.Errorf("region %s: placed in %s", r, m.Region)
		}
	}
}

// TestMachineCallsAtTheDoor: metadata writes, leases and stops are bounded
// as configs are.
func TestMachineCallsAtTheDoor(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ctx := context.Background()
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	refused(t, "metadata value", cl.SetMetadata(ctx, "shop", m.ID, "big", strings.Repeat("x", 500<<10)), "metadata.big")
	refused(t, "process group", cl.SetMetadata(ctx, "shop", m.ID, api.MetadataProcessGroup, "x.y"), "metadata.fly_process_group")
	for i := range api.MaxMetadataKeys {
		if err := cl.SetMetadata(ctx, "shop", m.ID, "k"+string(rune('a'+i%26))+string(rune('a'+i/26)), "v"); err != nil {
			t.Fatalf("metadata key %d: %v", i, err)
		}
	}
	refused(t, "one key too many", cl.SetMetadata(ctx, "shop", m.ID, "onemore", "v"), "metadata")
	if err := cl.SetMetadata(ctx, "shop", m.ID, "kaa", "changed"); err != nil {
		t.Errorf("changing a key at the limit: %v", err)
	}
	_, err = cl.AcquireLease(ctx, "shop", m.ID, api.LeaseInput{TTL: api.MaxLeaseTTL + 1})
	refused(t, "lease ttl", err, "ttl")
	refused(t, "stop timeout", cl.Stop(ctx, "shop", m.ID, api.StopMachineInput{Timeout: api.Dur(100000 * time.Hour)}), "timeout")
	if got, err := cl.Get(ctx, "shop", m.ID); err != nil || got.State != api.StateStarted {
		t.Errorf("after the refused calls: %v, %+v", err, got)
	}
}

// TestTokensAtTheDoor: a token request without its org names the field;
// in the registry a token reaches its org's repositories, a read-only one
// to pull only, an admin's and the hosts' every one.
func TestTokensAtTheDoor(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	_, err := c.admin.CreateToken(ctx, api.CreateTokenInput{})
	refused(t, "token without org", err, "org_slug")
	acme, rw := orgWithApp(t, c, "acme", "shop")
	ro, err := acme.CreateToken(ctx, api.CreateTokenInput{OrgSlug: "acme", ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		token string
		want  registry.Scope
		err   error
	}{
		{rw, registry.Scope{Org: "acme"}, nil},
		{ro.Token, registry.Scope{Org: "acme", ReadOnly: true}, nil},
		{c.Plane.AdminToken, registry.Scope{Admin: true}, nil},
		{"agent-secret", registry.Scope{Admin: true}, nil},
		{"flame_not-a-token", registry.Scope{}, registry.ErrUnauthorized},
		{"", registry.Scope{}, registry.ErrUnauthorized},
	} {
		got, err := c.Plane.RegistryScope(ctx, tc.token)
		if got.Orgs != nil || got.Admin != tc.want.Admin || got.Org != tc.want.Org || got.ReadOnly != tc.want.ReadOnly || !errors.Is(err, tc.err) {
			t.Errorf("token %.12q: scope %+v, %v; want %+v, %v", tc.token, got, err, tc.want, tc.err)
		}
	}
}

// TestGroupsAtTheDoor: a group's config is checked as its machines will
// carry it, with the process group the declaration adds to its metadata: a
// config whose metadata is already at the limit is refused (422) rather
// than accepted and then refused by the host on every create.
func TestGroupsAtTheDoor(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ctx := context.Background()
	full := demoConfig()
	full.Metadata = map[string]string{}
	for i := range api.MaxMetadataKeys {
		full.Metadata["k"+string(rune('a'+i%26))+string(rune('a'+i/26))] = "v"
	}
	_, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: full, Regions: map[string]int{"ams": 1}})
	refused(t, "group whose metadata is full", err, "config.metadata")
	// One key fewer leaves room for the process group.
	delete(full.Metadata, "kaa")
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: full, Regions: map[string]int{"ams": 1}}); err != nil {
		t.Errorf("group with room for its process group: %v", err)
	}
}

// TestSecretsAtTheDoor: an app's secrets go into every machine's
// environment beside its config's, so together they are bounded as the
// environment is: a set of secrets too large for any workload to start
// with is refused (422), while one at the limit, and deleting from it,
// are not.
func TestSecretsAtTheDoor(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	cl, _ := orgWithApp(t, c, "acme", "shop")
	ctx := context.Background()
	big := strings.Repeat("x", 60<<10)
	set := func(names ...string) error {
		in := map[string]*string{}
		for _, n := range names {
			in[n] = &big
		}
		_, err := cl.UpdateSecrets(ctx, "shop", in)
		return err
	}
	// Eight secrets of 60 KiB: under the bound, in two writes.
	var names []string
	for i := range 8 {
		names = append(names, fmt.Sprintf("S%02d", i))
	}
	if err := set(names[:4]...); err != nil {
		t.Fatal(err)
	}
	if err := set(names[4:]...); err != nil {
		t.Fatal(err)
	}
	// Eight more would take them past the bound (and, sealed, past what
	// one catalog record holds).
	err := set("T0", "T1", "T2", "T3", "T4", "T5", "T6", "T7")
	refused(t, "secrets past the limit", err, "secrets")
	if ss, err := cl.ListSecrets(ctx, "shop"); err != nil || len(ss) != 8 {
		t.Errorf("after the refused write: %d secrets, %v; want the 8 kept", len(ss), err)
	}
	// Replacing one and deleting are fine.
	if err := set("S00"); err != nil {
		t.Errorf("replace a secret: %v", err)
	}
	if _, err := cl.UpdateSecrets(ctx, "shop", map[string]*string{"S01": nil}); err != nil {
		t.Errorf("delete a secret: %v", err)
	}
	many := map[string]*string{}
	one := "v"
	for i := range 1000 {
		many[fmt.Sprintf("N%04d", i)] = &one
	}
	_, err = cl.UpdateSecrets(ctx, "shop", many)
	refused(t, "a thousand secrets", err, "secrets")
}
