package cli

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/host"
)

// TestAgentEdgeTLSFlags: HTTPS needs the plain edge, and ACME needs the
// HTTPS listener and the catalog (usage errors, exit 2).
func TestAgentEdgeTLSFlags(t *testing.T) {
	t.Setenv("FLAME_AGENT_TOKEN", "t")
	base := []string{"agent", "--data-dir", t.TempDir()}
	for _, extra := range [][]string{
		{"--edge-tls-addr", "127.0.0.1:0"},
		{"--host-id", "h", "--edge-addr", "127.0.0.1:0", "--acme-ca", "https://ca.test/dir"},
		{"--host-id", "h", "--edge-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0", "--acme-ca", "https://ca.test/dir"},
	} {
		args := append(append([]string{}, base...), extra...)
		code, _, stderr := run(args...)
		if code != 2 || !strings.Contains(stderr, "--") {
			t.Errorf("flame %s: exit %d, stderr %q", strings.Join(args, " "), code, stderr)
		}
	}
}

// TestSetupEdgeTLS: without --acme-ca the HTTPS edge takes the local CA
// made in the data dir; with it, ACME over the catalog's certificate
// buckets, answering HTTP-01 on the plain edge and following the claims.
func TestSetupEdgeTLS(t *testing.T) {
	ctx := context.Background()
	edge, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer edge.Close()
	a := agentFlags{dataDir: t.TempDir(), hostID: "h", edgeDomain: "localhost", tls: edgeTLSFlags{addr: "127.0.0.1:0"}}
	hc := host.Config{Proxy: host.ProxyConfig{Edge: edge}}
	done, err := setupEdgeTLS(&hc, a, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	if hc.Proxy.TLS == nil || hc.Proxy.TLS.ACME || hc.Proxy.Hostnames != nil {
		t.Fatalf("local CA: %+v", hc.Proxy.TLS)
	}
	if _, err := os.Stat(filepath.Join(a.dataDir, "edge-ca", "ca.pem")); err != nil {
		t.Errorf("the local CA: %v", err)
	}
	if _, err := hc.Proxy.TLS.GetCertificate(&tls.ClientHelloInfo{ServerName: "demo.localhost"}); err != nil {
		t.Errorf("a certificate of the local CA: %v", err)
	}
	done()

	a.tls.acmeCA, a.natsURL = "https://127.0.0.1:1/dir", "nats://unused"
	cctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	bus, err := catalog.Open(cctx, catalog.Config{DataDir: t.TempDir(), Buckets: a.tls.buckets()})
	if err != nil {
		t.Fatal(err)
	}
	defer bus.Close()
	hc = host.Config{Proxy: host.ProxyConfig{Edge: edge}}
	done, err = setupEdgeTLS(&hc, a, bus, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer done()
	if hc.Proxy.TLS == nil || !hc.Proxy.TLS.ACME || hc.Proxy.TLS.HTTPChallenge == nil || hc.Proxy.Hostnames == nil {
		t.Fatalf("ACME: %+v", hc.Proxy.TLS)
	}
	hb, _ := bus.Bucket(certstore.BucketHostnames)
	if _, err := catalog.CreateJSON(ctx, hb, "shop.example.com", certstore.Claim{Hostname: "shop.example.com", App: "shop", AppID: "1"}, 0); err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if app, ok := hc.Proxy.Hostnames("shop.example.com"); ok && app == "shop" {
			break
		}
		if time.Now().After(end) {
			t.Fatal("the edge never saw the claim")
		}
	}
	// No certificate for a name no app claimed (and no ACME order: the CA
	// address answers nothing).
	if _, err := hc.Proxy.TLS.GetCertificate(&tls.ClientHelloInfo{ServerName: "other.example.com"}); err == nil {
		t.Error("an unclaimed name got a certificate")
	}
}
