package server

import (
	"cmp"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/httpapi"
)

// An app's custom hostnames (/v1/apps/{app}/certificates, Fly's shapes).
// A hostname belongs to one app platform-wide: the claim is one key of the
// hostnames bucket, taken by compare-and-swap, and a hostname another live
// app holds is refused with 409. The edges follow the claims: they route a
// claimed hostname to its app and obtain its certificate by ACME on its
// first TLS handshake, keeping it in the catalog (package certstore),
// where this API reads it back to report the status.

// errHostnameTaken refuses a hostname another app holds.
func errHostnameTaken(h string) error {
	return api.Errorf(http.StatusConflict, "hostname %s already belongs to another app (a hostname belongs to one app platform-wide)", h)
}

// checkHostname validates a hostname an app asks for: a DNS name, and
// under the edge's own domain only the app's own <app>.<domain>.
func (s *Server) checkHostname(a app, h string) error {
	if err := certstore.ValidHostname(h); err != nil {
		return api.Errorf(http.StatusUnprocessableEntity, "hostname: %v", err)
	}
	if d := s.cfg.EdgeDomain; d != "" && (h == d || strings.HasSuffix(h, "."+d)) && h != a.Name+"."+d {
		return api.Errorf(http.StatusUnprocessableEntity, "hostname: %s is under the platform's domain %s; an app may add only its own %s.%s", h, d, a.Name, d)
	}
	return nil
}

// claimHostname claims h for a (a claim of a deleted app is taken over;
// the app's own claim is kept as it is).
func (s *Server) claimHostname(ctx context.Context, a app, h string) (certstore.Claim, error) {
	held, err := s.appClaims(ctx, a)
	if err != nil {
		return certstore.Claim{}, err
	}
	if len(held) >= api.MaxCertificatesPerApp && !slices.ContainsFunc(held, func(c certstore.Claim) bool { return c.Hostname == h }) {
		return certstore.Claim{}, api.Errorf(http.StatusUnprocessableEntity, "hostname: an app may have at most %d", api.MaxCertificatesPerApp)
	}
	c, _, err := catalog.UpdateJSON(ctx, s.hostnames, h, func(v *certstore.Claim, exists bool) error {
		if exists && v.AppID == a.ID {
			return errNoChange
		}
		if exists {
			if live, err := s.liveClaim(ctx, v.App, v.AppID); err != nil || live {
				return cmp.Or(err, errHostnameTaken(h))
			}
		}
		*v = certstore.Claim{Hostname: h, App: a.Name, AppID: a.ID, CreatedAt: s.cfg.Now().UTC()}
		return nil
	})
	if errors.Is(err, errNoChange) {
		c, _, err = catalog.GetJSON[certstore.Claim](ctx, s.hostnames, h)
	}
	if err == nil {
		s.log.Info("hostname claimed", "app", a.Name, "hostname", h)
	}
	return c, err
}

// appClaims returns the claims of app a, by hostname.
func (s *Server) appClaims(ctx context.Context, a app) ([]certstore.Claim, error) {
	es, err := s.hostnames.List(ctx, "")
	if err != nil {
		return nil, fmt.Errorf("list hostname claims: %w", err)
	}
	var out []certstore.Claim
	for _, e := range es {
		var c certstore.Claim
		if json.Unmarshal(e.Value, &c) == nil && c.AppID == a.ID {
			out = append(out, c)
		}
	}
	return out, nil
}

// releaseHostnames gives back a's claims (all of them when h is "") and
// deletes what the edges stored for them, so no edge serves them again.
func (s *Server) releaseHostnames(ctx context.Context, a app, h string) (bool, error) {
	cs, err := s.appClaims(ctx, a)
	if err != nil {
		return false, err
	}
	found := false
	for _, c := range cs {
		if h != "" && c.Hostname != h {
			continue
		}
		found = true
		_, _, err := catalog.UpdateJSON(ctx, s.hostnames, c.Hostname, func(v *certstore.Claim, exists bool) error {
			if !exists || v.AppID != a.ID {
				return errNoChange
			}
			return catalog.ErrDelete
		})
		if err != nil && !errors.Is(err, errNoChange) {
			return found, fmt.Errorf("release hostname %s: %w", c.Hostname, err)
		}
		for _, cert := range s.storedCerts(ctx, c.Hostname) {
			if err := s.certStore.Delete(ctx, cert.dir); err != nil {
				return found, err
			}
		}
		s.log.Info("hostname released", "app", a.Name, "hostname", c.Hostname)
	}
	return found, nil
}

// storedCert is a certificate an edge keeps in the catalog for a hostname.
type storedCert struct {
	dir    string // its certmagic directory: certificates/<issuer>/<hostname>
	leaf   *x509.Certificate
	issuer string
}

// storedCerts reads the certificates the edges obtained for h.
func (s *Server) storedCerts(ctx context.Context, h string) []storedCert {
	issuers, err := s.certStore.List(ctx, "certificates", false)
	if err != nil {
		return nil
	}
	var out []storedCert
	for _, iss := range issuers {
		dir := iss + "/" + h
		b, err := s.certStore.Load(ctx, dir+"/"+h+".crt")
		if err != nil {
			continue
		}
		blk, _ := pem.Decode(b)
		if blk == nil {
			continue
		}
		leaf, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			continue
		}
		out = append(out, storedCert{dir: dir, leaf: leaf, issuer: strings.TrimPrefix(iss, "certificates/")})
	}
	return out
}

// certificateView is a claim with what the edges hold for it.
func (s *Server) certificateView(ctx context.Context, c certstore.Claim) api.CertificateDetailResponse {
	now := s.cfg.Now()
	out := api.CertificateDetailResponse{Hostname: c.Hostname, AcmeRequested: true, Status: api.CertificateAwaiting,
		Certificates: []api.CertificateDetail{},
		Validation:   api.CertificateValidation{ALPNConfigured: true, HTTPConfigured: true},
		DNSRequirements: api.DNSRequirements{A: []string{}, AAAA: []string{},
			ACMEChallenge: api.ACMEChallengeRequirement{Name: "_acme-challenge." + c.Hostname}}}
	for _, sc := range s.storedCerts(ctx, c.Hostname) {
		created, expires := sc.leaf.NotBefore, sc.leaf.NotAfter
		status := "active"
		if now.After(expires) {
			status = "expired"
		} else {
			out.Configured, out.Status = true, api.CertificateReady
		}
		typ := "rsa"
		if _, ok := sc.leaf.PublicKey.(*ecdsa.PublicKey); ok {
			typ = "ecdsa"
		}
		out.Certificates = append(out.Certificates, api.CertificateDetail{Source: "fly", Status: status,
			CreatedAt: &created, ExpiresAt: &expires, Issuer: sc.leaf.Issuer.CommonName,
			Issued: []api.IssuedCertInfo{{Type: typ, ExpiresAt: expires}}})
	}
	for _, edge := range s.cfg.Edges {
		host, _, err := net.SplitHostPort(edge)
		ip := net.ParseIP(host)
		switch {
		case err != nil || ip == nil || ip.IsLoopback() || ip.IsUnspecified():
		case ip.To4() != nil:
			out.DNSRequirements.A = append(out.DNSRequirements.A, ip.String())
		default:
			out.DNSRequirements.AAAA = append(out.DNSRequirements.AAAA, ip.String())
		}
	}
	slices.Sort(out.DNSRequirements.A)
	slices.Sort(out.DNSRequirements.AAAA)
	return out
}

func summaryOf(c certstore.Claim, d api.CertificateDetailResponse) api.CertificateSummary {
	return api.CertificateSummary{Hostname: c.Hostname, Status: d.Status, Configured: d.Configured,
		AcmeALPNConfigured: true, AcmeHTTPConfigured: true, AcmeRequested: true,
		HasFlyCertificate: len(d.Certificates) > 0, CreatedAt: c.CreatedAt, UpdatedAt: c.CreatedAt}
}

// createCertificate is POST /v1/apps/{app}/certificates (and /acme)
// {hostname}: 201 with the hostname claimed, 200 when it was already the
// app's, 409 when another app holds it.
func (s *Server) createCertificate(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	var in api.CreateCertificateRequest
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	h := strings.TrimSuffix(in.Hostname, ".")
	if err := s.checkHostname(a, h); err != nil {
		return err
	}
	before, _, err := catalog.GetJSON[certstore.Claim](r.Context(), s.hostnames, h)
	had := err == nil && before.AppID == a.ID
	c, err := s.claimHostname(r.Context(), a, h)
	if err != nil {
		return err
	}
	status := http.StatusCreated
	if had {
		status = http.StatusOK
	}
	httpapi.WriteJSON(w, status, s.certificateView(r.Context(), c))
	return nil
}

// listCertificates is GET /v1/apps/{app}/certificates.
func (s *Server) listCertificates(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	cs, err := s.appClaims(r.Context(), a)
	if err != nil {
		return err
	}
	out := api.ListCertificatesResponse{Certificates: []api.CertificateSummary{}, TotalCount: len(cs)}
	for _, c := range cs {
		out.Certificates = append(out.Certificates, summaryOf(c, s.certificateView(r.Context(), c)))
	}
	httpapi.WriteJSON(w, http.StatusOK, out)
	return nil
}

// claimOf returns app a's claim of the path's hostname, or 404.
func (s *Server) claimOf(r *http.Request, a app) (certstore.Claim, error) {
	h := strings.TrimSuffix(r.PathValue("hostname"), ".")
	c, _, err := catalog.GetJSON[certstore.Claim](r.Context(), s.hostnames, h)
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && c.AppID != a.ID) || !catalog.ValidKey(h) {
		return certstore.Claim{}, api.Errorf(http.StatusNotFound, "hostname %s is not a hostname of app %s", api.Clip(h, 253), a.Name)
	}
	return c, err
}

// getCertificate is GET /v1/apps/{app}/certificates/{hostname}.
func (s *Server) getCertificate(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	c, err := s.claimOf(r, a)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, s.certificateView(r.Context(), c))
	return nil
}

// deleteCertificate is DELETE /v1/apps/{app}/certificates/{hostname}: the
// claim is given back and the stored certificates deleted.
func (s *Server) deleteCertificate(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	c, err := s.claimOf(r, a)
	if err != nil {
		return err
	}
	if _, err := s.releaseHostnames(r.Context(), a, c.Hostname); err != nil {
		return err
	}
	w.WriteHeader(http.StatusOK)
	return nil
}

// certificateRoutes registers the certificates API.
func (s *Server) certificateRoutes() {
	s.api.Handle("GET /v1/apps/{app}/certificates", s.listCertificates)
	s.api.Handle("POST /v1/apps/{app}/certificates", s.createCertificate)
	s.api.Handle("POST /v1/apps/{app}/certificates/acme", s.createCertificate)
	s.api.Handle("GET /v1/apps/{app}/certificates/{hostname}", s.getCertificate)
	s.api.Handle("DELETE /v1/apps/{app}/certificates/{hostname}", s.deleteCertificate)
}

// openCertificates opens the buckets the certificates API uses.
func (s *Server) openCertificates() error {
	var err error
	if s.hostnames, err = s.cfg.Catalog.Bucket(certstore.BucketHostnames); err != nil {
		return fmt.Errorf("server: bucket %s: %w", certstore.BucketHostnames, err)
	}
	certs, err := s.cfg.Catalog.Bucket(certstore.BucketCerts)
	if err != nil {
		return fmt.Errorf("server: bucket %s: %w", certstore.BucketCerts, err)
	}
	locks, err := s.cfg.Catalog.Bucket(certstore.BucketLocks)
	if err != nil {
		return fmt.Errorf("server: bucket %s: %w", certstore.BucketLocks, err)
	}
	s.certStore, err = certstore.NewStorage(certstore.StorageConfig{Certs: certs, Locks: locks, Owner: "server"})
	return err
}
