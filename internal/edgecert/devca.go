package edgecert

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// DevCA is a self-signed CA for `flame dev`: made once in a directory
// (ca.pem, the certificate a client trusts with `curl --cacert`;
// ca-key.pem, mode 0600), it signs, on the first handshake for each name,
// a leaf certificate for <app>.<domain> (and the domain itself), kept in
// memory. Names outside the domain get none.
type DevCA struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	path   string
	domain string
	now    func() time.Time

	mu     sync.Mutex
	leaves map[string]*tls.Certificate
}

// Files of a DevCA's directory.
const (
	DevCAFile    = "ca.pem"
	DevCAKeyFile = "ca-key.pem"
)

// devLeafLifetime is how long a leaf is valid; a leaf is signed again once
// past half of it.
const devLeafLifetime = 7 * 24 * time.Hour

// maxDevLeaves bounds the leaves kept (a client may send any SNI under the
// domain).
const maxDevLeaves = 4096

// LoadOrCreateDevCA opens the CA in dir, making it first if absent.
func LoadOrCreateDevCA(dir, domain string) (*DevCA, error) {
	ca := &DevCA{path: filepath.Join(dir, DevCAFile), domain: strings.ToLower(domain), now: time.Now, leaves: map[string]*tls.Certificate{}}
	keyPath := filepath.Join(dir, DevCAKeyFile)
	certPEM, err1 := os.ReadFile(ca.path)
	keyPEM, err2 := os.ReadFile(keyPath)
	switch {
	case err1 == nil && err2 == nil:
	case errors.Is(err1, os.ErrNotExist) && errors.Is(err2, os.ErrNotExist):
		if certPEM, keyPEM, err1 = newDevCA(); err1 != nil {
			return nil, err1
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("dev ca: %w", err)
		}
		if err := os.WriteFile(keyPath, keyPEM, 0o600); err != nil {
			return nil, fmt.Errorf("dev ca: %w", err)
		}
		if err := os.WriteFile(ca.path, certPEM, 0o644); err != nil {
			return nil, fmt.Errorf("dev ca: %w", err)
		}
	default:
		return nil, fmt.Errorf("dev ca in %s: %w", dir, errors.Join(err1, err2))
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("dev ca in %s: %w", dir, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("dev ca in %s: the key is not ECDSA", dir)
	}
	if ca.cert, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
		return nil, fmt.Errorf("dev ca in %s: %w", dir, err)
	}
	ca.key = key
	return ca, nil
}

func newDevCA() (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: "Flame dev CA", Organization: []string{"Flame dev"}},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign, BasicConstraintsValid: true, IsCA: true,
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, err
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), nil
}

// Path is the CA certificate's file, for `curl --cacert`.
func (ca *DevCA) Path() string { return ca.path }

// Pool is a pool holding the CA, for Go clients.
func (ca *DevCA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.cert)
	return p
}

// covers reports whether the CA signs for name: the domain or one label
// under it.
func (ca *DevCA) covers(name string) bool {
	if name == ca.domain {
		return true
	}
	label, ok := strings.CutSuffix(name, "."+ca.domain)
	return ok && label != "" && !strings.Contains(label, ".") && len(label) <= 63
}

// GetCertificate is the edge's certificate source.
func (ca *DevCA) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	if !ca.covers(name) {
		return nil, fmt.Errorf("dev ca: no certificate for %q (only %s and *.%s)", name, ca.domain, ca.domain)
	}
	now := ca.now()
	ca.mu.Lock()
	defer ca.mu.Unlock()
	if c := ca.leaves[name]; c != nil && now.Before(c.Leaf.NotBefore.Add(devLeafLifetime/2)) {
		return c, nil
	}
	c, err := ca.sign(name, now)
	if err != nil {
		return nil, err
	}
	if len(ca.leaves) >= maxDevLeaves {
		clear(ca.leaves)
	}
	ca.leaves[name] = c
	return c, nil
}

// sign makes a leaf for name.
func (ca *DevCA) sign(name string, now time.Time) (*tls.Certificate, error) {
	return ca.issue([]string{name}, now, devLeafLifetime)
}

// ServerCertificate signs a certificate for the given names and IPs (a
// control plane's API in dev), valid a year.
func (ca *DevCA) ServerCertificate(names []string) (*tls.Certificate, error) {
	return ca.issue(names, ca.now(), 365*24*time.Hour)
}

// issue signs a server certificate for names (host names or IPs), valid
// from now for life, with a key of its own.
func (ca *DevCA) issue(names []string, now time.Time, life time.Duration) (*tls.Certificate, error) {
	if len(names) == 0 {
		return nil, errors.New("dev ca: a certificate needs a name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: names[0]},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(life),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("dev ca: sign %v: %w", names, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}
