package cluster

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/flamehq/flame/internal/pki"
	"github.com/hashicorp/memberlist"
)

// Trust is what makes a member's records its own and lets it check
// everyone else's: the host's enrolled key and certificate, and the CA
// every host's certificate must chain to.
//
// With a Trust, every record this host publishes — each delta of its
// facts, the state each delta leads to, each verdict — carries an ECDSA
// P-256 signature by Key, and a record from another host is used only once
// its signature checks against that host's certificate: one of the CA's,
// naming flame://host/<owner> (so a host speaks only for itself), valid
// now and not revoked. Certificates travel with full facts (anti-entropy
// and gap repair); a record from an owner whose certificate this host does
// not hold yet is set aside and the owner's full facts are pulled, which
// bring it. A verified certificate is kept, so a record costs one
// signature check.
type Trust struct {
	// Key signs this host's records and Cert (DER) is its certificate;
	// both nil on a member that only reads (the control plane's).
	Key  *ecdsa.PrivateKey
	Cert []byte
	// CA is the authority of every host's certificate.
	CA *x509.Certificate
	// Revoked lists serials (pki.Serial) of certificates refused.
	Revoked []string
}

// ErrUntrusted marks a record refused because its signature or its
// issuer's certificate does not check.
var ErrUntrusted = errors.New("untrusted record")

// Signatures are ASN.1 ECDSA P-256 (at most 72 bytes); certificates are
// bounded for the decoder.
const (
	maxSigLen  = 80
	maxCertLen = 4096
)

// kindState is the domain of a state signature: it is never sent, only
// hashed, so a state's signature can be taken for no message.
const kindState byte = 5

// peerCert is a verified certificate of a host.
type peerCert struct {
	der      []byte
	pub      *ecdsa.PublicKey
	serial   string
	notAfter time.Time
}

// trustState is a member's trust: what it signs with, what it checks
// against, and the certificates it verified. Guarded by Cluster.mu.
type trustState struct {
	key     *ecdsa.PrivateKey
	cert    []byte
	roots   *x509.CertPool
	revoked map[string]bool // serials
	banned  map[string]bool // hosts whose certificate was revoked
	certs   map[string]*peerCert
	needs   map[string]bool // owners whose certificate is wanted
}

func newTrustState(t *Trust) (*trustState, error) {
	if t.CA == nil {
		return nil, errors.New("trust: no CA")
	}
	if (t.Key == nil) != (len(t.Cert) == 0) {
		return nil, errors.New("trust: a key needs its certificate")
	}
	ts := &trustState{key: t.Key, cert: slices.Clone(t.Cert), roots: x509.NewCertPool(),
		revoked: map[string]bool{}, banned: map[string]bool{}, certs: map[string]*peerCert{}, needs: map[string]bool{}}
	ts.roots.AddCert(t.CA)
	for _, s := range t.Revoked {
		ts.revoked[s] = true
	}
	return ts, nil
}

// checkCert verifies der as the certificate of host owner at now.
func (ts *trustState) checkCert(der []byte, owner string, now time.Time) (*peerCert, error) {
	if len(der) == 0 {
		return nil, fmt.Errorf("%w: %s sent no certificate", ErrUntrusted, owner)
	}
	if pc := ts.certs[owner]; pc != nil && bytes.Equal(pc.der, der) && now.Before(pc.notAfter) {
		return pc, nil
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate of %s: %v", ErrUntrusted, owner, err)
	}
	leaf, id, err := pki.Verify(ts.roots, []*x509.Certificate{cert}, pki.RoleHost, x509.ExtKeyUsageServerAuth, now)
	if err != nil {
		return nil, fmt.Errorf("%w: certificate of %s: %v", ErrUntrusted, owner, err)
	}
	if id != owner {
		return nil, fmt.Errorf("%w: a certificate of %s offered for %s", ErrUntrusted, id, owner)
	}
	serial := pki.Serial(leaf)
	if ts.revoked[serial] {
		ts.banned[owner] = true
		return nil, fmt.Errorf("%w: certificate %s of %s is revoked", ErrUntrusted, serial, owner)
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: certificate of %s holds no ECDSA key", ErrUntrusted, owner)
	}
	return &peerCert{der: slices.Clone(der), pub: pub, serial: serial, notAfter: leaf.NotAfter}, nil
}

// signed appends to msg its signature by key: a length-prefixed ASN.1
// ECDSA signature of the SHA-256 of msg.
func signed(key *ecdsa.PrivateKey, msg []byte) []byte {
	w := writer{b: msg}
	w.bytes(sign(key, msg))
	return w.b
}

func sign(key *ecdsa.PrivateKey, msg []byte) []byte {
	if key == nil {
		return nil
	}
	h := sha256.Sum256(msg)
	sig, err := ecdsa.SignASN1(rand.Reader, key, h[:])
	if err != nil {
		panic(fmt.Sprintf("cluster: sign: %v", err)) // only a broken random source fails
	}
	return sig
}

func verify(pub *ecdsa.PublicKey, msg, sig []byte) bool {
	if len(sig) == 0 {
		return false
	}
	h := sha256.Sum256(msg)
	return ecdsa.VerifyASN1(pub, h[:], sig)
}

// stateHash is what a state signature signs: an owner's complete facts at
// a version, machines (their wire form) sorted by id.
func stateHash(owner string, version uint64, free Resources, load float64, machines [][]byte) []byte {
	var w writer
	w.header(kindState)
	w.string(owner)
	w.uint(version)
	w.resources(free)
	w.float(load)
	w.int(len(machines))
	h := sha256.New()
	h.Write(w.b)
	for _, m := range machines {
		h.Write(m)
	}
	return h.Sum(nil)
}

// fullStateHash is stateHash of full facts (machines sorted by id).
func fullStateHash(f *fullFacts) []byte {
	ms := make([][]byte, len(f.Machines))
	for i := range f.Machines {
		m := f.Machines[i]
		m.Host = ""
		ms[i] = encodeMachine(&m)
	}
	return stateHash(f.Owner, f.Version, f.Free, f.Load, ms)
}

func signState(key *ecdsa.PrivateKey, h []byte) []byte {
	if key == nil {
		return nil
	}
	sig, err := ecdsa.SignASN1(rand.Reader, key, h)
	if err != nil {
		panic(fmt.Sprintf("cluster: sign: %v", err))
	}
	return sig
}

func verifyState(pub *ecdsa.PublicKey, h, sig []byte) bool {
	return len(sig) > 0 && ecdsa.VerifyASN1(pub, h, sig)
}

// SetTrust gives the member its trust (a host enrolled after its member
// started): from then on it signs what it publishes and checks what it
// receives. Facts of other hosts held from before, unchecked, are dropped
// and fetched again, with their certificates, from a host that is up.
func (c *Cluster) SetTrust(t Trust) error {
	ts, err := newTrustState(&t)
	if err != nil {
		return err
	}
	if ts.key != nil {
		if _, err := ts.checkCert(ts.cert, c.cfg.HostID, c.cfg.Now()); err != nil {
			return fmt.Errorf("trust: this host's own certificate: %w", err)
		}
	}
	c.mu.Lock()
	c.trust = ts
	for id := range c.store.owners {
		if id != c.cfg.HostID {
			c.store.remove(id)
			c.changedLocked(id)
		}
	}
	// Republish this host's facts, signed, from nothing.
	var ds []*delta
	if c.pub.version > 0 {
		ds = c.republishLocked()
	}
	for id, m := range c.members {
		if id != c.cfg.HostID && m.status == StatusAlive && len(c.comeUp) < 64 {
			c.comeUp = append(c.comeUp, id)
		}
	}
	c.mu.Unlock()
	c.spread(ds)
	return nil
}

// Revoke refuses, from now on, the certificates with these serials and
// every record of the hosts they name; the facts held of such a host are
// dropped.
func (c *Cluster) Revoke(serials ...string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.trust == nil {
		return
	}
	for _, s := range serials {
		c.trust.revoked[s] = true
	}
	for id, pc := range c.trust.certs {
		if c.trust.revoked[pc.serial] {
			c.log.Warn("host's certificate revoked; dropping its facts", "id", id, "serial", pc.serial)
			delete(c.trust.certs, id)
			c.trust.banned[id] = true
			c.store.remove(id)
			if m := c.members[id]; m != nil {
				clear(m.accusers)
			}
			c.changedLocked(id)
		}
	}
}

// Trusted reports whether the member checks records (it has a Trust).
func (c *Cluster) Trusted() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.trust != nil
}

// issuerLocked returns the key that must have signed a record of owner,
// or why there is none; an owner whose certificate is not held yet is
// noted (nil, nil), for maintain to pull its full facts. c.mu is held.
func (c *Cluster) issuerLocked(owner string) (*ecdsa.PublicKey, error) {
	ts := c.trust
	if ts.banned[owner] {
		return nil, fmt.Errorf("%w: %s's certificate is revoked", ErrUntrusted, owner)
	}
	if owner == c.cfg.HostID && ts.key != nil {
		return &ts.key.PublicKey, nil
	}
	if pc := ts.certs[owner]; pc != nil {
		if c.cfg.Now().Before(pc.notAfter) {
			return pc.pub, nil
		}
		delete(ts.certs, owner)
	}
	if len(ts.needs) < 256 {
		ts.needs[owner] = true
	}
	return nil, nil
}

// keyring is the memberlist keyring both memberlists share. It starts empty
// (gossip in clear) unless Config.GossipKeys are given, and keys can be
// installed while running.
func newKeyring(keys [][]byte) (*memberlist.Keyring, error) {
	if len(keys) == 0 {
		return memberlist.NewKeyring(nil, nil)
	}
	for _, k := range keys {
		if err := memberlist.ValidateKey(k); err != nil {
			return nil, fmt.Errorf("gossip key: %w", err)
		}
	}
	return memberlist.NewKeyring(keys[1:], keys[0])
}

// SetGossipKeys makes keys the member's keyring: every key decrypts, the
// first encrypts. A member with no key gossips in clear; once it has one
// it refuses anything not encrypted with a key it holds. Rotating without a
// partition takes three rounds over every host: the new key added (second),
// then made first, then the old one dropped.
func (c *Cluster) SetGossipKeys(keys [][]byte) error {
	if len(keys) == 0 {
		return errors.New("gossip keys: none given")
	}
	for _, k := range keys {
		if err := memberlist.ValidateKey(k); err != nil {
			return fmt.Errorf("gossip key: %w", err)
		}
	}
	kr := c.keyring
	for _, k := range keys {
		if err := kr.AddKey(k); err != nil {
			return err
		}
	}
	if err := kr.UseKey(keys[0]); err != nil {
		return err
	}
	for _, k := range kr.GetKeys() {
		if !slices.ContainsFunc(keys, func(x []byte) bool { return bytes.Equal(x, k) }) {
			if err := kr.RemoveKey(k); err != nil {
				return err
			}
		}
	}
	return nil
}

// Encrypted reports whether the member's gossip is encrypted.
func (c *Cluster) Encrypted() bool { return len(c.keyring.GetKeys()) > 0 }

// signingKeyLocked is the key this host signs its records with, nil
// without one; c.mu is held.
func (c *Cluster) signingKeyLocked() *ecdsa.PrivateKey {
	if c.trust == nil {
		return nil
	}
	return c.trust.key
}

// checkDelta reports whether d may be used: always without a trust; with
// one, when it is stale (the store drops it unread) or its owner signed
// it. A delta of an owner whose certificate is not held yet is set aside,
// and the owner's full facts are pulled (certPullsLocked).
func (c *Cluster) checkDelta(d *delta) bool {
	c.mu.Lock()
	if c.trust == nil {
		c.mu.Unlock()
		return true
	}
	if c.store.stale(d) {
		c.mu.Unlock()
		return true
	}
	pub, err := c.issuerLocked(d.Owner)
	c.mu.Unlock()
	switch {
	case err != nil:
		c.drop("delta of a revoked host", err)
		return false
	case pub == nil:
		c.stats.unverified.Add(1)
		return false
	case !verify(pub, d.signed, d.Sig):
		c.drop("delta with a bad signature", fmt.Errorf("%w: delta of %s", ErrUntrusted, d.Owner))
		return false
	}
	return true
}

// checkFull reports whether full facts may be used, and the certificate
// they came with once verified (nil when there was nothing to verify).
func (c *Cluster) checkFull(f *fullFacts, now time.Time) (*peerCert, bool) {
	c.mu.Lock()
	if c.trust == nil {
		c.mu.Unlock()
		return nil, true
	}
	if o := c.store.get(f.Owner); o != nil && f.Version <= o.version {
		c.mu.Unlock()
		return nil, true // stale: the store drops it unread
	}
	if c.trust.banned[f.Owner] {
		c.mu.Unlock()
		c.drop("full facts of a revoked host", fmt.Errorf("%w: %s's certificate is revoked", ErrUntrusted, f.Owner))
		return nil, false
	}
	pc, err := c.trust.checkCert(f.Cert, f.Owner, now)
	c.mu.Unlock()
	if err != nil {
		c.drop("full facts with a certificate refused", err)
		return nil, false
	}
	if !verifyState(pc.pub, fullStateHash(f), f.StateSig) {
		c.drop("full facts with a bad signature", fmt.Errorf("%w: full facts of %s", ErrUntrusted, f.Owner))
		return nil, false
	}
	return pc, true
}

// checkVerdict reports whether a verdict of another host may be used: with
// a trust, only one its issuer, an enrolled host, signed.
func (c *Cluster) checkVerdict(v *verdict) bool {
	c.mu.Lock()
	if c.trust == nil {
		c.mu.Unlock()
		return true
	}
	pub, err := c.issuerLocked(v.From)
	c.mu.Unlock()
	switch {
	case err != nil:
		c.drop("verdict of a revoked host", err)
		return false
	case pub == nil:
		c.stats.unverified.Add(1)
		return false
	case !verify(pub, v.signed, v.Sig):
		c.drop("verdict with a bad signature", fmt.Errorf("%w: verdict of %s about %s", ErrUntrusted, v.From, v.Host))
		return false
	}
	return true
}

// fullLocked is an owner's full facts to send, with its certificate and
// state signature; with a trust, nil when this host holds neither (no
// other host could check them). c.mu is held.
func (c *Cluster) fullLocked(id string) *fullFacts {
	f := c.store.full(id)
	if f == nil || c.trust == nil {
		return f
	}
	switch {
	case id == c.cfg.HostID && c.trust.key != nil:
		f.Cert = c.trust.cert
	case c.trust.certs[id] != nil:
		f.Cert = c.trust.certs[id].der
	}
	if len(f.Cert) == 0 || len(f.StateSig) == 0 {
		return nil
	}
	return f
}

// maxCertPulls bounds the owners whose full facts one maintain round asks
// for to get their certificates.
const maxCertPulls = 16

// certPullsLocked asks for the full facts, with certificates, of owners
// whose records arrived before their certificate: from the owner itself,
// or from any live host when it is not up. c.mu is held.
func (c *Cluster) certPullsLocked(now time.Time) []pull {
	if c.trust == nil || len(c.trust.needs) == 0 {
		return nil
	}
	var out []pull
	for id := range c.trust.needs {
		if len(out) >= maxCertPulls {
			break
		}
		delete(c.trust.needs, id)
		if c.trust.certs[id] != nil || c.trust.banned[id] || now.Sub(c.lastPull[id]) < 2*c.cfg.GapWait {
			continue
		}
		// Only members: an owner made up has no certificate to fetch.
		target := c.members[id]
		if target == nil {
			continue
		}
		if target.status != StatusAlive {
			target = c.randomAliveLocked()
		}
		if target == nil || target.node.Addr == nil {
			continue
		}
		c.lastPull[id] = now
		msg := encodeDigest(&digest{From: c.cfg.HostID, Entries: []digestEntry{{Owner: id, Version: 0}}})
		out = append(out, pull{node: target.node, msg: msg})
	}
	return out
}

// SetCertificate replaces this host's certificate (a renewal, for the same
// key): the full facts it sends carry the new one from now on.
func (c *Cluster) SetCertificate(der []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.trust == nil || c.trust.key == nil {
		return errors.New("trust: this member signs nothing")
	}
	pc, err := c.trust.checkCert(der, c.cfg.HostID, c.cfg.Now())
	if err != nil {
		return fmt.Errorf("trust: the new certificate: %w", err)
	}
	if !pc.pub.Equal(&c.trust.key.PublicKey) {
		return errors.New("trust: the new certificate is for another key")
	}
	c.trust.cert = slices.Clone(der)
	return nil
}
