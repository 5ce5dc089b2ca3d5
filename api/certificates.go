package api

import "time"

// The certificates of an app's custom hostnames, in the shapes of Fly's
// certificates API (/v1/apps/{app}/certificates): a hostname is added to
// an app, which claims it platform-wide, and the edges obtain its
// certificate by ACME (HTTP-01 or TLS-ALPN-01) on its first TLS handshake.

// MaxCertificatesPerApp bounds the hostnames one app may claim.
const MaxCertificatesPerApp = 100

// Certificate statuses.
const (
	CertificateReady    = "Ready"
	CertificateAwaiting = "Awaiting certificates"
)

// CreateCertificateRequest adds a hostname to an app.
type CreateCertificateRequest struct {
	Hostname string `json:"hostname"`
}

// ListCertificatesResponse lists an app's hostnames.
type ListCertificatesResponse struct {
	Certificates []CertificateSummary `json:"certificates"`
	TotalCount   int                  `json:"total_count"`
}

// CertificateSummary is one hostname of an app.
type CertificateSummary struct {
	Hostname           string    `json:"hostname"`
	Status             string    `json:"status"`
	AcmeALPNConfigured bool      `json:"acme_alpn_configured"`
	AcmeHTTPConfigured bool      `json:"acme_http_configured"`
	Configured         bool      `json:"configured"`
	AcmeRequested      bool      `json:"acme_requested"`
	HasFlyCertificate  bool      `json:"has_fly_certificate"`
	CreatedAt          time.Time `json:"created_at"`
	UpdatedAt          time.Time `json:"updated_at"`
}

// CertificateDetailResponse is one hostname with its certificates and
// what its DNS must say.
type CertificateDetailResponse struct {
	Hostname        string                `json:"hostname"`
	Configured      bool                  `json:"configured"`
	AcmeRequested   bool                  `json:"acme_requested"`
	Status          string                `json:"status"`
	Certificates    []CertificateDetail   `json:"certificates"`
	Validation      CertificateValidation `json:"validation"`
	DNSRequirements DNSRequirements       `json:"dns_requirements"`
}

// CertificateDetail is one certificate the edges hold for a hostname.
type CertificateDetail struct {
	Source    string           `json:"source"` // "fly": issued by ACME
	Status    string           `json:"status"` // "active", "expired"
	CreatedAt *time.Time       `json:"created_at,omitempty"`
	ExpiresAt *time.Time       `json:"expires_at,omitempty"`
	Issuer    string           `json:"issuer,omitempty"`
	Issued    []IssuedCertInfo `json:"issued"`
}

// IssuedCertInfo is one issued certificate by key type.
type IssuedCertInfo struct {
	Type      string    `json:"type"` // "ecdsa", "rsa"
	ExpiresAt time.Time `json:"expires_at"`
}

// CertificateValidation says which ACME challenges can be answered.
type CertificateValidation struct {
	DNSConfigured  bool `json:"dns_configured"`
	ALPNConfigured bool `json:"alpn_configured"`
	HTTPConfigured bool `json:"http_configured"`
}

// DNSRequirements are the records the hostname needs: A/AAAA at the edges
// (the challenges come to them). DNS-01 is not offered, so AcmeChallenge
// only names the record Fly's API would.
type DNSRequirements struct {
	A             []string                 `json:"a"`
	AAAA          []string                 `json:"aaaa"`
	CNAME         string                   `json:"cname"`
	ACMEChallenge ACMEChallengeRequirement `json:"acme_challenge"`
}

// ACMEChallengeRequirement is a DNS-01 record.
type ACMEChallengeRequirement struct {
	Name   string `json:"name"`
	Target string `json:"target"`
}
