// Package pki is the cluster's certificate authority and the identities it
// issues: every host and every control plane holds an ECDSA P-256 key of its
// own and a certificate naming its role and id, and the two talk over
// mutual TLS, each checking the other's role (and the plane the host's id).
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/flamehq/flame/api"
)

// Roles a certificate can name. A host's certificate serves its API; a
// control plane's is the only client a host's API accepts.
const (
	RoleHost    = "host"
	RoleControl = "control"
)

// Validity of what the CA issues. A host renews its certificate once
// RenewAfter of its life is gone (renew.go).
const (
	CAValidity      = 10 * 365 * 24 * time.Hour
	HostValidity    = 90 * 24 * time.Hour
	ControlValidity = 7 * 24 * time.Hour
)

// ErrIdentity is wrapped by every refusal of a peer's certificate.
var ErrIdentity = errors.New("pki: identity refused")

// maxIDLen bounds the id a certificate names (host ids are cluster member
// names).
const maxIDLen = 63

// ValidID reports whether id may be named in a certificate.
func ValidID(id string) bool { return api.ValidWord(id, maxIDLen, ".") }

// identityURI is how a certificate names its holder: flame://<role>/<id>.
func identityURI(role, id string) *url.URL {
	return &url.URL{Scheme: "flame", Host: role, Path: "/" + id}
}

// Identify returns the role and id a certificate names, from its one
// flame:// URI.
func Identify(c *x509.Certificate) (role, id string, ok bool) {
	var n int
	for _, u := range c.URIs {
		if u.Scheme != "flame" {
			continue
		}
		n++
		role, id = u.Host, u.Path
		if len(id) > 1 && id[0] == '/' {
			id = id[1:]
		} else {
			id = ""
		}
	}
	if n != 1 || (role != RoleHost && role != RoleControl) || !ValidID(id) {
		return "", "", false
	}
	return role, id, true
}

// CA is the cluster's certificate authority.
type CA struct {
	Cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// NewCA makes a CA with a fresh key.
func NewCA(name string, now time.Time) (*CA, error) {
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          newSerial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(CAValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("pki: make ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, key: key}, nil
}

// ParseCA reads a CA from its certificate and key (PEM).
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, err
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, err
	}
	if !cert.IsCA || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("pki: ca key does not match its certificate")
	}
	return &CA{Cert: cert, key: key}, nil
}

// CertPEM is the CA's certificate, what every party trusts.
func (ca *CA) CertPEM() []byte { return CertPEM(ca.Cert.Raw) }

// KeyPEM is the CA's private key: it is stored only sealed.
func (ca *CA) KeyPEM() []byte { return KeyPEM(ca.key) }

// Fingerprint is the SHA-256 of the CA's certificate, in hex: a join token
// carries it so a host trusts only this CA.
func (ca *CA) Fingerprint() string { return Fingerprint(ca.Cert.Raw) }

// Pool is a pool holding only the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// Issue signs a certificate naming role and id for pub, valid from now for
// d (never past the CA's own end).
func (ca *CA) Issue(role, id string, pub crypto.PublicKey, now time.Time, d time.Duration) (*x509.Certificate, error) {
	if !ValidID(id) {
		return nil, fmt.Errorf("pki: invalid id %q", api.Clip(id, 80))
	}
	var usage []x509.ExtKeyUsage
	switch role {
	case RoleHost:
		// A host serves its API and its backhaul, and calls other
		// hosts' backhaul listeners as a client.
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	case RoleControl:
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	default:
		return nil, fmt.Errorf("pki: unknown role %q", role)
	}
	if err := checkPublicKey(pub); err != nil {
		return nil, err
	}
	end := now.Add(d)
	if end.After(ca.Cert.NotAfter) {
		end = ca.Cert.NotAfter
	}
	// Valid a little before now, for clocks behind the CA's: a minute,
	// or a tenth of a short life (renewal is reckoned from it).
	skew := min(time.Minute, d/10)
	tmpl := &x509.Certificate{
		SerialNumber: newSerial(),
		Subject:      pkix.Name{CommonName: role + "/" + id},
		NotBefore:    now.Add(-skew),
		NotAfter:     end,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		URIs:         []*url.URL{identityURI(role, id)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.key)
	if err != nil {
		return nil, fmt.Errorf("pki: issue %s %s: %w", role, id, err)
	}
	return x509.ParseCertificate(der)
}

// Verify checks a peer's certificate chain (leaf first) against roots for
// usage at now, and that the leaf names role; it returns the leaf and the
// id it names.
func Verify(roots *x509.CertPool, chain []*x509.Certificate, role string, usage x509.ExtKeyUsage, now time.Time) (*x509.Certificate, string, error) {
	if len(chain) == 0 {
		return nil, "", fmt.Errorf("%w: no certificate", ErrIdentity)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	leaf := chain[0]
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
		return nil, "", fmt.Errorf("%w: %v", ErrIdentity, err)
	}
	r, id, ok := Identify(leaf)
	if !ok || r != role {
		return nil, "", fmt.Errorf("%w: certificate of %q is not a %s's", ErrIdentity, leaf.Subject.CommonName, role)
	}
	return leaf, id, nil
}

// NewKey makes an ECDSA P-256 key.
func NewKey() (*ecdsa.PrivateKey, error) {
	return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
}

// NewCSR is a certificate request for key, naming role and id (the CA
// decides what it signs; the request proves possession of the key).
func NewCSR(key *ecdsa.PrivateKey, role, id string) ([]byte, error) {
	return x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: role + "/" + id},
		URIs:    []*url.URL{identityURI(role, id)},
	}, key)
}

// maxCSRBytes bounds a request read from the network.
const maxCSRBytes = 4 << 10

// CheckCSR parses a request, checks its signature and key type, and returns
// its public key.
func CheckCSR(der []byte) (crypto.PublicKey, error) {
	if len(der) > maxCSRBytes {
		return nil, errors.New("pki: certificate request too large")
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, fmt.Errorf("pki: certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("pki: certificate request: %w", err)
	}
	if err := checkPublicKey(csr.PublicKey); err != nil {
		return nil, err
	}
	return csr.PublicKey, nil
}

func checkPublicKey(pub crypto.PublicKey) error {
	if k, ok := pub.(*ecdsa.PublicKey); !ok || k.Curve != elliptic.P256() {
		return errors.New("pki: keys must be ECDSA P-256")
	}
	return nil
}

func newSerial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	return n.Add(n, big.NewInt(1))
}

// Serial is a certificate's serial number in hex: how the catalog names
// the one certificate a host may present.
func Serial(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// Fingerprint is the hex SHA-256 of a DER certificate.
func Fingerprint(der []byte) string {
	s := sha256.Sum256(der)
	return hex.EncodeToString(s[:])
}

// CertPEM encodes a DER certificate.
func CertPEM(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// ParseCertPEM reads one PEM certificate.
func ParseCertPEM(b []byte) (*x509.Certificate, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, errors.New("pki: no PEM certificate")
	}
	return x509.ParseCertificate(blk.Bytes)
}

// KeyPEM encodes a private key (PKCS #8).
func KeyPEM(k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		panic(err) // a P-256 key always marshals
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// ParseKeyPEM reads a PEM ECDSA P-256 private key.
func ParseKeyPEM(b []byte) (*ecdsa.PrivateKey, error) {
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, errors.New("pki: no PEM private key")
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("pki: private key: %w", err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, errors.New("pki: private key is not ECDSA P-256")
	}
	return ek, nil
}
