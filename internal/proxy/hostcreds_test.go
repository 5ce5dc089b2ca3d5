package proxy

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy/route"
)

// testCA issues host identities for proxies whose backhaul runs over
// mutual TLS.
type testCA struct {
	t  testing.TB
	ca *pki.CA
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	ca, err := pki.NewCA("test CA", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{t: t, ca: ca}
}

// identity issues a certificate in role for id.
func (c *testCA) identity(role, id string) *pki.HostIdentity {
	c.t.Helper()
	key, err := pki.NewKey()
	if err != nil {
		c.t.Fatal(err)
	}
	cert, err := c.ca.Issue(role, id, &key.PublicKey, time.Now(), time.Hour)
	if err != nil {
		c.t.Fatal(err)
	}
	return &pki.HostIdentity{HostID: id, CA: c.ca.Cert, Cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
}

// mtlsPair starts an edge on ams-1 and a far host fra-1 holding a machine,
// their backhaul over mutual TLS; it returns both and the far host's
// revocation list.
func mtlsPair(t *testing.T, ca *testCA, fastPath bool) (edge, far *Proxy, farRevoked *pki.Revocations, b *backend) {
	t.Helper()
	b = startBackend(t, "m1")
	m := machine("m1", "fra-1", b.addr)
	farRevoked = new(pki.Revocations)
	far = startProxy(t, Config{HostID: "fra-1", Identity: pki.NewSlot(ca.identity(pki.RoleHost, "fra-1")), Revoked: farRevoked})
	edge = startProxy(t, Config{HostID: "ams-1", Identity: pki.NewSlot(ca.identity(pki.RoleHost, "ams-1")), Revoked: new(pki.Revocations),
		DisableFastPath: !fastPath})
	bh := map[string]string{"fra-1": far.BackhaulAddr()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, bh)
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: []route.Machine{m}}, bh)
	return edge, far, farRevoked, b
}

// TestBackhaulOverMutualTLS: an edge reaches a machine on another host over
// the backhaul's mutual TLS, on net/http's path and on the fast path.
func TestBackhaulOverMutualTLS(t *testing.T) {
	ca := newTestCA(t)
	for _, fastPath := range []bool{false, true} {
		edge, _, _, b := mtlsPair(t, ca, fastPath)
		client := &http.Client{Transport: &http.Transport{}}
		for range 3 {
			resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", nil)
			if resp.StatusCode != http.StatusOK || decode(t, body).Machine != "m1" {
				t.Fatalf("fast path %v: %d %s", fastPath, resp.StatusCode, body)
			}
		}
		if b.hits.Load() != 3 {
			t.Fatalf("fast path %v: machine saw %d requests, want 3", fastPath, b.hits.Load())
		}
		client.CloseIdleConnections()
	}
}

// hopRequest is a backhaul request for machine m1, the hosts' old token
// included.
func hopRequest(addr string) *http.Request {
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/", nil)
	req.Host = "demo.localhost"
	for k, v := range map[string]string{hdrToken: testToken, hdrApp: "demo", hdrMachine: "m1", hdrPort: "80"} {
		req.Header.Set(k, v)
	}
	return req
}

// hopWith sends a backhaul request to addr over TLS presenting cert (none
// when nil).
func hopWith(addr string, cert *tls.Certificate) (*http.Response, error) {
	cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}
	tr := &http.Transport{TLSClientConfig: cfg, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req := hopRequest(addr)
	req.URL.Scheme = "https"
	return tr.RoundTrip(req)
}

// TestBackhaulRefusesWhatIsNotAHost: over mutual TLS the backhaul takes
// only hosts' certificates of its CA. Plain HTTP with the right token,
// TLS without a certificate, a host certificate of another CA and a control
// plane's certificate of the same CA are all refused; a host's own works.
func TestBackhaulRefusesWhatIsNotAHost(t *testing.T) {
	ca := newTestCA(t)
	_, far, _, b := mtlsPair(t, ca, false)
	addr := far.BackhaulAddr()

	// Plain HTTP, with the token every host used to share.
	if resp, err := (&http.Transport{}).RoundTrip(hopRequest(addr)); err == nil {
		resp.Body.Close()
		t.Fatalf("plain HTTP with the hosts' token: %s, want the connection refused", resp.Status)
	}
	other := newTestCA(t)
	for name, cert := range map[string]*tls.Certificate{
		"no certificate":               nil,
		"another CA's host":            &other.identity(pki.RoleHost, "ams-1").Cert,
		"a control plane's of this CA": &ca.identity(pki.RoleControl, "plane-1").Cert,
	} {
		if resp, err := hopWith(addr, cert); err == nil {
			resp.Body.Close()
			t.Errorf("%s: %s, want the handshake refused", name, resp.Status)
		}
	}
	resp, err := hopWith(addr, &ca.identity(pki.RoleHost, "ams-2").Cert)
	if err != nil {
		t.Fatalf("a host's certificate: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || decode(t, string(body)).Machine != "m1" {
		t.Fatalf("a host's certificate: %s %s", resp.Status, body)
	}
	if b.hits.Load() != 1 {
		t.Fatalf("the machine saw %d requests, want 1", b.hits.Load())
	}
}

// TestBackhaulRefusesRevokedHost: once the list the control plane pushes
// names a host's certificate, the backhaul refuses it — a new connection
// fails its handshake and one it had open is closed — while a certificate
// replaced by renewing keeps the connection it has.
func TestBackhaulRefusesRevokedHost(t *testing.T) {
	ca := newTestCA(t)
	_, far, rev, _ := mtlsPair(t, ca, false)
	addr := far.BackhaulAddr()
	stolen := ca.identity(pki.RoleHost, "ams-2")
	renewed := ca.identity(pki.RoleHost, "ams-1")

	dial := func(id *pki.HostIdentity) (*tls.Conn, error) {
		c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.Cert}})
		if err != nil {
			return nil, err
		}
		// TLS 1.3: the server's refusal of the client's certificate
		// arrives with the first read.
		req := hopRequest(addr)
		if err := req.Write(c); err != nil {
			c.Close()
			return nil, err
		}
		if _, err := finalResponse(bufio.NewReader(c), req); err != nil {
			c.Close()
			return nil, err
		}
		return c, nil
	}
	open, err := dial(stolen)
	if err != nil {
		t.Fatalf("before revocation: %v", err)
	}
	defer open.Close()
	kept, err := dial(renewed)
	if err != nil {
		t.Fatalf("before renewal: %v", err)
	}
	defer kept.Close()

	exp := time.Now().Add(time.Hour)
	if err := rev.Replace([]api.RevokedSerial{
		{Serial: pki.Serial(stolen.Cert.Leaf), HostID: "ams-2", ExpiresAt: exp},
		{Serial: pki.Serial(renewed.Cert.Leaf), HostID: "ams-1", ExpiresAt: exp, Superseded: true},
	}, time.Now()); err != nil {
		t.Fatal(err)
	}
	for _, id := range []*pki.HostIdentity{stolen, renewed} {
		if c, err := dial(id); err == nil {
			c.Close()
			t.Errorf("host %s: a new connection after revocation was served", id.HostID)
		}
	}
	// The open connection of the revoked host is closed.
	open.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := open.Read(make([]byte, 1)); err == nil || isTimeout(err) {
		t.Fatalf("the revoked host's open connection: read %v, want it closed", err)
	}
	// The replaced certificate's connection still serves.
	req := hopRequest(addr)
	if err := req.Write(kept); err != nil {
		t.Fatalf("the renewed host's open connection: %v", err)
	}
	if resp, err := finalResponse(bufio.NewReader(kept), req); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("the renewed host's open connection: %v", err)
	}
}

// finalResponse reads past the far proxy's interim acknowledgements to
// the answer, and reads its body.
func finalResponse(br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, err
		}
		if resp.StatusCode >= 200 {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return resp, nil
		}
	}
}

// TestEdgeRefusesRevokedFarHost: an edge does not deliver to a host whose
// certificate its list revokes: the handshake fails as a connect would.
func TestEdgeRefusesRevokedFarHost(t *testing.T) {
	ca := newTestCA(t)
	edge, far, _, b := mtlsPair(t, ca, false)
	_ = far
	leaf, err := tlsLeaf(far.BackhaulAddr(), ca.identity(pki.RoleHost, "ams-9"))
	if err != nil {
		t.Fatal(err)
	}
	if err := edge.cfg.Revoked.Replace([]api.RevokedSerial{{Serial: pki.Serial(leaf), HostID: "fra-1", ExpiresAt: time.Now().Add(time.Hour)}}, time.Now()); err != nil {
		t.Fatal(err)
	}
	resp, body := get(t, &http.Client{Transport: &http.Transport{}}, edge.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode == http.StatusOK || b.hits.Load() != 0 {
		t.Fatalf("a revoked far host got the request: %d %s", resp.StatusCode, body)
	}
	if !strings.Contains(body, "revoked") {
		t.Errorf("answer does not say why: %s", body)
	}
}

// tlsLeaf is the certificate a backhaul listener shows.
func tlsLeaf(addr string, id *pki.HostIdentity) (*x509.Certificate, error) {
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, Certificates: []tls.Certificate{id.Cert}})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0], nil
}

var _ net.Conn = (*tlsConn)(nil)
