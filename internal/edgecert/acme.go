package edgecert

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/certmagic"
)

// ACMEConfig configures an edge's ACME certificates.
type ACMEConfig struct {
	// CA is the ACME directory URL. Required.
	CA string
	// Email is the ACME account's contact ("" for none).
	Email string
	// TrustedRoots verify the CA's own HTTPS certificate (nil: the
	// system's).
	TrustedRoots *x509.CertPool
	// Storage keeps certificates, keys, the account, challenge tokens and
	// locks; every edge of a cluster shares it (certstore.Storage).
	Storage certmagic.Storage
	// Claimed returns the app a hostname belongs to: only claimed
	// hostnames get a certificate (and an ACME order).
	Claimed func(host string) (app string, ok bool)
	// ListenHost, HTTPPort and TLSPort are where the edge's plain and
	// HTTPS listeners are: certmagic's challenge solvers find them taken
	// and leave the answers to the edge (HTTPChallenge, and the
	// acme-tls/1 certificate in GetCertificate), which any edge can give,
	// since the challenge tokens are in the shared storage.
	ListenHost        string
	HTTPPort, TLSPort int
	// DisableHTTP01 and DisableTLSALPN01 leave a challenge type out.
	DisableHTTP01, DisableTLSALPN01 bool
	// RenewalWindowRatio is the part of a certificate's lifetime left when
	// it is renewed (default certmagic's: a third). A certificate is
	// renewed on a handshake in that window (in the background; one
	// already expired, during the handshake).
	RenewalWindowRatio float64
	// RenewCheckInterval is how often the certificate cache's maintenance
	// runs (default certmagic's, 10 min); a certificate with less than
	// five intervals left is renewed at once, whatever the ratio.
	RenewCheckInterval time.Duration
	// Timeout bounds one issuance (default 90 s).
	Timeout time.Duration
	Logger  *slog.Logger
}

// ACME obtains and serves certificates of claimed hostnames.
type ACME struct {
	cfg    ACMEConfig
	cache  *certmagic.Cache
	magic  *certmagic.Config
	issuer *certmagic.ACMEIssuer
}

// NewACME builds the certificate source; Close stops it.
func NewACME(cfg ACMEConfig) (*ACME, error) {
	switch {
	case cfg.CA == "":
		return nil, errors.New("edgecert: the ACME directory is required")
	case cfg.Storage == nil:
		return nil, errors.New("edgecert: a storage is required")
	case cfg.Claimed == nil:
		return nil, errors.New("edgecert: the hostname claims are required")
	case cfg.HTTPPort < 1 || cfg.TLSPort < 1:
		return nil, errors.New("edgecert: the edge's HTTP and TLS ports are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 90 * time.Second
	}
	zl := zapLogger(cfg.Logger.With("component", "acme"))
	a := &ACME{cfg: cfg}
	a.cache = certmagic.NewCache(certmagic.CacheOptions{
		GetConfigForCert:   func(certmagic.Certificate) (*certmagic.Config, error) { return a.magic, nil },
		RenewCheckInterval: cfg.RenewCheckInterval,
		Logger:             zl,
	})
	a.magic = certmagic.New(a.cache, certmagic.Config{
		Storage:            cfg.Storage,
		RenewalWindowRatio: cfg.RenewalWindowRatio,
		// The renewal window is the ratio's, not the CA's suggestion.
		DisableARI: true,
		OnDemand:   &certmagic.OnDemandConfig{DecisionFunc: a.decide},
		Logger:     zl,
	})
	a.issuer = certmagic.NewACMEIssuer(a.magic, certmagic.ACMEIssuer{
		CA: cfg.CA, TestCA: cfg.CA, Email: cfg.Email, Agreed: true, TrustedRoots: cfg.TrustedRoots,
		ListenHost: cfg.ListenHost, AltHTTPPort: cfg.HTTPPort, AltTLSALPNPort: cfg.TLSPort,
		DisableHTTPChallenge: cfg.DisableHTTP01, DisableTLSALPNChallenge: cfg.DisableTLSALPN01,
		CertObtainTimeout: cfg.Timeout, Logger: zl,
	})
	a.magic.Issuers = []certmagic.Issuer{a.issuer}
	return a, nil
}

// decide lets certmagic obtain a certificate only for a claimed hostname.
func (a *ACME) decide(_ context.Context, name string) error {
	if _, ok := a.cfg.Claimed(name); !ok {
		return fmt.Errorf("hostname %q is not claimed by any app", name)
	}
	return nil
}

// GetCertificate is the edge's certificate source: the claimed hostname's
// certificate (from memory, the shared storage, or obtained now), or the
// TLS-ALPN-01 challenge certificate for a CA validating it. A hostname no
// app claims (any more) gets none.
func (a *ACME) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	name := strings.ToLower(strings.TrimSuffix(hello.ServerName, "."))
	challenge := len(hello.SupportedProtos) == 1 && hello.SupportedProtos[0] == "acme-tls/1"
	if !challenge {
		if err := a.decide(hello.Context(), name); err != nil {
			return nil, err
		}
	}
	return a.magic.GetCertificate(hello)
}

// HTTPChallenge answers an HTTP-01 challenge request whose token is in the
// storage (any edge's order).
func (a *ACME) HTTPChallenge(w http.ResponseWriter, r *http.Request) bool {
	return a.issuer.HandleHTTPChallenge(w, r)
}

// Close stops the certificate cache's maintenance.
func (a *ACME) Close() { a.cache.Stop() }
