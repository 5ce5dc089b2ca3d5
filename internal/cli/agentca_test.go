package cli

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestAgentCAFile: with --ca-file the agent's calls to the control plane
// (enrollment, renewal) accept the API certificate only if it chains to
// the file's certificates — a private CA the system does not know works,
// and a plane whose certificate another CA signed is refused.
func TestAgentCAFile(t *testing.T) {
	plane := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	defer plane.Close()
	// Another plane, its certificate (for the same address) self-signed.
	other := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	other.TLS = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
	other.StartTLS()
	defer other.Close()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: plane.Certificate().Raw}), 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := planeHTTPClient(ca)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Get(plane.URL)
	if err != nil {
		t.Fatalf("the plane the CA file vouches for: %v", err)
	}
	resp.Body.Close()
	if resp, err := c.Get(other.URL); err == nil {
		resp.Body.Close()
		t.Fatal("a plane of another CA was accepted")
	}
	// Without the file, the system's roots: the private CA is not among them.
	if resp, err := http.Get(plane.URL); err == nil {
		resp.Body.Close()
		t.Fatal("the system's roots accepted a private CA")
	}
	empty := filepath.Join(dir, "empty.pem")
	os.WriteFile(empty, []byte("not a certificate\\n"), 0o600)
	var ue usageError
	if _, err := planeHTTPClient(empty); !errors.As(err, &ue) {
		t.Errorf("a file without certificates: %v, want a usage error", err)
	}
	if c, err := planeHTTPClient(""); c != nil || err != nil {
		t.Errorf("no file: %v %v, want the default client", c, err)
	}
}

// selfSigned is a certificate for 127.0.0.1 that signs itself.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "other"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
