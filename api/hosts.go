package api

import (
	"context"
	"net/http"
	"strings"
)

// CreateJoinTokenInput is POST /v1/hosts/join-tokens: an admin asks for a
// one-time token a new host enrolls with.
type CreateJoinTokenInput struct {
	// HostID, when set, is the only host id the token enrolls; it is
	// required to enroll a host id again (a reinstalled host).
	HostID string `json:"host_id,omitempty"`
	// TTLSeconds is how long the token may be used (default one hour, at
	// most a week).
	TTLSeconds int `json:"ttl_seconds,omitempty"`
}

// JoinToken is a join token as minted: Token is shown once.
type JoinToken struct {
	ID        string `json:"id"`
	Token     string `json:"token"`
	HostID    string `json:"host_id,omitempty"`
	ExpiresAt string `json:"expires_at"`
}

// EnrollHostInput is POST /v1/hosts/enroll: a host asks for its
// certificate. It does not send the join token's secret, only a proof it
// holds it (an HMAC over every other field, see internal/pki).
type EnrollHostInput struct {
	TokenID string `json:"token_id"`
	HostID  string `json:"host_id"`
	Region  string `json:"region"`
	// APIAddr is where the control plane will call the host's API: the
	// only address it ever calls the host at.
	APIAddr string `json:"api_addr"`
	CSR     []byte `json:"csr"` // DER, base64 on the wire
	Proof   []byte `json:"proof"`
}

// EnrollHostResponse is the host's certificate and the CA's (PEM): the
// host's only credential from then on.
type EnrollHostResponse struct {
	Certificate string `json:"certificate"`
	CA          string `json:"ca"`
	// NATSCredential is the host's own nkey seed on the catalog's NATS
	// (events, logs, the edge's buckets) and NATSCA the CA (PEM) that
	// NATS's certificate chains to; empty with an external NATS.
	NATSCredential string `json:"nats_credential,omitempty"`
	NATSCA         string `json:"nats_ca,omitempty"`
	// Network (8 hex digits) and HostNumber (1–65535) place the host in
	// the cluster's private network: its machines' addresses are
	// fdaa:<network>:<org>:<host number>:… on every host alike.
	Network    string `json:"network,omitempty"`
	HostNumber int    `json:"host_number,omitempty"`
	// Gossip is the cluster's gossip keyring and revoked serials; nil from
	// a control plane that has none.
	Gossip *GossipTrust `json:"gossip,omitempty"`
}

// Host is an enrolled host as the catalog records it.
type Host struct {
	ID         string `json:"id"`
	Region     string `json:"region"`
	APIAddr    string `json:"api_addr"`
	Serial     string `json:"serial"`
	EnrolledAt string `json:"enrolled_at"`
	ExpiresAt  string `json:"expires_at"`
	Revoked    bool   `json:"revoked"`
	RevokedAt  string `json:"revoked_at,omitempty"`
}

// ListHostsResponse is GET /v1/hosts.
type ListHostsResponse struct {
	Hosts []Host `json:"hosts"`
}

// CreateJoinToken mints a join token (admin only).
func (c *Client) CreateJoinToken(ctx context.Context, in CreateJoinTokenInput) (*JoinToken, error) {
	out := new(JoinToken)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/hosts/join-tokens", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// EnrollHost asks for a host's certificate with a join token's proof (no
// API token needed).
func (c *Client) EnrollHost(ctx context.Context, in EnrollHostInput) (*EnrollHostResponse, error) {
	out := new(EnrollHostResponse)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/hosts/enroll", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// ListHosts lists the enrolled hosts (admin only).
func (c *Client) ListHosts(ctx context.Context) ([]Host, error) {
	var out ListHostsResponse
	if err := c.do(ctx, request{method: http.MethodGet, path: "/v1/hosts"}, &out); err != nil {
		return nil, err
	}
	return out.Hosts, nil
}

// RevokeHost revokes a host's credentials for good (admin only): the
// control plane no longer calls it, and its id cannot enroll again.
func (c *Client) RevokeHost(ctx context.Context, hostID string) error {
	var b strings.Builder
	b.WriteString("/v1/hosts/")
	if err := segment(&b, "host id", hostID); err != nil {
		return err
	}
	b.WriteString("/revoke")
	return c.do(ctx, request{method: http.MethodPost, path: b.String()}, nil)
}

// ClientCertificateInput is POST /v1/hosts/client-certificates (admin
// only): a certificate request for a key of the caller's.
type ClientCertificateInput struct {
	CSR []byte `json:"csr"` // DER, base64 on the wire
}

// ClientCertificate is a short-lived client certificate in the control
// plane's role, and the CA's: what lets an operator's tool call hosts' APIs
// directly, as the control plane does.
type ClientCertificate struct {
	Certificate string `json:"certificate"`
	CA          string `json:"ca"`
	ExpiresAt   string `json:"expires_at"`
}

// IssueClientCertificate asks for a client certificate (admin only).
func (c *Client) IssueClientCertificate(ctx context.Context, in ClientCertificateInput) (*ClientCertificate, error) {
	out := new(ClientCertificate)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/hosts/client-certificates", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}
