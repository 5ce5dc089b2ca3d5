package server_test

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/server"
)

// TestAPIOverTLS: with a TLS config the plane serves its API over HTTPS
// (HTTP/2 negotiated) and says so in its URL; a plain HTTP request to it
// is not served.
func TestAPIOverTLS(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ca, err := edgecert.LoadOrCreateDevCA(t.TempDir(), "localhost")
	if err != nil {
		t.Fatal(err)
	}
	cert, err := ca.ServerCertificate([]string{"127.0.0.1", "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{
		DataDir: t.TempDir(), Listener: ln,
		Cluster: cluster.Config{HostID: "control", Region: "ams", BindAddr: "127.0.0.1", BindPort: 0},
		Server:  server.Config{AgentToken: "agent-secret"},
		TLS:     &tls.Config{Certificates: []tls.Certificate{*cert}},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	if !strings.HasPrefix(p.URL(), "https://") {
		t.Fatalf("URL %s", p.URL())
	}
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, ForceAttemptHTTP2: true}, Timeout: 30 * time.Second}
	c := api.NewClient(p.URL(), p.AdminToken)
	c.HTTPClient = hc
	if _, err := c.CreateOrg(ctx, api.Org{Slug: "acme"}); err != nil {
		t.Fatalf("an API call over TLS: %v", err)
	}
	resp, err := hc.Get(p.URL() + "/v1/platform/regions")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.ProtoMajor != 2 || resp.TLS == nil {
		t.Errorf("HTTP/%d, tls %v", resp.ProtoMajor, resp.TLS != nil)
	}
	plain := "http" + strings.TrimPrefix(p.URL(), "https")
	resp, err = http.Get(plain + "/v1/platform/regions")
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Errorf("plain HTTP to the TLS API: %d %s", resp.StatusCode, b)
		}
	}
}
