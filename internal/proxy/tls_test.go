package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"testing"

	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/proxy/route"
)

// tlsMachine is machine with the TLS port too (Fly's ports 80 and 443),
// force_https on 80 as asked.
func tlsMachine(id, host string, b *backend, forceHTTPS bool) route.Machine {
	m := machine(id, host, b.addr)
	m.Services[0].Ports = []route.PortRange{{Start: 80, End: 80, ForceHTTPS: forceHTTPS}, {Start: 443, End: 443}}
	return m
}

// startTLSProxy starts a proxy with an HTTPS listener whose certificates
// come from a dev CA, and returns it with a client trusting that CA
// (HTTP/2 when h2, else HTTP/1.1 only).
func startTLSProxy(t *testing.T, cfg Config) (*Proxy, *edgecert.DevCA) {
	t.Helper()
	ca, err := edgecert.LoadOrCreateDevCA(t.TempDir(), "localhost")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.TLS = &TLSConfig{Listener: ln, RedirectPort: ln.Addr().(*net.TCPAddr).Port, GetCertificate: ca.GetCertificate}
	return startProxy(t, cfg), ca
}

func tlsClient(ca *edgecert.DevCA, h2 bool) *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: ca.Pool()}, ForceAttemptHTTP2: h2}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// tlsGet sends GET https://<host><path> to the edge's TLS address.
func tlsGet(t *testing.T, c *http.Client, addr, host, path string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	_, port, _ := net.SplitHostPort(addr)
	req, err := http.NewRequest(http.MethodGet, "https://"+host+":"+port+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range hdr {
		req.Header[k] = []string{v}
	}
	// Every name resolves to the edge.
	c.Transport.(*http.Transport).DialContext = func(ctx2 context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx2, network, addr)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET https://%s%s: %v", host, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(b)
}

// TestTLSEdge: the edge terminates TLS with the certificate of the SNI's
// name; HTTP/1.1 over TLS is served by the fast path and HTTP/2 (ALPN h2)
// by net/http, both routed by the services' port 443 and forwarded with
// X-Forwarded-Proto https; force_https redirects plain HTTP to the HTTPS
// listener, and a request over TLS is never redirected; a name the edge
// has no certificate for fails the handshake; a claimed hostname routes
// to its app over both.
func TestTLSEdge(t *testing.T) {
	for _, fast := range []bool{true, false} {
		t.Run("fast="+strconv.FormatBool(fast), func(t *testing.T) {
			b := startBackend(t, "m1")
			hostnames := map[string]string{"shop.example.com": "demo"}
			p, ca := startTLSProxy(t, Config{HostID: "ams-1", DisableFastPath: !fast,
				Hostnames: func(h string) (string, bool) { a, ok := hostnames[h]; return a, ok }})
			p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{tlsMachine("m1", "ams-1", b, true)}}, nil)

			for _, h2 := range []bool{false, true} {
				c := tlsClient(ca, h2)
				resp, body := tlsGet(t, c, p.TLSAddr(), "demo.localhost", "/x?y=1", map[string]string{"User-Agent": ""})
				if resp.StatusCode != 200 {
					t.Fatalf("h2=%v: %d %s", h2, resp.StatusCode, body)
				}
				if want := map[bool]int{false: 1, true: 2}[h2]; resp.ProtoMajor != want {
					t.Errorf("h2=%v: answered in HTTP/%d", h2, resp.ProtoMajor)
				}
				s := decode(t, body)
				if s.URI != "/x?y=1" || s.Header.Get("X-Forwarded-Proto") != "https" || s.Header.Get("X-Forwarded-Port") != "443" || s.Header.Get("Fly-Forwarded-Port") != "443" {
					t.Errorf("h2=%v: the machine saw %+v", h2, s)
				}
				// The fast path adds no User-Agent; net/http's transport does.
				if fast && !h2 && s.Header.Get("User-Agent") != "" {
					t.Errorf("HTTP/1.1 over TLS did not take the fast path (User-Agent %q)", s.Header.Get("User-Agent"))
				}
				if resp.Header.Get("Via") == "" || resp.Header.Get("Fly-Request-Id") == "" {
					t.Errorf("h2=%v: response headers %v", h2, resp.Header)
				}
			}
			// A claimed hostname routes to its app (over TLS: the ACME test).
			plain := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
			resp, body := do(t, plain, "GET", p.EdgeAddr(), "Shop.Example.com:80", "/", nil, nil)
			if resp.StatusCode != http.StatusMovedPermanently || !strings.HasPrefix(resp.Header.Get("Location"), "https://shop.example.com:") {
				t.Errorf("claimed hostname: %d %v %s", resp.StatusCode, resp.Header, body)
			}

			// force_https: plain HTTP is redirected to the HTTPS listener.
			resp, body = do(t, plain, "GET", p.EdgeAddr(), "demo.localhost:8080", "/a?b=c", nil, nil)
			_, tlsPort, _ := net.SplitHostPort(p.TLSAddr())
			if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "https://demo.localhost:"+tlsPort+"/a?b=c" {
				t.Fatalf("force_https: %d %v %s", resp.StatusCode, resp.Header, body)
			}
			hits := b.hits.Load()
			resp, body = tlsGet(t, tlsClient(ca, false), p.TLSAddr(), "demo.localhost", "/a?b=c", nil)
			if resp.StatusCode != 200 || b.hits.Load() != hits+1 {
				t.Errorf("following the redirect: %d %s", resp.StatusCode, body)
			}

			// No certificate for a name outside the CA's domain.
			conn, err := tls.Dial("tcp", p.TLSAddr(), &tls.Config{ServerName: "demo.example.com", RootCAs: ca.Pool()})
			if err == nil {
				conn.Close()
				t.Error("a handshake for a name without a certificate succeeded")
			}
			// An unknown app over TLS gets the edge's 404.
			resp, body = tlsGet(t, tlsClient(ca, false), p.TLSAddr(), "nope.localhost", "/", nil)
			if resp.StatusCode != http.StatusNotFound || !strings.Contains(body, "nope.localhost") {
				t.Errorf("unknown app over TLS: %d %s", resp.StatusCode, body)
			}
		})
	}
}

// TestTLSPortRoutes: over TLS only machines serving port 443 are
// candidates; an app serving only port 80 answers 503 over TLS.
func TestTLSPortRoutes(t *testing.T) {
	b := startBackend(t, "m1")
	p, ca := startTLSProxy(t, Config{HostID: "ams-1"})
	p.setState(factsOne(b), nil) // port 80 only
	resp, body := tlsGet(t, tlsClient(ca, false), p.TLSAddr(), "demo.localhost", "/", nil)
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("an app without port 443, over TLS: %d %s", resp.StatusCode, body)
	}
}
