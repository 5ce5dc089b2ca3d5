package server_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/server"
)

// pullingDriver is the fake driver resolving images as a host pulling
// from the platform registry does: a reference by digest is that digest, a
// tag is whatever the tag names at the time of the pull.
type pullingDriver struct {
	*fake.Driver
	reg *registry.Registry

	mu     sync.Mutex
	pulled map[string][]string // machine id → digests, one per Prepare
}

func (d *pullingDriver) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	if _, err := d.Driver.Prepare(ctx, spec); err != nil {
		return driver.Image{}, err
	}
	ref, digest, _ := strings.Cut(spec.Image, "@")
	if first, _, _ := strings.Cut(ref, "/"); strings.ContainsAny(first, ".:") {
		return driver.Image{}, fmt.Errorf("%s is not the platform registry: %w", first, driver.ErrImage)
	}
	if digest == "" {
		repo, tag, ok := strings.Cut(ref, ":")
		if !ok {
			tag = "latest"
		}
		var err error
		if digest, err = d.reg.Resolve(repo, tag); err != nil {
			return driver.Image{}, driver.ErrImage
		}
	}
	d.mu.Lock()
	d.pulled[spec.MachineID] = append(d.pulled[spec.MachineID], digest)
	d.mu.Unlock()
	return driver.Image{Ref: spec.Image, Digest: digest}, nil
}

func (d *pullingDriver) lastPull(id string) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	ps := d.pulled[id]
	if len(ps) == 0 {
		return ""
	}
	return ps[len(ps)-1]
}

// imageDev is a dev cluster whose control plane serves the platform
// registry, with hosts that pull from it.
type imageDev struct {
	*devcluster.Cluster
	reg     *registry.Registry
	regHost string
	drivers []*pullingDriver
}

func startImageDev(t *testing.T) *imageDev {
	t.Helper()
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	var logMu sync.Mutex
	var logs strings.Builder
	logger := slog.New(slog.NewTextHandler(tWriter{t, over, &logMu, &logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	var plane atomic.Pointer[devcluster.Cluster]
	reg, err := registry.New(registry.Config{Dir: t.TempDir(), Logger: logger,
		Auth: func(ctx context.Context, tok string) (registry.Scope, error) {
			if c := plane.Load(); c != nil {
				return c.Plane.RegistryScope(ctx, tok)
			}
			return registry.Scope{}, registry.ErrUnauthorized
		}})
	if err != nil {
		t.Fatal(err)
	}
	d := &imageDev{reg: reg}
	var mu sync.Mutex
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams"}, HostsPerRegion: 2,
		Logger: logger,
		NewDriver: func(string, int, string) (driver.Driver, error) {
			mu.Lock()
			defer mu.Unlock()
			pd := &pullingDriver{Driver: fake.New(), reg: reg, pulled: map[string][]string{}}
			d.drivers = append(d.drivers, pd)
			return pd, nil
		},
		Cluster:      cluster.Config{Capacity: cluster.Resources{CPUs: 64, MemoryMB: 64 * 1024}},
		ControlPlane: true, Registry: reg,
		Server: server.Config{FailureBackoff: 50 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	plane.Store(c)
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	d.Cluster = c
	d.regHost = strings.TrimPrefix(c.Plane.URL(), "http://")
	return d
}

// lastPull is the digest the host of machine id pulled last.
func (d *imageDev) lastPull(id string) string {
	for _, pd := range d.drivers {
		if p := pd.lastPull(id); p != "" {
			return p
		}
	}
	return ""
}

// pulls counts the pulls of machine id's image.
func (d *imageDev) pulls(id string) int {
	n := 0
	for _, pd := range d.drivers {
		pd.mu.Lock()
		n += len(pd.pulled[id])
		pd.mu.Unlock()
	}
	return n
}

// push pushes a fresh random image as ref (repository:tag) with token tok
// and returns its digest.
func (d *imageDev) push(t *testing.T, tok, ref string) string {
	t.Helper()
	img, err := random.Image(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	r, err := name.ParseReference(d.regHost + "/" + ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img, remote.WithAuth(&authn.Basic{Username: "x", Password: tok})); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	h, _ := img.Digest()
	return h.String()
}

func orgApp(t *testing.T, d *imageDev, org, app string) (*api.Client, string) {
	t.Helper()
	tok, err := d.Plane.AddOrg(context.Background(), org, org)
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(d.Plane.URL(), tok)
	if _, err := cl.CreateApp(context.Background(), api.CreateAppInput{AppName: app, OrgSlug: org}); err != nil {
		t.Fatal(err)
	}
	return cl, tok
}

var imgGuest = &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}

// TestTagSwapUnderARunningApp: a create pins the digest its tag names, so
// a later push of the tag changes nothing already running — not a restart,
// not the replacement of a group's machine — while a new create takes the
// new image.
func TestTagSwapUnderARunningApp(t *testing.T) {
	d := startImageDev(t)
	ctx := context.Background()
	cl, tok := orgApp(t, d, "acme", "shop")
	v1 := d.push(t, tok, "acme/app:v1")

	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "acme/app:v1", Guest: imgGuest}})
	if err != nil {
		t.Fatal(err)
	}
	if want := "acme/app:v1@" + v1; m.Config.Image != want || m.ImageRef.Digest != v1 {
		t.Fatalf("created: image %q, image_ref digest %q; want %q pinned", m.Config.Image, m.ImageRef.Digest, want)
	}
	g, err := cl.PutGroup(ctx, "shop", api.Group{Name: "web", Config: &api.MachineConfig{Image: "acme/app:v1", Guest: imgGuest},
		Regions: map[string]int{"ams": 1}})
	if err != nil {
		t.Fatal(err)
	}
	if g.Config.Image != "acme/app:v1@"+v1 {
		t.Errorf("group's image %q, want it pinned to %s", g.Config.Image, v1)
	}
	var member *api.Machine
	waitUntil(t, "the group's machine", 20*time.Second, func() bool {
		ms, _ := cl.List(ctx, "shop", api.ListMachinesOptions{})
		for _, x := range ms {
			if x.Config.Metadata[api.MetadataProcessGroup] == "web" && x.State == api.StateStarted {
				member = x
				return true
			}
		}
		return false
	})

	// The tag moves.
	v2 := d.push(t, tok, "acme/app:v1")
	if v2 == v1 {
		t.Fatal("two random images with one digest")
	}

	// A restart pulls again, what the machine was created with.
	before := d.pulls(m.ID)
	if err := cl.Restart(ctx, "shop", m.ID, api.RestartOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err := cl.Get(ctx, "shop", m.ID)
	if err != nil || got.State != api.StateStarted {
		t.Fatalf("after restart: %v %+v", err, got)
	}
	if d.pulls(m.ID) == before {
		t.Fatal("the restart did not pull the image again: it proves nothing")
	}
	if got.ImageRef.Digest != v1 || d.lastPull(m.ID) != v1 {
		t.Errorf("after the tag moved, the restart runs %s (pulled %s), want %s", got.ImageRef.Digest, d.lastPull(m.ID), v1)
	}

	// The group's machine is lost: its replacement runs the group's image.
	if err := cl.Destroy(ctx, "shop", member.ID, true); err != nil {
		t.Fatal(err)
	}
	var repl *api.Machine
	waitUntil(t, "the group's replacement", 20*time.Second, func() bool {
		ms, _ := cl.List(ctx, "shop", api.ListMachinesOptions{})
		for _, x := range ms {
			if x.ID != member.ID && x.Config.Metadata[api.MetadataProcessGroup] == "web" && x.State == api.StateStarted {
				repl = x
				return true
			}
		}
		return false
	})
	if repl.ImageRef.Digest != v1 || d.lastPull(repl.ID) != v1 {
		t.Errorf("the replacement runs %s (pulled %s), want %s", repl.ImageRef.Digest, d.lastPull(repl.ID), v1)
	}

	// A new create of the tag takes the new image.
	n, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "acme/app:v1", Guest: imgGuest}})
	if err != nil || n.ImageRef.Digest != v2 {
		t.Errorf("a new create: %v, digest %s; want %s", err, n.ImageRef.Digest, v2)
	}
	// An update pins too.
	u, err := cl.Update(ctx, "shop", m.ID, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "acme/app:v1", Guest: imgGuest}})
	if err != nil || u.Config.Image != "acme/app:v1@"+v2 {
		t.Errorf("update: %v, image %q; want it pinned to %s", err, u.Config.Image, v2)
	}
}

// TestCreatesUseTheirOrgsImages: a machine runs only its org's images and
// the public ones from the platform registry — another org's image, named
// with or without the registry, is refused as one that does not exist,
// even to an admin creating in the app — and images of other registries
// are left alone.
func TestCreatesUseTheirOrgsImages(t *testing.T) {
	d := startImageDev(t)
	ctx := context.Background()
	_, acmeTok := orgApp(t, d, "acme", "shop")
	globex, _ := orgApp(t, d, "globex", "spy")
	secret := d.push(t, acmeTok, "acme/app:v1")
	admin := api.NewClient(d.Plane.URL(), d.Plane.AdminToken)

	for _, img := range []string{
		"acme/app:v1",
		"acme/app@" + secret,
		"acme/app:v1@" + secret,
		d.regHost + "/acme/app:v1",
		"acme/missing:v1", // alike: nothing tells the two apart
		"globex/missing:v1",
		"app:v1", // no org
	} {
		for who, cl := range map[string]*api.Client{"globex": globex, "an admin": admin} {
			_, err := cl.Create(ctx, "spy", api.LaunchMachineInput{Config: &api.MachineConfig{Image: img, Guest: imgGuest}})
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Status != 422 || !strings.HasPrefix(ae.Message, "config.image") {
				t.Errorf("%s creates a machine of globex with %s: %v, want 422 naming config.image", who, img, err)
			}
		}
		_, err := globex.PutGroup(ctx, "spy", api.Group{Name: "web", Config: &api.MachineConfig{Image: img, Guest: imgGuest}, Regions: map[string]int{"ams": 1}})
		if status(err) != 422 {
			t.Errorf("globex declares a group of %s: %v, want 422", img, err)
		}
	}
	// acme names its image with the registry: pinned, without it.
	acme := api.NewClient(d.Plane.URL(), acmeTok)
	m, err := acme.Create(ctx, "shop", api.LaunchMachineInput{Config: &api.MachineConfig{Image: d.regHost + "/acme/app:v1", Guest: imgGuest}})
	if err != nil || m.Config.Image != "acme/app:v1@"+secret {
		t.Errorf("acme runs its image named with the registry: %v, image %q; want acme/app:v1@%s", err, m.Config.Image, secret)
	}

	// The public namespace: every org runs it, pinned; only admins push it.
	demo := d.push(t, "agent-secret", "flame/demo-app:latest")
	m, err = globex.Create(ctx, "spy", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "flame/demo-app", Guest: imgGuest}})
	if err != nil || m.Config.Image != "flame/demo-app@"+demo {
		t.Errorf("globex runs the public demo image: %v, image %q; want it pinned to %s", err, m.Config.Image, demo)
	}
	// Another registry's image is its own business: the control plane
	// lets it through to the host (whose fake pull refuses it).
	other := "registry.example:5000/acme/app:v1"
	_, err = globex.Create(ctx, "spy", api.LaunchMachineInput{Config: &api.MachineConfig{Image: other, Guest: imgGuest}})
	if err == nil || strings.Contains(err.Error(), "repositories") || !strings.Contains(err.Error(), "not the platform registry") {
		t.Errorf("an image of another registry: %v, want the host's refusal", err)
	}
}
