package pki

import (
	"crypto/tls"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

func hostCert(t *testing.T, ca *CA, role, id string, now time.Time, d time.Duration) *tls.Certificate {
	t.Helper()
	key, err := NewKey()
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.Issue(role, id, &key.PublicKey, now, d)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{c.Raw}, PrivateKey: key, Leaf: c}
}

// TestAssertions: an assertion verifies for its audience and request only,
// before it expires, from a host certificate of the CA; anything changed in
// it, or made by a control plane's certificate or another CA's, is refused.
func TestAssertions(t *testing.T) {
	now := time.Now()
	ca, _ := NewCA("test", now)
	other, _ := NewCA("other", now)
	h := hostCert(t, ca, RoleHost, "ams-1", now, time.Hour)
	tok, err := SignAssertion(h, AudienceRenew, BindDigest([]byte("csr")), now, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, id, err := VerifyAssertion(ca.Pool(), tok, AudienceRenew, BindDigest([]byte("csr")), now); err != nil || id != "ams-1" {
		t.Fatalf("verify: %q %v", id, err)
	}
	i := strings.LastIndexByte(tok, '.')
	flipped := tok[:i-3] + string('A'+(tok[i-3]-'A'+1)%26) + tok[i-2:]
	for name, c := range map[string]struct {
		tok, aud, bind string
		at             time.Time
	}{
		"another audience":   {tok, AudienceRegistry, "", now},
		"another request":    {tok, AudienceRenew, BindDigest([]byte("other csr")), now},
		"expired":            {tok, AudienceRenew, "", now.Add(2 * time.Minute)},
		"statement changed":  {flipped, AudienceRenew, "", now},
		"a bearer token":     {"flame_abc", AudienceRenew, "", now},
		"signature cut":      {tok[:i], AudienceRenew, "", now},
		"certificate ended":  {tok, AudienceRenew, "", now.Add(2 * time.Hour)},
		"an oversized token": {tok + strings.Repeat("A", 9000), AudienceRenew, "", now},
	} {
		if _, _, err := VerifyAssertion(ca.Pool(), c.tok, c.aud, c.bind, c.at); !errors.Is(err, ErrIdentity) {
			t.Errorf("%s: %v, want ErrIdentity", name, err)
		}
	}
	for name, cert := range map[string]*tls.Certificate{
		"another CA's host": hostCert(t, other, RoleHost, "ams-1", now, time.Hour),
		"a control plane":   hostCert(t, ca, RoleControl, "plane", now, time.Hour),
	} {
		tok, err := SignAssertion(cert, AudienceRegistry, "", now, time.Minute)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := VerifyAssertion(ca.Pool(), tok, AudienceRegistry, "", now); !errors.Is(err, ErrIdentity) {
			t.Errorf("%s: %v, want ErrIdentity", name, err)
		}
	}
	long, _ := SignAssertion(h, AudienceRegistry, "", now, time.Hour)
	if _, _, err := VerifyAssertion(ca.Pool(), long, AudienceRegistry, "", now.Add(MaxAssertionTTL+time.Second)); !errors.Is(err, ErrIdentity) {
		t.Errorf("an assertion asked for an hour outlived MaxAssertionTTL: %v", err)
	}
}

// TestRevocations: a listed serial is refused until its certificate would
// end; a new list replaces the old whole; watchers hear of each.
func TestRevocations(t *testing.T) {
	now := time.Now()
	ca, _ := NewCA("test", now)
	a, b := hostCert(t, ca, RoleHost, "a", now, time.Hour), hostCert(t, ca, RoleHost, "b", now, time.Hour)
	var r Revocations
	heard := 0
	r.OnChange(func() { heard++ })
	if err := r.Check(a.Leaf); err != nil {
		t.Fatal(err)
	}
	if err := r.Replace([]api.RevokedSerial{
		{Serial: Serial(a.Leaf), HostID: "a", ExpiresAt: now.Add(time.Hour)},
		{Serial: "ffff", HostID: "c", ExpiresAt: now.Add(-time.Second)}, // ended: dropped
	}, now); err != nil {
		t.Fatal(err)
	}
	if err := r.Check(a.Leaf); !errors.Is(err, ErrIdentity) {
		t.Errorf("a revoked certificate: %v", err)
	}
	if err := r.Check(b.Leaf); err != nil || r.Len() != 1 {
		t.Errorf("another certificate: %v (%d listed)", err, r.Len())
	}
	if err := r.Replace(nil, now); err != nil || r.Check(a.Leaf) != nil || heard != 2 {
		t.Errorf("after an empty list: %v, heard %d", r.Check(a.Leaf), heard)
	}
	if err := r.Replace([]api.RevokedSerial{{Serial: strings.Repeat("a", 65)}}, now); err == nil {
		t.Error("an oversized serial was taken")
	}
}

// TestRenewAt: a certificate is renewed two thirds into its life, also a
// short one (its backdating is a tenth of it, at most a minute).
func TestRenewAt(t *testing.T) {
	now := time.Now()
	ca, _ := NewCA("test", now)
	for _, d := range []time.Duration{3 * time.Second, time.Hour, HostValidity} {
		c := hostCert(t, ca, RoleHost, "a", now, d)
		at := RenewAt(c.Leaf)
		if !at.After(now) || !at.Before(c.Leaf.NotAfter) {
			t.Errorf("%v: renew at %v, issued %v, ends %v", d, at, now, c.Leaf.NotAfter)
		}
	}
}
