package api

import (
	"context"
	"net/http"
	"time"
)

// RenewHostInput is POST /v1/hosts/renew: an enrolled host asks for a new
// certificate before its own ends. Assertion is signed with the current
// certificate's key and binds the request (see internal/pki); the CSR may
// name the same key or a new one.
type RenewHostInput struct {
	CSR       []byte `json:"csr"` // DER, base64 on the wire
	Assertion string `json:"assertion"`
}

// RenewHostResponse is the host's new certificate and the CA's (PEM).
type RenewHostResponse struct {
	Certificate string `json:"certificate"`
	CA          string `json:"ca"`
}

// RevokedSerial is a certificate of the cluster's CA that no longer counts:
// a revoked host's, or one its host replaced by renewing (Superseded). It is
// listed until ExpiresAt, when it would end anyway.
type RevokedSerial struct {
	Serial     string    `json:"serial"`
	HostID     string    `json:"host_id"`
	ExpiresAt  time.Time `json:"expires_at"`
	Superseded bool      `json:"superseded,omitempty"`
}

// Revocations is PUT /v1/host/revocations on a host's API: the whole list
// of certificates the host must refuse, from the control plane.
type Revocations struct {
	Serials []RevokedSerial `json:"serials"`
}

// RenewHost asks for a new host certificate (no API token: the assertion is
// the credential).
func (c *Client) RenewHost(ctx context.Context, in RenewHostInput) (*RenewHostResponse, error) {
	out := new(RenewHostResponse)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/hosts/renew", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// PutRevocations gives a host the list of certificates it must refuse (the
// control plane's call, over mutual TLS).
func (c *Client) PutRevocations(ctx context.Context, in Revocations) error {
	return c.do(ctx, request{method: http.MethodPut, path: "/v1/host/revocations", body: in}, nil)
}
