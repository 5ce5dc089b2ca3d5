package catalog

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// ServerTLSName is the name every locked catalog server's certificate
// carries and every client and route checks: the servers of one catalog
// are told apart by their CA (derived from the shared secret), not by
// their addresses, which a server bound to every interface cannot know.
const ServerTLSName = "catalog.flame"

// SecretLen is the length of Config.Secret.
const SecretLen = 32

// derive draws a key of n bytes for purpose from the catalog's secret.
func derive(secret []byte, purpose string, n int) []byte {
	k, err := hkdf.Key(sha256.New, secret, nil, "flame catalog "+purpose, n)
	if err != nil {
		panic(fmt.Sprintf("catalog: hkdf: %v", err)) // only for n out of range
	}
	return k
}

// lockCA is the catalog's own CA: an Ed25519 key derived from the secret
// and a certificate made from it deterministically, so every server
// holding the secret has the same CA without any exchange, before any
// route is up (the cluster's CA lives in the catalog, out of reach until
// the routes are).
type lockCA struct {
	key  ed25519.PrivateKey
	cert *x509.Certificate
	pem  []byte
}

func newLockCA(secret []byte) (*lockCA, error) {
	key := ed25519.NewKeyFromSeed(derive(secret, "ca", ed25519.SeedSize))
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "flame catalog CA"},
		NotBefore:             time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC),
		NotAfter:              time.Date(2125, 1, 1, 0, 0, 0, 0, time.UTC),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("catalog ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("catalog ca: %w", err)
	}
	return &lockCA{key: key, cert: cert, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// CAPEM is the certificate, in PEM, of the CA the catalog derived from
// secret: what a client of a locked catalog checks the server against
// (Config.CA, with ServerTLSName).
func CAPEM(secret []byte) ([]byte, error) {
	if len(secret) != SecretLen {
		return nil, fmt.Errorf("catalog secret: %d bytes, want %d", len(secret), SecretLen)
	}
	ca, err := newLockCA(secret)
	if err != nil {
		return nil, err
	}
	return ca.pem, nil
}

func (ca *lockCA) pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// leafValidity is how long a server's certificate lasts; a fresh key and
// certificate are made at every start.
const leafValidity = 10 * 365 * 24 * time.Hour

// leaf makes this server's certificate: a fresh P-256 key, named
// ServerTLSName, good as a server (clients, routes it accepts) and as a
// client (routes it dials).
func (ca *lockCA) leaf(now time.Time) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: ServerTLSName},
		DNSNames:     []string{ServerTLSName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(leafValidity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("catalog server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}

// serverTLS is the client listener's TLS: the server's certificate; clients
// prove who they are with nkeys, not certificates.
func serverTLS(leaf tls.Certificate) *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12}
}

// routeTLS is the routes' TLS, both ways: each side shows a certificate of
// the catalog's CA and accepts only one — a server without the secret
// cannot join.
func routeTLS(ca *lockCA, leaf tls.Certificate) *tls.Config {
	return &tls.Config{
		Certificates: []tls.Certificate{leaf},
		RootCAs:      ca.pool(),
		ClientCAs:    ca.pool(),
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ServerName:   ServerTLSName,
		MinVersion:   tls.VersionTLS13,
	}
}

// clientTLS is how a client checks the server: against caPEM, for name.
func clientTLS(caPEM []byte, name string) (*tls.Config, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, errors.New("catalog: no certificate in the CA")
	}
	return &tls.Config{RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12}, nil
}
