package api

import (
	"context"
	"net/http"
)

// GossipTrust is what a host needs, besides its certificate, to take part
// in the cluster's gossip: the keyring that encrypts it (the first key
// encrypts, every one decrypts; 32 bytes each, base64 on the wire) and the
// serials of revoked host certificates, whose records it refuses. The
// control plane gives it at enrollment and sends it again, over mutual
// TLS, when it rotates the key or revokes a host (PUT /v1/cluster/trust on
// the host's API).
type GossipTrust struct {
	Keys    [][]byte `json:"keys"`
	Revoked []string `json:"revoked,omitempty"`
}

// Bounds on a GossipTrust, checked by its receiver.
const (
	MaxGossipKeys     = 3
	MaxRevokedSerials = 100_000
)

// GossipKeyRotation is POST /v1/hosts/gossip-key/rotate's answer: the hosts
// that hold the new key (and use it), and those that could not be reached,
// which need a new join token to come back.
type GossipKeyRotation struct {
	Hosts   []string `json:"hosts"`
	Skipped []string `json:"skipped,omitempty"`
}

// RotateGossipKey makes a new gossip key and installs it on every host
// (admin only).
func (c *Client) RotateGossipKey(ctx context.Context) (*GossipKeyRotation, error) {
	out := new(GossipKeyRotation)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/hosts/gossip-key/rotate"}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// SetGossipTrust gives a host its gossip keyring and revoked serials (the
// control plane's call, over mutual TLS).
func (c *Client) SetGossipTrust(ctx context.Context, in GossipTrust) error {
	return c.do(ctx, request{method: http.MethodPut, path: "/v1/cluster/trust", body: in}, nil)
}
