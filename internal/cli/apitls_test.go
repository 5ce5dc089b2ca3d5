package cli

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestServerAPIIsTLS: flame server refuses to serve its API without a
// certificate unless told --plain-http; a certificate that does not load
// is an error, one that loads gives the plane its TLS config.
func TestServerAPIIsTLS(t *testing.T) {
	for _, args := range [][]string{
		{"server", "--data-dir", t.TempDir()},
		{"server", "--data-dir", t.TempDir(), "--tls-cert", "x.pem"},
		{"server", "--data-dir", t.TempDir(), "--plain-http", "--tls-cert", "x.pem", "--tls-key", "k.pem"},
	} {
		code, _, stderr := run(args...)
		if code != 2 || !strings.Contains(stderr, "tls") && !strings.Contains(stderr, "TLS") {
			t.Errorf("flame %s: exit %d, stderr %q", strings.Join(args, " "), code, stderr)
		}
	}
	dir := t.TempDir()
	if _, err := (apiTLSFlags{cert: filepath.Join(dir, "none.pem"), key: filepath.Join(dir, "none.key")}).config(); err == nil {
		t.Error("missing files loaded")
	}
	cert, key := writeKeyPair(t, dir)
	c, err := (apiTLSFlags{cert: cert, key: key}).config()
	if err != nil || c == nil || len(c.Certificates) != 1 {
		t.Fatalf("%v %v", c, err)
	}
	if c, err := (apiTLSFlags{plainHTTP: true}).config(); c != nil || err != nil {
		t.Errorf("--plain-http: %v %v", c, err)
	}
}

func writeKeyPair(t *testing.T, dir string) (certPath, keyPath string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "api"}, DNSNames: []string{"localhost"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(k)
	certPath, keyPath = filepath.Join(dir, "api.pem"), filepath.Join(dir, "api.key")
	os.WriteFile(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644)
	os.WriteFile(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600)
	return certPath, keyPath
}
