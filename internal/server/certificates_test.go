package server_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/server"
)

// TestCertificatesAPI: a hostname belongs to the first app that adds it
// (another app gets 409 until the holder removes it or is deleted);
// invalid, wildcard and platform-domain hostnames are refused with 422; the
// status reads the certificate the edges stored in the catalog.
func TestCertificatesAPI(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1, server: server.Config{EdgeDomain: "flame.test"}})
	ctx := context.Background()
	shop, _ := orgWithApp(t, c, "acme", "shop")
	rival, _ := orgWithApp(t, c, "rival", "other")

	d, err := shop.CreateCertificate(ctx, "shop", "shop.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if d.Hostname != "shop.example.com" || d.Configured || d.Status != api.CertificateAwaiting || !d.AcmeRequested ||
		d.DNSRequirements.ACMEChallenge.Name != "_acme-challenge.shop.example.com" {
		t.Errorf("fresh hostname: %+v", d)
	}
	if _, err := shop.CreateCertificate(ctx, "shop", "shop.example.com"); err != nil {
		t.Errorf("adding its own hostname again: %v", err)
	}
	if _, err := rival.CreateCertificate(ctx, "other", "shop.example.com"); status(err) != http.StatusConflict {
		t.Errorf("another app's hostname: %v, want 409", err)
	}
	for _, h := range []string{"*.example.com", "localhost", "1.2.3.4", "a..b", "x.flame.test", "shop.flame.test", strings.Repeat("a", 300) + ".com"} {
		if _, err := rival.CreateCertificate(ctx, "other", h); status(err) != http.StatusUnprocessableEntity {
			t.Errorf("hostname %q: %v, want 422", h, err)
		}
	}
	if _, err := rival.CreateCertificate(ctx, "other", "other.flame.test"); err != nil {
		t.Errorf("the app's own name under the platform domain: %v", err)
	}
	// Another org does not see the app's hostnames.
	if _, err := rival.GetCertificate(ctx, "shop", "shop.example.com"); status(err) != http.StatusNotFound {
		t.Errorf("another org's hostname: %v, want 404", err)
	}
	if _, err := rival.GetCertificate(ctx, "other", "shop.example.com"); status(err) != http.StatusNotFound {
		t.Errorf("a hostname of another app through one's own: %v, want 404", err)
	}

	// An edge stored a certificate for it (as certmagic lays it out).
	certs, err := c.Plane.Catalog.Bucket(certstore.BucketCerts)
	if err != nil {
		t.Fatal(err)
	}
	locks, _ := c.Plane.Catalog.Bucket(certstore.BucketLocks)
	st, err := certstore.NewStorage(certstore.StorageConfig{Certs: certs, Locks: locks})
	if err != nil {
		t.Fatal(err)
	}
	notAfter := time.Now().Add(90 * 24 * time.Hour).Truncate(time.Second).UTC()
	dir := "certificates/acme.test-directory/shop.example.com"
	if err := st.Store(ctx, dir+"/shop.example.com.crt", selfSigned(t, "shop.example.com", notAfter)); err != nil {
		t.Fatal(err)
	}
	d, err = shop.GetCertificate(ctx, "shop", "shop.example.com")
	if err != nil {
		t.Fatal(err)
	}
	if !d.Configured || d.Status != api.CertificateReady || len(d.Certificates) != 1 || !d.Certificates[0].ExpiresAt.Equal(notAfter) ||
		d.Certificates[0].Issued[0].Type != "ecdsa" {
		t.Errorf("with a stored certificate: %+v", d)
	}
	l, err := shop.ListCertificates(ctx, "shop")
	if err != nil || l.TotalCount != 1 || l.Certificates[0].Hostname != "shop.example.com" || !l.Certificates[0].Configured {
		t.Fatalf("list: %+v, %v", l, err)
	}

	// Removing it frees it and deletes what the edges stored.
	if err := shop.DeleteCertificate(ctx, "shop", "shop.example.com"); err != nil {
		t.Fatal(err)
	}
	if st.Exists(ctx, dir) {
		t.Error("the stored certificate outlived its hostname")
	}
	if _, err := rival.CreateCertificate(ctx, "other", "shop.example.com"); err != nil {
		t.Fatalf("a removed hostname: %v", err)
	}
	// Deleting the app frees its hostnames.
	if err := rival.DeleteApp(ctx, "other"); err != nil {
		t.Fatal(err)
	}
	if _, err := shop.CreateCertificate(ctx, "shop", "shop.example.com"); err != nil {
		t.Fatalf("a hostname of a deleted app: %v", err)
	}
}

// selfSigned is a PEM certificate for name expiring at notAfter.
func selfSigned(t *testing.T, name string, notAfter time.Time) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}
