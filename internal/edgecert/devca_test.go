package edgecert

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestDevCA: the CA is made once and loaded again from its directory (the
// key kept private); it signs <app>.<domain> and the domain, verified by
// its pool, and nothing else; a leaf is reused until half its life.
func TestDevCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := LoadOrCreateDevCA(dir, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, DevCAKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", fi, err)
	}
	again, err := LoadOrCreateDevCA(dir, "localhost")
	if err != nil || !again.cert.Equal(ca.cert) {
		t.Fatalf("loaded again: %v", err)
	}
	for _, name := range []string{"demo.localhost", "Demo.Localhost.", "localhost"} {
		c, err := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: name})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if _, err := c.Leaf.Verify(x509.VerifyOptions{Roots: again.Pool(), DNSName: c.Leaf.DNSNames[0]}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, name := range []string{"a.b.localhost", "example.com", "", "localhost.evil"} {
		if _, err := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: name}); err == nil {
			t.Errorf("%q got a certificate", name)
		}
	}
	now := time.Now()
	ca.now = func() time.Time { return now }
	c1, _ := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "x.localhost"})
	c2, _ := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "x.localhost"})
	if c1 != c2 {
		t.Error("a fresh leaf was signed again")
	}
	ca.now = func() time.Time { return now.Add(devLeafLifetime/2 + time.Minute) }
	if c3, _ := ca.GetCertificate(&tls.ClientHelloInfo{ServerName: "x.localhost"}); c3 == c1 {
		t.Error("a leaf past half its life was served again")
	}
}
