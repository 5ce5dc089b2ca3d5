package api

import (
	"context"
	"net/http"
)

// CreateCertificate adds a hostname to an app (POST
// /v1/apps/{app}/certificates/acme).
func (c *Client) CreateCertificate(ctx context.Context, app, hostname string) (*CertificateDetailResponse, error) {
	out := new(CertificateDetailResponse)
	if err := c.appCall(ctx, http.MethodPost, app, []string{"certificates", "acme"}, CreateCertificateRequest{Hostname: hostname}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// ListCertificates lists an app's hostnames.
func (c *Client) ListCertificates(ctx context.Context, app string) (*ListCertificatesResponse, error) {
	out := new(ListCertificatesResponse)
	if err := c.appCall(ctx, http.MethodGet, app, []string{"certificates"}, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// GetCertificate returns a hostname of an app with its certificates.
func (c *Client) GetCertificate(ctx context.Context, app, hostname string) (*CertificateDetailResponse, error) {
	out := new(CertificateDetailResponse)
	if err := c.appCall(ctx, http.MethodGet, app, []string{"certificates", hostname}, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteCertificate removes a hostname from an app, with its certificates.
func (c *Client) DeleteCertificate(ctx context.Context, app, hostname string) error {
	return c.appCall(ctx, http.MethodDelete, app, []string{"certificates", hostname}, nil, nil)
}
