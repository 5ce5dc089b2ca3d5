package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/flamehq/flame/api"
)

// maxMetadata bounds manifests and image configs read from a registry.
const maxMetadata = 8 << 20

// manifestAccept lists the manifest types a pull understands.
var manifestAccept = strings.Join([]string{
	string(types.OCIManifestSchema1),
	string(types.DockerManifestSchema2),
	string(types.OCIImageIndex),
	string(types.DockerManifestList),
}, ", ")

// client speaks the read side of the distribution API to one registry.
type client struct {
	http     *http.Client
	scheme   string
	registry string // host[:port]
	token    string
}

// isLoopback reports whether host (with optional port) names this machine.
func isLoopback(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

func (c *client) url(repo, kind, target string) string {
	return fmt.Sprintf("%s://%s/v2/%s/%s/%s", c.scheme, c.registry, repo, kind, target)
}

// get fetches url, classifying failures under the package's sentinels;
// what names the thing fetched in messages.
func (c *client) get(ctx context.Context, u, accept, what string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %v", what, ErrInvalid, err)
	}
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("%w: %s: cannot reach %s: %v", ErrUnavailable, what, c.registry, err)
	}
	if resp.StatusCode == http.StatusOK {
		return resp, nil
	}
	defer resp.Body.Close()
	msg := registryMessage(resp)
	switch {
	case resp.StatusCode == http.StatusNotFound:
		return nil, fmt.Errorf("%w: %s: %s", ErrNotFound, what, msg)
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		return nil, fmt.Errorf("%w: %s: %s", ErrUnauthorized, what, msg)
	case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
		return nil, fmt.Errorf("%w: %s: %s", ErrUnavailable, what, msg)
	default:
		return nil, fmt.Errorf("%s: %s", what, msg)
	}
}

// registryMessage summarizes an error response: its status and, when the
// body is the distribution API's error JSON, its codes and messages.
func registryMessage(resp *http.Response) string {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var e struct {
		Errors []struct{ Code, Message string }
	}
	msg := resp.Status
	if jsonUnmarshal(body, &e) == nil && len(e.Errors) > 0 {
		for _, x := range e.Errors {
			msg += fmt.Sprintf(" (%s: %s)", x.Code, x.Message)
		}
	}
	return "registry answered " + msg
}

// fetchManifest returns the manifest target (tag or digest) of repo, its
// media type and digest, verified against target when target is a digest.
func (c *client) fetchManifest(ctx context.Context, repo, target string) (body []byte, mt types.MediaType, digest string, err error) {
	what := fmt.Sprintf("manifest %s/%s:%s", c.registry, repo, target)
	if strings.HasPrefix(target, "sha256:") {
		what = fmt.Sprintf("manifest %s/%s@%s", c.registry, repo, target)
	}
	resp, err := c.get(ctx, c.url(repo, "manifests", target), manifestAccept, what)
	if err != nil {
		return nil, "", "", err
	}
	defer resp.Body.Close()
	body, err = io.ReadAll(io.LimitReader(resp.Body, maxMetadata+1))
	if err != nil {
		return nil, "", "", fmt.Errorf("%w: %s: %v", ErrUnavailable, what, err)
	}
	if len(body) > maxMetadata {
		return nil, "", "", fmt.Errorf("%w: %s: larger than %d bytes", ErrInvalid, what, maxMetadata)
	}
	sum := sha256.Sum256(body)
	digest = "sha256:" + hex.EncodeToString(sum[:])
	want := resp.Header.Get("Docker-Content-Digest")
	if strings.HasPrefix(target, "sha256:") {
		want = target
	}
	if want != "" && want != digest {
		return nil, "", "", fmt.Errorf("%w: %s: content has digest %s, expected %s", ErrDigest, what, digest, want)
	}
	mt = types.MediaType(resp.Header.Get("Content-Type"))
	if i := strings.IndexByte(string(mt), ';'); i >= 0 {
		mt = mt[:i]
	}
	if mt == "" || mt == "application/json" {
		var probe struct{ MediaType types.MediaType }
		jsonUnmarshal(body, &probe)
		mt = probe.MediaType
	}
	return body, mt, digest, nil
}

// blob opens blob digest of repo for reading; the caller verifies it.
func (c *client) blob(ctx context.Context, repo, digest, what string) (io.ReadCloser, error) {
	resp, err := c.get(ctx, c.url(repo, "blobs", digest), "", what)
	if err != nil {
		return nil, err
	}
	return resp.Body, nil
}

// verifier counts and hashes what is read through it.
type verifier struct {
	r    io.Reader
	h    hash.Hash
	n    int64
	max  int64 // read no more than this (-1: unlimited)
	over bool
}

func newVerifier(r io.Reader, max int64) *verifier {
	return &verifier{r: r, h: sha256.New(), max: max}
}

func (v *verifier) Read(p []byte) (int, error) {
	if v.max >= 0 && v.n >= v.max {
		// Probe for one more byte: content longer than announced is a
		// mismatch, not something to read forever.
		var one [1]byte
		n, err := v.r.Read(one[:])
		if n > 0 {
			v.over = true
			return 0, errors.New("content longer than its descriptor says")
		}
		return 0, err
	}
	if v.max >= 0 && int64(len(p)) > v.max-v.n {
		p = p[:v.max-v.n]
	}
	n, err := v.r.Read(p)
	v.h.Write(p[:n])
	v.n += int64(n)
	return n, err
}

func (v *verifier) digest() string { return "sha256:" + hex.EncodeToString(v.h.Sum(nil)) }

// newHTTPClient is the client a Store pulls with: no overall timeout (a
// layer may be large) but bounded waits for connections and headers.
func newHTTPClient(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	if dial != nil {
		t.DialContext = dial
	}
	t.ResponseHeaderTimeout = 30 * time.Second
	t.MaxIdleConnsPerHost = 8
	return &http.Client{Transport: t}
}

// parseRef parses an image reference; loopback registries are spoken to
// over plain HTTP.
func parseRef(ref string) (name.Reference, error) {
	if strings.HasPrefix(ref, api.ExecImagePrefix) {
		// It would parse as a registry named "exec".
		return nil, fmt.Errorf("%w: reference %q names a host program, which only the exec driver runs", ErrInvalid, ref)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: reference %q: %v", ErrInvalid, ref, err)
	}
	return r, nil
}
