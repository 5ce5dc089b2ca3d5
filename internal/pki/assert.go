package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"
)

// A host assertion is a short-lived credential a host makes from its
// certificate, for calls that do not run over mutual TLS with the CA (image
// pulls from the registry, renewing the certificate through the control
// plane's API): its certificate, a statement naming what it is for
// (the audience), until when, and optionally a digest of the request it goes
// with, signed by the certificate's key. It proves the holder has the key
// of a certificate of the CA; the checker adds what the catalog says (the
// certificate is the host's current one and the host is not revoked).
//
//	flamehost.<certificate DER>.<statement JSON>.<signature>   (each base64url)
const assertionPrefix = "flamehost."

// Audiences of host assertions.
const (
	AudienceRegistry = "registry"
	AudienceRenew    = "renew"
)

// MaxAssertionTTL bounds how long an assertion may claim to last.
const MaxAssertionTTL = 10 * time.Minute

// maxAssertionLen bounds an assertion read from the network.
const maxAssertionLen = 8 << 10

type assertStatement struct {
	Aud  string `json:"aud"`
	Exp  int64  `json:"exp"`
	Bind string `json:"bind,omitempty"`
	// Nonce makes two assertions of one second differ.
	Nonce string `json:"nonce"`
}

// IsAssertion reports whether tok looks like a host assertion (and not a
// bearer token).
func IsAssertion(tok string) bool { return strings.HasPrefix(tok, assertionPrefix) }

// BindDigest is what an assertion binds a request body by.
func BindDigest(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// SignAssertion makes an assertion for aud from cert, valid for ttl (at
// most MaxAssertionTTL), binding bind when set.
func SignAssertion(cert *tls.Certificate, aud, bind string, now time.Time, ttl time.Duration) (string, error) {
	key, ok := cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || len(cert.Certificate) == 0 {
		return "", errors.New("pki: assertion: not an ECDSA certificate")
	}
	ttl = min(ttl, MaxAssertionTTL)
	var nonce [8]byte
	rand.Read(nonce[:])
	st, _ := json.Marshal(assertStatement{Aud: aud, Exp: now.Add(ttl).Unix(), Bind: bind, Nonce: hex.EncodeToString(nonce[:])})
	enc := base64.RawURLEncoding
	signed := assertionPrefix + enc.EncodeToString(cert.Certificate[0]) + "." + enc.EncodeToString(st)
	d := sha256.Sum256([]byte(signed))
	sig, err := key.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		return "", fmt.Errorf("pki: assertion: %w", err)
	}
	return signed + "." + enc.EncodeToString(sig), nil
}

// VerifyAssertion checks an assertion for aud (and bind, when set) at now:
// a certificate of roots naming a host, valid now, that signed it, not
// expired and not claiming to last past MaxAssertionTTL. It returns the
// certificate and the host it names. Every refusal wraps ErrIdentity.
func VerifyAssertion(roots *x509.CertPool, tok, aud, bind string, now time.Time) (*x509.Certificate, string, error) {
	bad := func(why string) (*x509.Certificate, string, error) {
		return nil, "", fmt.Errorf("%w: host assertion: %s", ErrIdentity, why)
	}
	if len(tok) > maxAssertionLen || !IsAssertion(tok) {
		return bad("malformed")
	}
	parts := strings.Split(tok[len(assertionPrefix):], ".")
	if len(parts) != 3 {
		return bad("malformed")
	}
	enc := base64.RawURLEncoding
	der, err1 := enc.DecodeString(parts[0])
	st, err2 := enc.DecodeString(parts[1])
	sig, err3 := enc.DecodeString(parts[2])
	if err1 != nil || err2 != nil || err3 != nil {
		return bad("malformed")
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return bad("malformed certificate")
	}
	leaf, id, err := Verify(roots, []*x509.Certificate{cert}, RoleHost, x509.ExtKeyUsageAny, now)
	if err != nil {
		return nil, "", err
	}
	pub, ok := leaf.PublicKey.(*ecdsa.PublicKey)
	d := sha256.Sum256([]byte(tok[:len(tok)-len(parts[2])-1]))
	if !ok || !ecdsa.VerifyASN1(pub, d[:], sig) {
		return bad("bad signature")
	}
	var s assertStatement
	if json.Unmarshal(st, &s) != nil {
		return bad("malformed statement")
	}
	switch exp := time.Unix(s.Exp, 0); {
	case s.Aud != aud:
		return bad("for " + clipWord(s.Aud) + ", not " + aud)
	case !now.Before(exp):
		return bad("expired")
	case exp.Sub(now) > MaxAssertionTTL+time.Minute:
		return bad("lasts too long")
	case bind != "" && s.Bind != bind:
		return bad("made for another request")
	}
	return leaf, id, nil
}

func clipWord(s string) string {
	if len(s) > 20 {
		return s[:20]
	}
	return s
}
