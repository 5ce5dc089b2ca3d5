package server_test

import (
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/server"
)

// TestHostCatalogCredential: enrollment gives a host its own credential on
// the plane's NATS (owner-only on disk); with it the host publishes its own
// events and uses the edge's buckets, and nothing else; revoked, it is cut
// off and refused.
func TestHostCatalogCredential(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{
		DataDir: t.TempDir(), Listener: ln,
		Catalog: catalog.Config{ClientListen: "127.0.0.1:0"},
		Cluster: cluster.Config{HostID: "control", Region: "ams", BindAddr: "127.0.0.1", BindPort: 0},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })

	// Without credentials, nothing.
	if n, err := catalog.Open(ctx, catalog.Config{URL: p.Catalog.ClientURL(), Bind: true, Buckets: []catalog.BucketSpec{{Name: "tokens"}}}); err == nil {
		n.Close()
		t.Fatal("a client without credentials opened the catalog")
	}

	const id = "h1.ams"
	jt, err := p.MintJoinToken(ctx, id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	dataDir := t.TempDir()
	if _, err := host.Enroll(ctx, host.Enrollment{DataDir: dataDir, PlaneURL: p.URL(), JoinToken: jt.Token,
		HostID: id, Region: "ams", APIAddr: "127.0.0.1:4281"}); err != nil {
		t.Fatal(err)
	}
	seed, ca, ok, err := host.NATSCredential(dataDir)
	if err != nil || !ok {
		t.Fatalf("no catalog credential after enrollment: %v", err)
	}
	if fi, err := os.Stat(seed); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("credential file %v, %v", fi.Mode(), err)
	}
	hostCfg := func(buckets []catalog.BucketSpec) catalog.Config {
		return catalog.Config{URL: p.Catalog.ClientURL(), Credentials: seed, CA: ca, TLSName: catalog.ServerTLSName,
			User: id, Bind: true, Buckets: buckets}
	}
	h, err := catalog.Open(ctx, hostCfg(certstore.Buckets()))
	if err != nil {
		t.Fatalf("the host opens the edge's buckets: %v", err)
	}
	t.Cleanup(func() { h.Close() })
	certs, _ := h.Bucket(certstore.BucketCerts)
	if _, err := certs.Put(ctx, "acme.account", []byte("{}")); err != nil {
		t.Fatalf("the host writes certs: %v", err)
	}
	for _, b := range []string{"tokens", "secrets", "apps", "authority", "hosts"} {
		short, cancel := context.WithTimeout(ctx, 3*time.Second)
		n, err := catalog.Open(short, hostCfg([]catalog.BucketSpec{{Name: b}}))
		cancel()
		if err == nil {
			n.Close()
			t.Fatalf("the host opened bucket %s", b)
		}
	}

	// Its own events reach the plane; another host's subject does not.
	got := make(chan string, 8)
	unsub, err := p.Catalog.Subscribe("events.>", func(s string, _ []byte) { got <- s })
	if err != nil {
		t.Fatal(err)
	}
	defer unsub()
	h.Publish(ctx, api.EventSubject("h2", "shop", "m1"), []byte("{}"))
	h.Publish(ctx, api.EventSubject(id, "shop", "m1"), []byte("{}"))
	select {
	case s := <-got:
		if s != api.EventSubject(id, "shop", "m1") {
			t.Fatalf("the plane got %s", s)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the host's own event never arrived")
	}

	admin := api.NewClient(p.URL(), p.AdminToken)
	if err := admin.RevokeHost(ctx, id); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		short, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err := certs.Put(short, "acme.account", []byte("{}"))
		cancel()
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a revoked host still writes")
		}
	}
	if n, err := catalog.Open(ctx, hostCfg(certstore.Buckets())); err == nil {
		n.Close()
		t.Fatal("a revoked host's credential opened the catalog")
	}
}
