package pki

import (
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
)

// MaxRevoked bounds a revocation list taken from the network.
const MaxRevoked = 1 << 16

// Revocations is the set of the CA's certificates that no longer count,
// as a host learns it from the control plane (which pushes the whole list
// over its mutual TLS calls): a revoked host's certificate, and those hosts
// replaced by renewing. Whatever checks a peer's certificate — the
// backhaul's handshakes, signed gossip — asks it. The zero value is empty.
type Revocations struct {
	mu  sync.RWMutex
	m   map[string]api.RevokedSerial
	gen uint64
	on  []func()
}

// Replace makes list the whole set (entries already past their end are
// dropped) and tells the watchers.
func (r *Revocations) Replace(list []api.RevokedSerial, now time.Time) error {
	if len(list) > MaxRevoked {
		return fmt.Errorf("pki: %d revoked serials, at most %d", len(list), MaxRevoked)
	}
	m := make(map[string]api.RevokedSerial, len(list))
	for _, e := range list {
		if len(e.Serial) == 0 || len(e.Serial) > 64 {
			return fmt.Errorf("pki: revoked serial %q", api.Clip(e.Serial, 70))
		}
		if e.ExpiresAt.After(now) {
			m[e.Serial] = e
		}
	}
	r.mu.Lock()
	r.m = m
	r.gen++
	on := r.on
	r.mu.Unlock()
	for _, f := range on {
		f()
	}
	return nil
}

// OnChange calls f after every Replace.
func (r *Revocations) OnChange(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.on = append(r.on, f)
}

// Lookup reports whether serial is listed, and how.
func (r *Revocations) Lookup(serial string) (api.RevokedSerial, bool) {
	if r == nil {
		return api.RevokedSerial{}, false
	}
	r.mu.RLock()
	defer r.mu.RUnlock()
	e, ok := r.m[serial]
	return e, ok
}

// Len is how many serials are listed.
func (r *Revocations) Len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.m)
}

// Check refuses a listed certificate.
func (r *Revocations) Check(c *x509.Certificate) error {
	if e, ok := r.Lookup(Serial(c)); ok {
		if e.Superseded {
			return fmt.Errorf("%w: certificate %s of host %s was replaced", ErrIdentity, e.Serial, e.HostID)
		}
		return fmt.Errorf("%w: certificate %s of host %s is revoked", ErrIdentity, e.Serial, e.HostID)
	}
	return nil
}
