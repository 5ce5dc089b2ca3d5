package api

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// Client talks to a Machines API: Flame's, or any server that speaks Fly's.
// Its methods are safe for concurrent use.
//
// Every call takes a context. A response outside 2xx comes back as an *Error
// (unwrapped) carrying the status and the server's message, so callers test it
// with errors.Is(err, ErrNotFound) and the like. Transport and decoding
// failures are wrapped with the method and path of the call.
type Client struct {
	// HTTPClient sends the requests; nil means http.DefaultClient.
	HTTPClient *http.Client

	base  string // scheme://host[/prefix], without a trailing slash
	auth  string // the Authorization header, empty for none
	nonce string // the lease nonce sent on every call, empty for none
}

// NewClient returns a client for the API at baseURL (the server's root, such
// as "http://127.0.0.1:4280"; the client adds "/v1"). It authenticates with
// "Authorization: Bearer <token>"; a token that already names its scheme
// ("FlyV1 ..." or "Bearer ...") is sent as it is, and an empty one not at all.
func NewClient(baseURL, token string) *Client {
	return &Client{
		base: strings.TrimRight(baseURL, "/"),
		auth: authorization(token),
	}
}

func authorization(token string) string {
	switch {
	case token == "":
		return ""
	case strings.HasPrefix(token, "FlyV1 "), strings.HasPrefix(token, "Bearer "):
		return token
	default:
		return "Bearer " + token
	}
}

// WithLeaseNonce returns a copy of c that sends nonce in the
// fly-machine-lease-nonce header on every call, as a machine's lease requires
// of each mutating call while it is held. An empty nonce sends none.
func (c *Client) WithLeaseNonce(nonce string) *Client {
	cc := *c
	cc.nonce = nonce
	return &cc
}

// LeaseNonce returns the nonce c sends, empty for none.
func (c *Client) LeaseNonce() string { return c.nonce }

// request is one call to the API.
type request struct {
	method string
	path   string     // escaped, starting with "/v1/"
	query  url.Values // nil for none
	body   any        // encoded as JSON; nil for no body
	header http.Header
}

// send performs r and returns the response when its status is 2xx; the caller
// closes its body. Any other status becomes an *Error.
func (c *Client) send(ctx context.Context, r request) (*http.Response, error) {
	u := c.base + r.path
	if len(r.query) > 0 {
		u += "?" + r.query.Encode()
	}
	var body io.Reader
	if r.body != nil {
		b, err := json.Marshal(r.body)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encode body: %w", r.method, r.path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, r.method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
	for k, vs := range r.header {
		req.Header[k] = vs
	}
	if r.body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if req.Header.Get("Accept") == "" {
		req.Header.Set("Accept", "application/json")
	}
	if c.auth != "" {
		req.Header.Set("Authorization", c.auth)
	}
	if c.nonce != "" && req.Header.Get(LeaseNonceHeader) == "" {
		req.Header.Set(LeaseNonceHeader, c.nonce)
	}
	hc := c.HTTPClient
	if hc == nil {
		hc = http.DefaultClient
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", r.method, r.path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		return nil, responseError(resp)
	}
	return resp, nil
}

// maxErrorBody bounds how much of an error response is read.
const maxErrorBody = 64 << 10

// responseError turns a non-2xx response into an *Error. The message is the
// body's "error" (or, failing that, "message") text, else the status text.
func responseError(resp *http.Response) *Error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	var body struct {
		Error   string `json:"error"`
		Message string `json:"message"`
	}
	msg := ""
	if json.Unmarshal(b, &body) == nil {
		msg = body.Error
		if msg == "" {
			msg = body.Message
		}
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	if msg == "" {
		msg = fmt.Sprintf("status %d", resp.StatusCode)
	}
	return &Error{Status: resp.StatusCode, Message: msg}
}

// do performs r and decodes a JSON response into out (nil to discard it).
func (c *Client) do(ctx context.Context, r request, out any) error {
	resp, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil || resp.StatusCode == http.StatusNoContent {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", r.method, r.path, err)
	}
	return nil
}

// machinesPath returns the escaped path /v1/apps/{app}/machines followed by
// the given segments, each escaped. Empty names, "." and "..", which would
// address another resource than the one meant, are refused.
func machinesPath(app string, segments ...string) (string, error) {
	var b strings.Builder
	b.WriteString("/v1/apps/")
	if err := segment(&b, "app name", app); err != nil {
		return "", err
	}
	b.WriteString("/machines")
	for i, s := range segments {
		what := "machine id"
		if i > 0 {
			what = "path segment"
		}
		b.WriteByte('/')
		if err := segment(&b, what, s); err != nil {
			return "", err
		}
	}
	return b.String(), nil
}

func segment(b *strings.Builder, what, s string) error {
	switch s {
	case "":
		return fmt.Errorf("api: empty %s", what)
	case ".", "..":
		return fmt.Errorf("api: invalid %s %q", what, s)
	}
	b.WriteString(url.PathEscape(s))
	return nil
}
