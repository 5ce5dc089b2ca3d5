package server_test

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/server"
)

// hostsRegistry serves a registry that checks tokens and host assertions
// with the control plane, and pushes an image to each repository named
// with the admin token.
func hostsRegistry(t *testing.T, c *dev, repos ...string) string {
	t.Helper()
	reg, err := registry.New(registry.Config{Dir: t.TempDir(), Auth: c.Plane.RegistryScope})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)
	addr := strings.TrimPrefix(srv.URL, "http://")
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("code"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := image.Build(context.Background(), image.BuildSpec{Dir: dir, Entrypoint: []string{"/hello"}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	for _, r := range repos {
		if _, err := image.Push(context.Background(), img, addr+"/"+r+":v1", image.Remote{Token: c.Plane.AdminToken}); err != nil {
			t.Fatalf("push %s: %v", r, err)
		}
	}
	return addr
}

// pullAs pulls ref from the registry at addr with assertions of id.
func pullAs(t *testing.T, addr string, id *pki.HostIdentity, ref string) error {
	t.Helper()
	cred := host.RegistryCredential(pki.NewSlot(id))
	store, err := image.NewStore(image.StoreConfig{Dir: t.TempDir(), Auth: func(string) string { return cred() }})
	if err != nil {
		t.Fatal(err)
	}
	_, err = store.Pull(context.Background(), addr+"/"+ref+":v1")
	return err
}

// backhaulAs sends a request to h's backhaul (on the cluster's simulated
// network, from host from) over TLS with id's certificate; it fails when
// the handshake is refused.
func backhaulAs(c *dev, from string, h *devcluster.Host, id *pki.HostIdentity) error {
	tr := &http.Transport{DialContext: c.Net.DialerFrom(from), DisableKeepAlives: true, TLSClientConfig: &tls.Config{InsecureSkipVerify: true,
		MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.Cert}}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Get("https://" + h.Proxy.BackhaulAddr() + "/")
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return nil
}

// TestHostCredentialsAfterRenewalAndRevocation: a host pulls with its
// certificate only the public images and those of orgs with a machine on
// it, and never pushes; once it renews, its earlier certificate (a copy a
// thief kept) renews nothing, pulls nothing and opens no other host's
// backhaul; once it is revoked, its current certificate does none of these
// either.
func TestHostCredentialsAfterRenewalAndRevocation(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	orgWithApp(t, c, "umbrella", "lab")
	victim, other := c.Hosts[0], c.Hosts[1]
	addr := hostsRegistry(t, c, "flame/base", "acme/app", "umbrella/app")
	stolen, err := host.LoadIdentity(victim.DataDir())
	if err != nil || stolen == nil {
		t.Fatalf("the victim's identity: %v", err)
	}

	if err := pullAs(t, addr, stolen, "flame/base"); err != nil {
		t.Fatalf("a host pulls the public images: %v", err)
	}
	if err := pullAs(t, addr, stolen, "acme/app"); err == nil {
		t.Fatal("a host with no machine of acme pulled acme's image")
	}
	for i := 0; machinesOn(t, c, victim) == 0; i++ {
		if i == 20 {
			t.Fatal("no machine landed on the victim")
		}
		if _, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); err != nil {
			t.Fatal(err)
		}
	}
	if err := pullAs(t, addr, stolen, "acme/app"); err != nil {
		t.Fatalf("a host with a machine of acme: %v", err)
	}
	if err := pullAs(t, addr, stolen, "umbrella/app"); err == nil {
		t.Fatal("a host with no machine of umbrella pulled umbrella's image")
	}
	tok := host.RegistryCredential(pki.NewSlot(stolen))()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "evil"), []byte("evil"), 0o755)
	evil, err := image.Build(ctx, image.BuildSpec{Dir: dir, Entrypoint: []string{"/evil"}})
	if err != nil {
		t.Fatal(err)
	}
	defer evil.Close()
	for _, r := range []string{"acme/app", "flame/base"} {
		if _, err := image.Push(ctx, evil, addr+"/"+r+":v1", image.Remote{Token: tok}); err == nil {
			t.Errorf("a host's credential pushed %s", r)
		}
	}
	if err := backhaulAs(c, victim.ID, other, stolen); err != nil {
		t.Fatalf("a host's certificate on another host's backhaul: %v", err)
	}

	// The host renews (as its renewal loop does, here with a copy of its
	// identity dir): the earlier certificate is worth nothing after.
	renewedDir := t.TempDir()
	copyIdentity(t, victim.DataDir(), renewedDir)
	renewed := pki.NewSlot(stolen)
	if err := host.RenewIdentity(ctx, host.Renewal{PlaneURL: c.Plane.URL}, renewedDir, renewed); err != nil {
		t.Fatalf("renew: %v", err)
	}
	cur := renewed.Get()
	if pki.Serial(cur.Cert.Leaf) == pki.Serial(stolen.Cert.Leaf) {
		t.Fatal("renewal kept the serial")
	}
	if err := host.RenewIdentity(ctx, host.Renewal{PlaneURL: c.Plane.URL}, t.TempDir(), pki.NewSlot(stolen)); status(errors.Unwrap(err)) != 401 && !strings.Contains(errString(err), "401") {
		t.Errorf("the replaced certificate renewed: %v", err)
	}
	if err := pullAs(t, addr, stolen, "flame/base"); err == nil {
		t.Error("the replaced certificate pulled")
	}
	if err := pullAs(t, addr, cur, "acme/app"); err != nil {
		t.Errorf("the renewed certificate: %v", err)
	}
	waitUntil(t, "the other host to learn the replaced serial", 20*time.Second, func() bool {
		e, ok := other.Revoked().Lookup(pki.Serial(stolen.Cert.Leaf))
		return ok && e.Superseded
	})
	if err := backhaulAs(c, victim.ID, other, stolen); err == nil {
		t.Error("the replaced certificate opened another host's backhaul")
	}
	if err := backhaulAs(c, victim.ID, other, cur); err != nil {
		t.Errorf("the renewed certificate on another host's backhaul: %v", err)
	}

	if err := c.admin.RevokeHost(ctx, victim.ID); err != nil {
		t.Fatal(err)
	}
	if err := host.RenewIdentity(ctx, host.Renewal{PlaneURL: c.Plane.URL}, renewedDir, renewed); err == nil {
		t.Error("a revoked host renewed")
	}
	if err := pullAs(t, addr, cur, "flame/base"); !errors.Is(err, image.ErrUnauthorized) {
		t.Errorf("a revoked host pulled: %v", err)
	}
	waitUntil(t, "the other host to learn the revocation", 20*time.Second, func() bool {
		e, ok := other.Revoked().Lookup(pki.Serial(cur.Cert.Leaf))
		return ok && !e.Superseded
	})
	if err := backhaulAs(c, victim.ID, other, cur); err == nil {
		t.Error("a revoked host's certificate opened another host's backhaul")
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

// copyIdentity copies a host's identity dir into another data dir.
func copyIdentity(t *testing.T, from, to string) {
	t.Helper()
	src, dst := host.IdentityDir(from), host.IdentityDir(to)
	if err := os.MkdirAll(dst, 0o700); err != nil {
		t.Fatal(err)
	}
	es, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range es {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestHostCertificatesRenew: with certificates that last seconds, every
// host renews its own before it ends, again and again, and the control
// plane keeps reaching it over mutual TLS.
func TestHostCertificatesRenew(t *testing.T) {
	const life = 3 * time.Second
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 2, server: server.Config{HostCertValidity: life}})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	first := map[string]string{}
	for _, h := range c.Hosts {
		id, err := host.LoadIdentity(h.DataDir())
		if err != nil || id == nil {
			t.Fatal(err)
		}
		first[h.ID] = pki.Serial(id.Cert.Leaf)
	}
	seen := map[string]map[string]bool{}
	// Three lifetimes: each host renews at least twice.
	waitUntil(t, "every host to renew twice", 20*life, func() bool {
		n := 0
		for _, h := range c.Hosts {
			id, err := host.LoadIdentity(h.DataDir())
			if err != nil || id == nil {
				continue
			}
			if seen[h.ID] == nil {
				seen[h.ID] = map[string]bool{first[h.ID]: true}
			}
			seen[h.ID][pki.Serial(id.Cert.Leaf)] = true
			if len(seen[h.ID]) >= 3 {
				n++
			}
		}
		return n == len(c.Hosts)
	})
	// The certificates the hosts began with have ended; the plane still
	// calls them (a call racing a renewal may fail once).
	time.Sleep(life)
	var err error
	for range 5 {
		if _, err = cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()}); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("create after renewals: %v", err)
	}
}
