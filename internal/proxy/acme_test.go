package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	pebbleca "github.com/letsencrypt/pebble/v2/ca"
	pebbledb "github.com/letsencrypt/pebble/v2/db"
	pebbleva "github.com/letsencrypt/pebble/v2/va"
	pebblewfe "github.com/letsencrypt/pebble/v2/wfe"
	mdns "github.com/miekg/dns"

	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/proxy/route"
)

// Issuance against a real ACME server on loopback: pebble, in this
// process, validating the challenges against the edge's own listeners
// (every name resolves to 127.0.0.1 through a DNS server of the test).

// pebble is a running ACME server.
type pebble struct {
	url    string
	roots  *x509.CertPool // the directory's HTTPS certificate
	ca     *pebbleca.CAImpl
	orders atomic.Int64 // new-order requests
}

// quietWriter writes to t.Log until the test is over.
type quietWriter struct {
	t    *testing.T
	over *atomic.Bool
}

func (w quietWriter) Write(b []byte) (int, error) {
	if !w.over.Load() {
		w.t.Log(strings.TrimSpace(string(b)))
	}
	return len(b), nil
}

func quiet(t *testing.T) quietWriter {
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	return quietWriter{t, over}
}

// startDNS answers every A question with 127.0.0.1, over UDP and TCP on
// one port (pebble asks over TCP).
func startDNS(t *testing.T) string {
	t.Helper()
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, q *mdns.Msg) {
		r := new(mdns.Msg)
		r.SetReply(q)
		for _, qq := range q.Question {
			if qq.Qtype == mdns.TypeA {
				r.Answer = append(r.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: qq.Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 1}, A: net.IPv4(127, 0, 0, 1)})
			}
		}
		w.WriteMsg(r)
	})
	for range 20 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		pc, err := net.ListenPacket("udp", ln.Addr().String())
		if err != nil {
			ln.Close() // the UDP port is taken: another one
			continue
		}
		tcp, udp := &mdns.Server{Listener: ln, Handler: h}, &mdns.Server{PacketConn: pc, Handler: h}
		go tcp.ActivateAndServe()
		go udp.ActivateAndServe()
		t.Cleanup(func() { tcp.Shutdown(); udp.Shutdown() })
		return ln.Addr().String()
	}
	t.Fatal("no port free for both TCP and UDP")
	return ""
}

// startPebble runs pebble validating HTTP-01 on httpPort and TLS-ALPN-01
// on tlsPort of 127.0.0.1, issuing certificates valid for validity
// (0: pebble's default).
func startPebble(t *testing.T, httpPort, tlsPort int, validity time.Duration) *pebble {
	t.Helper()
	t.Setenv("PEBBLE_VA_NOSLEEP", "1")
	lg := log.New(quiet(t), "pebble ", 0)
	db := pebbledb.NewMemoryStore()
	ca := pebbleca.New(lg, db, "", "ecdsa", 0, 1, map[string]pebbleca.Profile{"default": {Description: "test", ValidityPeriod: uint64(validity / time.Second)}})
	va := pebbleva.New(lg, httpPort, tlsPort, false, startDNS(t), db)
	wfe := pebblewfe.New(lg, db, va, ca, nil, false, false, 0, 0)
	pb := &pebble{ca: ca}
	h := wfe.Handler()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/order-plz" {
			h.ServeHTTP(w, r)
			return
		}
		// An order made, not a request for one (pebble refuses some nonces
		// on purpose, and the client asks again).
		sw := &statusWriter{ResponseWriter: w}
		h.ServeHTTP(sw, r)
		if sw.status == http.StatusCreated {
			pb.orders.Add(1)
		}
	}))
	t.Cleanup(srv.Close)
	pb.url = srv.URL + pebblewfe.DirectoryPath
	pb.roots = x509.NewCertPool()
	pb.roots.AddCert(srv.Certificate())
	return pb
}

// statusWriter remembers the status written.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

// issuedRoots trusts what pebble issues.
func (pb *pebble) issuedRoots() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(pb.ca.GetRootCert(0).Cert)
	return p
}

// acmeEdge is an edge whose certificates come from ACME.
type acmeEdge struct {
	p    *Proxy
	acme *edgecert.ACME
	st   *certstore.Storage
}

// edgeListeners are an edge's plain and HTTPS listeners.
func edgeListeners(t *testing.T) (plain, secure net.Listener) {
	t.Helper()
	var err error
	if plain, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	if secure, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	return plain, secure
}

func startACMEEdge(t *testing.T, id string, cat catalog.Catalog, names *certstore.Hostnames, pb *pebble, plain, secure net.Listener, acfg edgecert.ACMEConfig) *acmeEdge {
	t.Helper()
	certs, _ := cat.Bucket(certstore.BucketCerts)
	locks, _ := cat.Bucket(certstore.BucketLocks)
	logger := slog.New(slog.NewTextHandler(quiet(t), &slog.HandlerOptions{Level: slog.LevelDebug})).With("edge", id)
	st, err := certstore.NewStorage(certstore.StorageConfig{Certs: certs, Locks: locks, Owner: id, LockTTL: 5 * time.Second, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(st.Close)
	acfg.CA, acfg.TrustedRoots, acfg.Storage, acfg.Claimed = pb.url, pb.roots, st, names.App
	acfg.ListenHost, acfg.HTTPPort, acfg.TLSPort = "127.0.0.1", plain.Addr().(*net.TCPAddr).Port, secure.Addr().(*net.TCPAddr).Port
	acfg.Logger = logger
	a, err := edgecert.NewACME(acfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	p := startProxy(t, Config{HostID: id, Edge: plain, Logger: logger, Hostnames: names.App,
		TLS: &TLSConfig{Listener: secure, GetCertificate: a.GetCertificate, ACME: true, HTTPChallenge: a.HTTPChallenge}})
	return &acmeEdge{p: p, acme: a, st: st}
}

// claim writes a hostname claim as the certificates API does and waits
// until the edges' follower sees it.
func claim(t *testing.T, cat catalog.Catalog, names *certstore.Hostnames, host, app string) {
	t.Helper()
	b, _ := cat.Bucket(certstore.BucketHostnames)
	if _, err := catalog.CreateJSON(context.Background(), b, host, certstore.Claim{Hostname: host, App: app, AppID: "id-" + app, CreatedAt: time.Now()}, 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if got, ok := names.App(host); ok && got == app {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the claim of %s never reached the edge", host)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func openCertCatalog(t *testing.T) (*catalog.NATS, *certstore.Hostnames) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cat, err := catalog.Open(ctx, catalog.Config{DataDir: t.TempDir(), Buckets: certstore.Buckets()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cat.Close() })
	hb, _ := cat.Bucket(certstore.BucketHostnames)
	names := certstore.NewHostnames(hb, nil)
	names.Start()
	t.Cleanup(names.Close)
	return cat, names
}

// httpsTo is a client that sends every request to addr, trusting roots.
func httpsTo(addr string, roots *x509.CertPool, h2 bool) *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots}, ForceAttemptHTTP2: h2,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}
	if !h2 {
		tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	return &http.Client{Transport: tr, Timeout: 2 * time.Minute, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// served returns the leaf certificate the edge at addr serves for name,
// verified against roots.
func served(t *testing.T, addr, name string, roots *x509.CertPool) (*x509.Certificate, error) {
	t.Helper()
	d := &net.Dialer{Timeout: 2 * time.Minute}
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{ServerName: name, RootCAs: roots})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0], nil
}

// TestACMEIssuance, for each challenge type: a claimed hostname gets a
// certificate from the CA on its first handshake, validated at the edge's
// own listeners, and is served over HTTP/1.1 and HTTP/2 to its app; a
// hostname no app claimed gets no certificate and causes no ACME order; a
// second edge sharing the catalog serves the same certificate without a
// second issuance; force_https redirects the plain edge to HTTPS.
func TestACMEIssuance(t *testing.T) {
	for _, chal := range []string{"http-01", "tls-alpn-01"} {
		t.Run(chal, func(t *testing.T) {
			plainA, secureA := edgeListeners(t)
			pb := startPebble(t, plainA.Addr().(*net.TCPAddr).Port, secureA.Addr().(*net.TCPAddr).Port, 0)
			cat, names := openCertCatalog(t)
			acfg := edgecert.ACMEConfig{DisableHTTP01: chal != "http-01", DisableTLSALPN01: chal != "tls-alpn-01"}
			a := startACMEEdge(t, "ams-1", cat, names, pb, plainA, secureA, acfg)
			b := startBackend(t, "m1")
			m := tlsMachine("m1", "ams-1", b, true)
			m.App = "shop"
			a.p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
			claim(t, cat, names, "shop.example.test", "shop")
			roots := pb.issuedRoots()

			// Not claimed: no certificate, no order.
			if _, err := served(t, a.p.TLSAddr(), "evil.example.test", roots); err == nil {
				t.Fatal("a hostname no app claimed got a certificate")
			}
			if n := pb.orders.Load(); n != 0 {
				t.Fatalf("%d ACME orders for a hostname no app claimed", n)
			}

			for _, h2 := range []bool{false, true} {
				resp, err := httpsTo(a.p.TLSAddr(), roots, h2).Get("https://shop.example.test/hello")
				if err != nil {
					t.Fatalf("h2=%v: %v", h2, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || (h2 && resp.ProtoMajor != 2) {
					t.Fatalf("h2=%v: %s %s", h2, resp.Status, body)
				}
				if s := decode(t, string(body)); s.Machine != "m1" || s.Header.Get("X-Forwarded-Proto") != "https" {
					t.Errorf("h2=%v: the machine saw %+v", h2, s)
				}
			}
			leafA, err := served(t, a.p.TLSAddr(), "shop.example.test", roots)
			if err != nil {
				t.Fatal(err)
			}
			if n := pb.orders.Load(); n != 1 {
				t.Errorf("%d ACME orders, want 1", n)
			}

			// force_https on the plain edge.
			resp, err := httpsTo(a.p.EdgeAddr(), nil, false).Get("http://shop.example.test/x")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "https://shop.example.test/x" {
				t.Errorf("force_https: %s %v", resp.Status, resp.Header)
			}

			// A second edge: the same certificate, from the catalog.
			plainB, secureB := edgeListeners(t)
			eb := startACMEEdge(t, "ams-2", cat, names, pb, plainB, secureB, acfg)
			leafB, err := served(t, eb.p.TLSAddr(), "shop.example.test", roots)
			if err != nil {
				t.Fatal(err)
			}
			if !leafA.Equal(leafB) {
				t.Error("the second edge serves another certificate")
			}
			if n := pb.orders.Load(); n != 1 {
				t.Errorf("%d ACME orders after the second edge's handshake, want 1", n)
			}
		})
	}
}

// TestACMERenewal: a certificate is renewed once, in its renewal window
// (short-lived certificates: 30 s, renewed with four fifths left, the
// maintenance every second), and served without a gap.
func TestACMERenewal(t *testing.T) {
	const lifetime = 30 * time.Second
	plain, secure := edgeListeners(t)
	pb := startPebble(t, plain.Addr().(*net.TCPAddr).Port, secure.Addr().(*net.TCPAddr).Port, lifetime)
	cat, names := openCertCatalog(t)
	a := startACMEEdge(t, "ams-1", cat, names, pb, plain, secure, edgecert.ACMEConfig{DisableTLSALPN01: true, RenewalWindowRatio: 0.8, RenewCheckInterval: time.Second})
	claim(t, cat, names, "shop.example.test", "shop")
	roots := pb.issuedRoots()
	first, err := served(t, a.p.TLSAddr(), "shop.example.test", roots)
	if err != nil {
		t.Fatal(err)
	}
	if got := first.NotAfter.Sub(first.NotBefore); got > lifetime {
		t.Fatalf("pebble issued a certificate valid %v", got)
	}
	// Handshakes go on; once in the window (a fifth of the lifetime in) one
	// starts the renewal, and a later one gets the new certificate. The
	// first certificate's expiry bounds the wait: a renewal after that
	// would have failed the handshakes in between.
	var renewed *x509.Certificate
	for renewed == nil {
		if time.Now().After(first.NotAfter) {
			t.Fatalf("no renewal before the certificate expired (%d orders)", pb.orders.Load())
		}
		leaf, err := served(t, a.p.TLSAddr(), "shop.example.test", roots)
		if err != nil {
			t.Fatalf("a handshake during the renewal: %v", err)
		}
		if !leaf.Equal(first) {
			renewed = leaf
		}
		time.Sleep(200 * time.Millisecond)
	}
	if renewed.NotBefore.Before(first.NotBefore.Add(lifetime/5 - time.Second)) {
		t.Errorf("renewed at %v, before its window (issued %v)", renewed.NotBefore, first.NotBefore)
	}
	if !renewed.NotAfter.After(first.NotAfter) {
		t.Errorf("the renewed certificate expires %v, not after %v", renewed.NotAfter, first.NotAfter)
	}
	if n := pb.orders.Load(); n != 2 {
		t.Errorf("%d ACME orders, want 2 (issue, renew)", n)
	}
}
