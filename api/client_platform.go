package api

import (
	"context"
	"net/http"
	"net/url"
	"strings"
)

// appPath returns the escaped path /v1/apps/{app} followed by segments.
func appPath(app string, segments ...string) (string, error) {
	var b strings.Builder
	b.WriteString("/v1/apps/")
	if err := segment(&b, "app name", app); err != nil {
		return "", err
	}
	for _, s := range segments {
		b.WriteByte('/')
		if err := segment(&b, "path segment", s); err != nil {
			return "", err
		}
	}
	return b.String(), nil
}

func (c *Client) appCall(ctx context.Context, method, app string, segments []string, body, out any) error {
	p, err := appPath(app, segments...)
	if err != nil {
		return err
	}
	return c.do(ctx, request{method: method, path: p, body: body}, out)
}

// CreateApp creates an app in an org (POST /v1/apps).
func (c *Client) CreateApp(ctx context.Context, in CreateAppInput) (*App, error) {
	out := new(App)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/apps", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// ListApps lists the apps of an org the token may see (GET /v1/apps?org_slug=).
func (c *Client) ListApps(ctx context.Context, org string) ([]App, error) {
	var out ListAppsResponse
	q := url.Values{}
	if org != "" {
		q.Set("org_slug", org)
	}
	if err := c.do(ctx, request{method: http.MethodGet, path: "/v1/apps", query: q}, &out); err != nil {
		return nil, err
	}
	return out.Apps, nil
}

// GetApp returns one app (GET /v1/apps/{app}).
func (c *Client) GetApp(ctx context.Context, app string) (*App, error) {
	out := new(App)
	if err := c.appCall(ctx, http.MethodGet, app, nil, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// DeleteApp destroys an app's machines and the app (DELETE /v1/apps/{app}).
func (c *Client) DeleteApp(ctx context.Context, app string) error {
	return c.appCall(ctx, http.MethodDelete, app, nil, nil, nil)
}

// ListSecrets lists an app's secrets: names and digests, never values.
func (c *Client) ListSecrets(ctx context.Context, app string) ([]AppSecret, error) {
	var out ListSecretsResponse
	if err := c.appCall(ctx, http.MethodGet, app, []string{"secrets"}, nil, &out); err != nil {
		return nil, err
	}
	return out.Secrets, nil
}

// UpdateSecrets sets (value) and deletes (nil) secrets in one step.
func (c *Client) UpdateSecrets(ctx context.Context, app string, values map[string]*string) (*UpdateSecretsResponse, error) {
	out := new(UpdateSecretsResponse)
	if err := c.appCall(ctx, http.MethodPost, app, []string{"secrets"}, UpdateSecretsInput{Values: values}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// PutGroup declares an app's machines per region for one process group.
func (c *Client) PutGroup(ctx context.Context, app string, g Group) (*Group, error) {
	out := new(Group)
	if err := c.appCall(ctx, http.MethodPut, app, []string{"groups", g.Name}, g, out); err != nil {
		return nil, err
	}
	return out, nil
}

// GetGroup returns a declared group with what runs of it now.
func (c *Client) GetGroup(ctx context.Context, app, name string) (*Group, error) {
	out := new(Group)
	if err := c.appCall(ctx, http.MethodGet, app, []string{"groups", name}, nil, out); err != nil {
		return nil, err
	}
	return out, nil
}

// Regions lists the regions with hosts and their free capacity.
func (c *Client) Regions(ctx context.Context) (*RegionsResponse, error) {
	out := new(RegionsResponse)
	if err := c.do(ctx, request{method: http.MethodGet, path: "/v1/platform/regions"}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// CreateOrg creates an org (admin tokens only).
func (c *Client) CreateOrg(ctx context.Context, in Org) (*Org, error) {
	out := new(Org)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/orgs", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// CreateToken mints a token for an org, optionally one app, optionally
// read-only; the answer is the only time the token is shown.
func (c *Client) CreateToken(ctx context.Context, in CreateTokenInput) (*Token, error) {
	out := new(Token)
	if err := c.do(ctx, request{method: http.MethodPost, path: "/v1/tokens", body: in}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// ListTokens lists the tokens the caller may manage (never their secrets).
func (c *Client) ListTokens(ctx context.Context) (*ListTokensResponse, error) {
	out := new(ListTokensResponse)
	if err := c.do(ctx, request{method: http.MethodGet, path: "/v1/tokens"}, out); err != nil {
		return nil, err
	}
	return out, nil
}

// RevokeToken revokes the token with the given id; it is refused from then on.
func (c *Client) RevokeToken(ctx context.Context, id string) error {
	return c.do(ctx, request{method: http.MethodDelete, path: "/v1/tokens/" + url.PathEscape(id)}, nil)
}
