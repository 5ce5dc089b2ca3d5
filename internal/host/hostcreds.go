package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/pki"
)

// An enrolled host's credentials after enrollment: the list of
// certificates it refuses (pushed by the control plane, kept in the
// identity dir across restarts), its certificate renewed before it ends,
// and the assertions it pulls images with.

// revokedFile keeps the last list the control plane pushed.
const revokedFile = "revoked.json"

// maxRevocationsBody bounds a pushed list (MaxRevoked entries of ~150 bytes).
const maxRevocationsBody = 16 << 20

// loadRevocations reads the list kept in the identity dir, if any.
func loadRevocations(dataDir string, rev *pki.Revocations) error {
	b, err := os.ReadFile(filepath.Join(IdentityDir(dataDir), revokedFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var list api.Revocations
	if err := json.Unmarshal(b, &list); err != nil {
		return fmt.Errorf("%s: %w", revokedFile, err)
	}
	return rev.Replace(list.Serials, time.Now())
}

// revocationsHandler is PUT /v1/host/revocations: the control plane (its
// certificate checked by the TLS handshake) gives the whole list.
func (h *Host) revocationsHandler(auth func(*http.Request) (context.Context, error)) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fail := func(status int, msg string) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			json.NewEncoder(w).Encode(api.ErrorBody{Error: msg})
		}
		if h.cfg.Identity == nil {
			fail(http.StatusNotFound, "this host has no control plane")
			return
		}
		if _, err := auth(r); err != nil {
			fail(http.StatusUnauthorized, err.Error())
			return
		}
		var list api.Revocations
		dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxRevocationsBody))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&list); err != nil {
			fail(http.StatusBadRequest, "revocations: "+err.Error())
			return
		}
		if err := h.revoked.Replace(list.Serials, time.Now()); err != nil {
			fail(http.StatusUnprocessableEntity, err.Error())
			return
		}
		if h.Cluster != nil {
			// Gossip refuses revoked hosts too: this list, pushed again
			// and again, reaches a host that missed the revocation's own
			// push. Not certificates a renewal replaced: their host
			// gossips under its new one.
			var revoked []string
			for _, s := range list.Serials {
				if !s.Superseded {
					revoked = append(revoked, s.Serial)
				}
			}
			h.Cluster.Revoke(revoked...)
		}
		dir := IdentityDir(h.cfg.DataDir)
		b, _ := json.Marshal(list)
		if err := os.MkdirAll(dir, 0o700); err == nil {
			if err := atomicfile.Write(filepath.Join(dir, revokedFile), b, dir); err != nil {
				h.log.Warn("revocation list not kept", "err", err)
			}
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// Revoked is the list of certificates this host refuses (empty without a
// control plane).
func (h *Host) Revoked() *pki.Revocations { return h.revoked }

// Renewal retry bounds: a failed renewal is tried again after a tenth of
// what is left of the certificate's life, within these.
const (
	minRenewRetry = time.Second
	maxRenewRetry = 5 * time.Minute
)

// renewLoop renews the host's certificate two thirds into its life (and
// retries until it succeeds or ctx ends).
func (h *Host) renewLoop(ctx context.Context) {
	var last time.Time
	for {
		var wait time.Duration
		if id := h.cfg.Identity.Get(); id != nil {
			wait = time.Until(pki.RenewAt(id.Cert.Leaf))
		} else {
			wait = minRenewRetry // not enrolled yet
		}
		// Never two renewals within minRenewRetry, whatever the
		// certificates say.
		wait = max(wait, minRenewRetry-time.Since(last))
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		id := h.cfg.Identity.Get()
		if id == nil || time.Now().Before(pki.RenewAt(id.Cert.Leaf)) {
			continue
		}
		last = time.Now()
		err := RenewIdentity(ctx, h.cfg.Renew, h.cfg.DataDir, h.cfg.Identity)
		if err == nil {
			h.log.Info("host certificate renewed", "expires", h.cfg.Identity.Get().Cert.Leaf.NotAfter)
			if h.Cluster != nil {
				// Its records travel with the new certificate from now on.
				if err := h.Cluster.SetCertificate(h.cfg.Identity.Get().Cert.Leaf.Raw); err != nil {
					h.log.Error("gossip certificate", "err", err)
				}
			}
			continue
		}
		left := time.Until(id.Cert.Leaf.NotAfter)
		retry := min(max(left/10, minRenewRetry), maxRenewRetry)
		h.log.Warn("renew host certificate", "err", err, "expires", id.Cert.Leaf.NotAfter, "retry_in", retry)
		t := time.NewTimer(retry)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// Renewal is how a host reaches the control plane to renew its
// certificate.
type Renewal struct {
	// PlaneURL gives the control plane's API ("" while there is none);
	// nil: the host never renews (it enrolls again with a join token
	// minted for it).
	PlaneURL   func() string
	HTTPClient *http.Client
}

// RenewIdentity renews the certificate of the identity in slot (kept in
// dataDir's identity dir): a request for the same key, with an assertion
// of the current certificate bound to it; the answer is kept only if it is
// of the same CA, for this host and key.
func RenewIdentity(ctx context.Context, r Renewal, dataDir string, slot *pki.Slot) error {
	id := slot.Get()
	if id == nil {
		return pki.ErrNotEnrolled
	}
	dir := IdentityDir(dataDir)
	key, err := pki.HostKey(dir)
	if err != nil {
		return err
	}
	csr, err := pki.NewCSR(key, pki.RoleHost, id.HostID)
	if err != nil {
		return err
	}
	as, err := pki.SignAssertion(&id.Cert, pki.AudienceRenew, pki.BindDigest(csr), time.Now(), time.Minute)
	if err != nil {
		return err
	}
	url := ""
	if r.PlaneURL != nil {
		url = r.PlaneURL()
	}
	if url == "" {
		return errors.New("renew: no control plane to renew with")
	}
	c := api.NewClient(url, "")
	if r.HTTPClient != nil {
		c.HTTPClient = r.HTTPClient
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	resp, err := c.RenewHost(ctx, api.RenewHostInput{CSR: csr, Assertion: as})
	if err != nil {
		return fmt.Errorf("renew at %s: %w", url, err)
	}
	if _, _, err := pki.CheckHostCert([]byte(resp.CA), []byte(resp.Certificate), pki.Fingerprint(id.CA.Raw), id.HostID, key, time.Now()); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	if err := pki.SaveHostCert(dir, []byte(resp.Certificate)); err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	nid, err := pki.LoadHostIdentity(dir)
	if err != nil {
		return fmt.Errorf("renew: %w", err)
	}
	slot.Set(nid)
	return nil
}

// RegistryCredential makes the token a host pulls images with from its
// identity in slot: an assertion for the registry, made afresh when the
// last one has less than a minute left or the certificate changed ("" when
// the host is not enrolled).
func RegistryCredential(slot *pki.Slot) func() string {
	var (
		mu   sync.Mutex
		tok  string
		of   *pki.HostIdentity
		ends time.Time
	)
	const ttl = 5 * time.Minute
	return func() string {
		id := slot.Get()
		if id == nil {
			return ""
		}
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if tok != "" && of == id && now.Before(ends.Add(-time.Minute)) {
			return tok
		}
		t, err := pki.SignAssertion(&id.Cert, pki.AudienceRegistry, "", now, ttl)
		if err != nil {
			return ""
		}
		tok, of, ends = t, id, now.Add(ttl)
		return tok
	}
}
