package server

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/pki"
)

// Hosts' credentials beyond enrollment: a host renews its certificate with
// the one it has; the plane pushes the list of certificates every host
// must refuse (revoked hosts', and those replaced by renewing) to every
// enrolled host over its mutual TLS calls; and a host pulls images with
// assertions made from its certificate, reaching the public namespace and
// the repositories of the orgs with a machine on it.

// supersededCert is a host certificate its host replaced by renewing: it
// still verifies until it ends, so hosts are told to refuse it.
type supersededCert struct {
	Serial  string    `json:"serial"`
	Expires time.Time `json:"expires"`
}

// maxSuperseded bounds what a host record keeps (renewals are months
// apart; a host renewing in a loop loses the oldest).
const maxSuperseded = 16

// RevocationPushInterval is how often the plane gives every host the
// list again (besides at once after a revocation, a renewal or an
// enrollment), so a host that restarted or missed one catches up.
var RevocationPushInterval = 30 * time.Second

// hostCertValidity is how long host certificates last.
func (s *Server) hostCertValidity() time.Duration {
	if s.cfg.HostCertValidity > 0 {
		return s.cfg.HostCertValidity
	}
	return pki.HostValidity
}

// renew is POST /v1/hosts/renew. It takes no API token: the assertion,
// signed with the key of the host's current certificate and bound to the
// request, is the credential. A revoked host, a certificate the catalog
// no longer records as the host's, and an expired one are refused alike.
func (s *Server) renew(w http.ResponseWriter, r *http.Request) {
	r.Body = http.MaxBytesReader(w, r.Body, maxEnrollBody)
	out, err := s.renewHost(r.Context(), r)
	if err != nil {
		var ae *api.Error
		if !errors.As(err, &ae) {
			s.log.Error("renew host", "err", err)
			ae = api.Errorf(http.StatusServiceUnavailable, "renewal failed, try again")
		}
		httpapi.WriteJSON(w, ae.Status, api.ErrorBody{Error: ae.Message})
		return
	}
	httpapi.WriteJSON(w, http.StatusOK, out)
}

var errRenew = api.Errorf(http.StatusUnauthorized, "invalid assertion, or a certificate that is not the host's current one")

func (s *Server) renewHost(ctx context.Context, r *http.Request) (*api.RenewHostResponse, error) {
	var in api.RenewHostInput
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return nil, err
	}
	pub, err := pki.CheckCSR(in.CSR)
	if err != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "csr: %v", err)
	}
	leaf, hostID, err := pki.VerifyAssertion(s.ident.roots, in.Assertion, pki.AudienceRenew, pki.BindDigest(in.CSR), time.Now())
	if err != nil {
		s.log.Warn("host renewal refused", "err", err)
		return nil, errRenew
	}
	cert, err := s.ident.ca.Issue(pki.RoleHost, hostID, pub, time.Now(), s.hostCertValidity())
	if err != nil {
		return nil, err
	}
	now := s.cfg.Now().UTC()
	old := pki.Serial(leaf)
	if _, _, err := catalog.UpdateJSON(ctx, s.ident.hosts, hostID, func(h *hostRecord, exists bool) error {
		switch {
		case !exists || h.Serial != old:
			return errRenew
		case h.Revoked:
			return api.Errorf(http.StatusForbidden, "host %s is revoked", hostID)
		}
		h.Superseded = append(h.Superseded, supersededCert{Serial: old, Expires: h.Expires})
		h.Superseded = slices.DeleteFunc(h.Superseded, func(c supersededCert) bool { return !c.Expires.After(now) })
		if n := len(h.Superseded); n > maxSuperseded {
			h.Superseded = h.Superseded[n-maxSuperseded:]
		}
		h.Serial, h.Expires = pki.Serial(cert), cert.NotAfter.UTC()
		return nil
	}); err != nil {
		return nil, err
	}
	s.dropHostConn(hostID)
	s.kickRevocations()
	s.log.Info("host certificate renewed", "host", hostID, "expires", cert.NotAfter.UTC())
	return &api.RenewHostResponse{Certificate: string(pki.CertPEM(cert.Raw)), CA: string(s.ident.ca.CertPEM())}, nil
}

// revocationList is what every host must refuse, from the catalog's host
// records: revoked hosts' certificates and superseded ones, until each
// ends.
func (s *Server) revocationList(ctx context.Context) (api.Revocations, []hostRecord, error) {
	es, err := s.ident.hosts.List(ctx, "")
	if err != nil {
		return api.Revocations{}, nil, err
	}
	now := time.Now()
	out := api.Revocations{Serials: []api.RevokedSerial{}}
	var live []hostRecord
	for _, e := range es {
		var h hostRecord
		if decodeJSON(e.Value, &h) != nil {
			continue
		}
		if h.Revoked {
			if h.Expires.After(now) {
				out.Serials = append(out.Serials, api.RevokedSerial{Serial: h.Serial, HostID: h.ID, ExpiresAt: h.Expires})
			}
			continue
		}
		live = append(live, h)
		for _, c := range h.Superseded {
			if c.Expires.After(now) {
				out.Serials = append(out.Serials, api.RevokedSerial{Serial: c.Serial, HostID: h.ID, ExpiresAt: c.Expires, Superseded: true})
			}
		}
	}
	slices.SortFunc(out.Serials, func(a, b api.RevokedSerial) int { return cmpStrings(a.Serial, b.Serial) })
	return out, live, nil
}

// kickRevocations has the list pushed to every host soon.
func (s *Server) kickRevocations() {
	select {
	case s.ident.revKick <- struct{}{}:
	default:
	}
}

// pushRevocations gives every enrolled host the list, whenever it changes
// and every RevocationPushInterval, until ctx ends.
func (s *Server) pushRevocations(ctx context.Context) {
	t := time.NewTicker(RevocationPushInterval)
	defer t.Stop()
	sent := map[string][32]byte{} // host id → digest of the list it took
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			clear(sent) // again, in case a host restarted meanwhile
		case <-s.ident.revKick:
		}
		list, hosts, err := s.revocationList(ctx)
		if err != nil {
			s.log.Debug("revocation list", "err", err)
			continue
		}
		b, _ := json.Marshal(list)
		sum := sha256.Sum256(b)
		var wg sync.WaitGroup
		var mu sync.Mutex
		for _, h := range hosts {
			if sent[h.ID] == sum {
				continue
			}
			wg.Go(func() {
				if err := s.pushTo(ctx, h.ID, list); err != nil {
					s.log.Debug("push revocations", "host", h.ID, "err", err)
					return
				}
				mu.Lock()
				sent[h.ID] = sum
				mu.Unlock()
			})
		}
		wg.Wait()
	}
}

func (s *Server) pushTo(ctx context.Context, hostID string, list api.Revocations) error {
	c, err := s.enrolledClient(hostID)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return c.PutRevocations(ctx, list)
}

// hostRegistryScope is what a host's assertion reaches in the registry:
// pulls only, of the public namespace and of the orgs that have a machine
// on the host (the catalog's machine entries, written before a host is
// asked to create one), while the certificate is the one the catalog
// records for the host and the host is not revoked.
func (s *Server) hostRegistryScope(ctx context.Context, raw string) (registry.Scope, error) {
	leaf, hostID, err := pki.VerifyAssertion(s.ident.roots, raw, pki.AudienceRegistry, "", time.Now())
	if err != nil {
		return registry.Scope{}, fmt.Errorf("%w: %v", registry.ErrUnauthorized, err)
	}
	rec, ok, err := s.hostRecordOf(ctx, hostID)
	if ok && err == nil && rec.Serial != pki.Serial(leaf) {
		// The cache may not have the renewal of a moment ago yet.
		rec, _, err = catalog.GetJSON[hostRecord](ctx, s.ident.hosts, hostID)
		if errors.Is(err, catalog.ErrNotFound) {
			ok, err = false, nil
		}
	}
	switch {
	case err != nil:
		return registry.Scope{}, err
	case !ok || rec.Revoked || rec.Serial != pki.Serial(leaf):
		return registry.Scope{}, fmt.Errorf("%w: host %s is not enrolled with this certificate, or is revoked", registry.ErrUnauthorized, hostID)
	}
	return registry.Scope{ReadOnly: true, Orgs: func(org string) bool { return s.orgOnHost(hostID, org) }}, nil
}

// hostOrgs remembers, per host, the orgs with a machine on it, as read
// at some time.
type hostOrgs struct {
	mu sync.Mutex
	m  map[string]orgsRead
}

type orgsRead struct {
	orgs map[string]bool
	at   time.Time
}

// hostOrgsTTL is how long a host keeps pulling an org's images after its
// last machine of that org went (the set is read again then).
const hostOrgsTTL = time.Minute

// orgOnHost reports whether org has a machine entry on host: from what was
// read in the last minute, else from the catalog (a machine placed a
// moment ago).
func (s *Server) orgOnHost(host, org string) bool {
	ho := &s.ident.orgs
	ho.mu.Lock()
	r := ho.m[host]
	ho.mu.Unlock()
	if r.orgs[org] && time.Since(r.at) < hostOrgsTTL {
		return true
	}
	ctx, cancel := context.WithTimeout(s.ctx, 5*time.Second)
	defer cancel()
	es, err := s.machines.List(ctx, "")
	if err != nil {
		return false
	}
	orgs := map[string]bool{}
	for _, e := range es {
		var me machineEntry
		if decodeJSON(e.Value, &me) == nil && me.Host == host {
			orgs[me.Org] = true
		}
	}
	ho.mu.Lock()
	if ho.m == nil {
		ho.m = map[string]orgsRead{}
	}
	ho.m[host] = orgsRead{orgs: orgs, at: time.Now()}
	ho.mu.Unlock()
	return orgs[org]
}
