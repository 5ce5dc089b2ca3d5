package pki

import (
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/atomicfile"
)

// The files of a host's identity, in its identity directory (owner only).
const (
	keyFile  = "key.pem"
	certFile = "cert.pem"
	caFile   = "ca.pem"
	// hostsTokenFile held the token hosts shared before the backhaul and
	// the registry took host certificates: SaveHostIdentity removes it.
	hostsTokenFile = "hosts-token"
)

// ErrNotEnrolled is an identity directory without a certificate yet.
var ErrNotEnrolled = errors.New("pki: host not enrolled")

// HostIdentity is what an enrolled host holds: its certificate and key, and
// the CA it trusts. It is the host's only credential with the control plane,
// the other hosts' backhaul listeners and the registry.
type HostIdentity struct {
	HostID string
	CA     *x509.Certificate
	Cert   tls.Certificate // Leaf set
	roots  *x509.CertPool
}

// Roots is a pool holding only the identity's CA.
func (id *HostIdentity) Roots() *x509.CertPool {
	if id.roots != nil {
		return id.roots
	}
	p := x509.NewCertPool()
	p.AddCert(id.CA)
	return p
}

// HostKey returns the host's key in dir, making it on first use: it never
// leaves dir, which only the owner can read.
func HostKey(dir string) (*ecdsa.PrivateKey, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, keyFile)
	b, err := os.ReadFile(path)
	if err == nil {
		return ParseKeyPEM(b)
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	k, err := NewKey()
	if err != nil {
		return nil, err
	}
	if err := writePrivate(dir, keyFile, KeyPEM(k)); err != nil {
		return nil, err
	}
	return k, nil
}

// writePrivate writes a file whole, readable by its owner only.
func writePrivate(dir, name string, b []byte) error {
	path := filepath.Join(dir, name)
	if err := atomicfile.Write(path, b, dir); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return os.Chmod(path, 0o600)
}

// CheckHostCert checks what an enrollment answered before a host keeps it:
// the CA is the one the join token named, and the certificate is the CA's,
// for this host, for this key.
func CheckHostCert(caPEM, certPEM []byte, fingerprint, hostID string, key *ecdsa.PrivateKey, now time.Time) (*x509.Certificate, *x509.Certificate, error) {
	ca, err := ParseCertPEM(caPEM)
	if err != nil {
		return nil, nil, err
	}
	if Fingerprint(ca.Raw) != fingerprint {
		return nil, nil, fmt.Errorf("%w: the CA is not the one the join token names", ErrIdentity)
	}
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	_, id, err := Verify(pool, []*x509.Certificate{cert}, RoleHost, x509.ExtKeyUsageServerAuth, now)
	if err != nil {
		return nil, nil, err
	}
	if id != hostID || !key.PublicKey.Equal(cert.PublicKey) {
		return nil, nil, fmt.Errorf("%w: the certificate is not for this host's key", ErrIdentity)
	}
	return ca, cert, nil
}

// SaveHostIdentity keeps an enrollment's answer (checked by CheckHostCert)
// in dir beside the key.
func SaveHostIdentity(dir string, caPEM, certPEM []byte) error {
	if err := os.Remove(filepath.Join(dir, hostsTokenFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := writePrivate(dir, caFile, caPEM); err != nil {
		return err
	}
	// The certificate last: its presence is what makes the host enrolled.
	return writePrivate(dir, certFile, certPEM)
}

// LoadHostIdentity reads the identity in dir, or ErrNotEnrolled.
func LoadHostIdentity(dir string) (*HostIdentity, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, certFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, ErrNotEnrolled
	}
	if err != nil {
		return nil, err
	}
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, err
	}
	role, id, ok := Identify(cert)
	if !ok || role != RoleHost {
		return nil, fmt.Errorf("%w: %s is not a host's certificate", ErrIdentity, filepath.Join(dir, certFile))
	}
	kb, err := os.ReadFile(filepath.Join(dir, keyFile))
	if err != nil {
		return nil, err
	}
	key, err := ParseKeyPEM(kb)
	if err != nil {
		return nil, err
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: %s does not match the key", ErrIdentity, filepath.Join(dir, certFile))
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, caFile))
	if err != nil {
		return nil, err
	}
	ca, err := ParseCertPEM(caPEM)
	if err != nil {
		return nil, err
	}
	out := &HostIdentity{HostID: id, CA: ca,
		Cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}
	out.roots = out.Roots()
	return out, nil
}

// Slot holds a host's identity once it has one: a host may serve before it
// is enrolled (refusing every connection) and be given its identity later.
type Slot struct{ p atomic.Pointer[HostIdentity] }

// NewSlot returns a slot holding id (nil: not enrolled yet).
func NewSlot(id *HostIdentity) *Slot {
	s := &Slot{}
	s.p.Store(id)
	return s
}

// Set gives the host its identity.
func (s *Slot) Set(id *HostIdentity) { s.p.Store(id) }

// Get is the identity, nil before enrollment.
func (s *Slot) Get() *HostIdentity { return s.p.Load() }

// ServerTLS is the TLS of a host's API: the host's certificate, and only
// clients presenting a control plane's certificate from the same CA.
func (s *Slot) ServerTLS(now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			id := s.Get()
			if id == nil {
				return nil, ErrNotEnrolled
			}
			roots := id.Roots()
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{id.Cert},
				ClientAuth:   tls.RequireAnyClientCert,
				VerifyConnection: func(cs tls.ConnectionState) error {
					_, _, err := Verify(roots, cs.PeerCertificates, RoleControl, x509.ExtKeyUsageClientAuth, now())
					return err
				},
			}, nil
		},
	}
}

// ClientTLS is the TLS of a control plane's call to a host: it presents
// cert and accepts only the host hostID's certificate from roots, and, when
// serial is set, only that certificate (the one the catalog records).
func ClientTLS(roots *x509.CertPool, cert func() (*tls.Certificate, error), hostID, serial string, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Verified by VerifyConnection: a host is named by its id, not by
		// the address it is reached at.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert()
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			leaf, id, err := Verify(roots, cs.PeerCertificates, RoleHost, x509.ExtKeyUsageServerAuth, now())
			if err != nil {
				return err
			}
			if id != hostID {
				return fmt.Errorf("%w: expected host %s, the certificate names %s", ErrIdentity, hostID, id)
			}
			if serial != "" && Serial(leaf) != serial {
				return fmt.Errorf("%w: host %s presented a certificate that is no longer its own", ErrIdentity, hostID)
			}
			return nil
		},
	}
}

// ControlCert is a control plane's own certificate, issued by the CA it
// holds and renewed once half its validity is gone.
type ControlCert struct {
	ca  *CA
	id  string
	now func() time.Time

	mu  sync.Mutex
	cur *tls.Certificate
}

// NewControlCert issues certificates naming the control plane id.
func NewControlCert(ca *CA, id string, now func() time.Time) *ControlCert {
	return &ControlCert{ca: ca, id: id, now: now}
}

// Get returns the current certificate, issuing a fresh one when needed.
func (c *ControlCert) Get() (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := c.now()
	if c.cur != nil && now.Before(c.cur.Leaf.NotAfter.Add(-ControlValidity/2)) {
		return c.cur, nil
	}
	key, err := NewKey()
	if err != nil {
		return nil, err
	}
	leaf, err := c.ca.Issue(RoleControl, c.id, &key.PublicKey, now, ControlValidity)
	if err != nil {
		return nil, err
	}
	c.cur = &tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	return c.cur, nil
}

// Operator is a client certificate in the control plane's role that an
// admin got for a tool (POST /v1/hosts/client-certificates): the tool calls
// hosts' APIs as the control plane does.
type Operator struct {
	roots *x509.CertPool
	cert  tls.Certificate
}

// NewOperator pairs key with the certificate issued for it and the CA.
func NewOperator(key *ecdsa.PrivateKey, certPEM, caPEM []byte) (*Operator, error) {
	ca, err := ParseCertPEM(caPEM)
	if err != nil {
		return nil, err
	}
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, err
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%w: the certificate is not for this key", ErrIdentity)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return &Operator{roots: roots, cert: tls.Certificate{Certificate: [][]byte{cert.Raw}, PrivateKey: key, Leaf: cert}}, nil
}

// TLS is the client TLS for calling host hostID.
func (o *Operator) TLS(hostID string) *tls.Config {
	return ClientTLS(o.roots, func() (*tls.Certificate, error) { return &o.cert, nil }, hostID, "", time.Now)
}
