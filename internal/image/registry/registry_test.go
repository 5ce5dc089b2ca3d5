package registry

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func start(t *testing.T, dir string, auth func(context.Context, string) (Scope, error)) (*Registry, *httptest.Server) {
	t.Helper()
	return startConfig(t, Config{Dir: dir, Auth: auth})
}

func startConfig(t *testing.T, cfg Config) (*Registry, *httptest.Server) {
	t.Helper()
	cfg.Logger = slog.New(slog.NewTextHandler(testWriter{t}, nil))
	r, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	srv := httptest.NewServer(r)
	t.Cleanup(srv.Close)
	return r, srv
}

func host(srv *httptest.Server) string { return strings.TrimPrefix(srv.URL, "http://") }

// TestPersistsAcrossRestart: blobs, manifests and tags pushed to one
// registry are served by the next one on the same directory.
func TestPersistsAcrossRestart(t *testing.T) {
	dir := t.TempDir()
	_, srv := start(t, dir, nil)
	img, err := random.Image(1024, 2)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.NewTag(host(srv) + "/team/demo:v1")
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	digest, _ := img.Digest()
	byDigest, _ := name.NewDigest(host(srv) + "/team/demo@" + digest.String())
	if err := remote.Write(byDigest, img); err != nil {
		t.Fatal(err)
	}
	srv.Close()

	r2, srv2 := start(t, dir, nil)
	if r2.Loaded() != 1 {
		t.Errorf("loaded %d manifests, want 1", r2.Loaded())
	}
	for _, s := range []string{host(srv2) + "/team/demo:v1", host(srv2) + "/team/demo@" + digest.String()} {
		ref, _ := name.ParseReference(s)
		got, err := remote.Image(ref)
		if err != nil {
			t.Fatalf("%s after restart: %v", s, err)
		}
		if d, _ := got.Digest(); d != digest {
			t.Errorf("%s: digest %s, want %s", s, d, digest)
		}
		layers, _ := got.Layers()
		for _, l := range layers {
			rc, err := l.Compressed()
			if err != nil {
				t.Fatal(err)
			}
			if _, err := io.Copy(io.Discard, rc); err != nil { // verifies the digest
				t.Fatal(err)
			}
			rc.Close()
		}
	}
	repo, _ := name.NewRepository(host(srv2) + "/team/demo")
	if tags, err := remote.List(repo); err != nil || strings.Join(tags, ",") != "v1" {
		t.Errorf("tags %v, %v; want [v1]", tags, err)
	}

	// A deleted tag stays deleted after a restart.
	req, _ := http.NewRequest(http.MethodDelete, srv2.URL+"/v2/team/demo/manifests/v1", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("delete: %v %v", resp, err)
	}
	srv2.Close()
	_, srv3 := start(t, dir, nil)
	if resp, _ := http.Get(srv3.URL + "/v2/team/demo/manifests/v1"); resp.StatusCode != http.StatusNotFound {
		t.Errorf("deleted tag: status %d", resp.StatusCode)
	}
	if resp, _ := http.Get(srv3.URL + "/v2/team/demo/manifests/" + digest.String()); resp.StatusCode != http.StatusOK {
		t.Errorf("manifest by digest after tag delete: status %d", resp.StatusCode)
	}
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// TestUploadsVerified: a blob or manifest whose bytes do not match the
// digest it is pushed as is refused and not stored.
func TestUploadsVerified(t *testing.T) {
	dir := t.TempDir()
	_, srv := start(t, dir, nil)
	content := []byte("hello, layer")
	wrong := sha([]byte("something else"))

	// Monolithic upload with a wrong digest.
	resp, err := http.Post(srv.URL+"/v2/demo/blobs/uploads/?digest="+wrong, "application/octet-stream", bytes.NewReader(content))
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("monolithic upload with wrong digest: status %d, want 400", resp.StatusCode)
	}
	// Chunked upload (POST, PATCH, PUT) with a wrong digest.
	resp, _ = http.Post(srv.URL+"/v2/demo/blobs/uploads/", "", nil)
	loc := resp.Header.Get("Location")
	req, _ := http.NewRequest(http.MethodPatch, srv.URL+loc, bytes.NewReader(content))
	if resp, err = http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusAccepted {
		t.Fatalf("patch: %v %v", resp, err)
	}
	req, _ = http.NewRequest(http.MethodPut, srv.URL+loc+"?digest="+wrong, nil)
	if resp, _ = http.DefaultClient.Do(req); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("chunked upload with wrong digest: status %d, want 400", resp.StatusCode)
	}
	for _, d := range []string{wrong, sha(content)} {
		if resp, _ := http.Head(srv.URL + "/v2/demo/blobs/" + d); resp.StatusCode != http.StatusNotFound {
			t.Errorf("blob %s stored after a failed upload (status %d)", d, resp.StatusCode)
		}
	}
	if tmps, _ := os.ReadDir(filepath.Join(dir, "blobs", "tmp")); len(tmps) != 0 {
		t.Errorf("upload leftovers: %v", tmps)
	}

	// The right digest is accepted.
	resp, _ = http.Post(srv.URL+"/v2/demo/blobs/uploads/?digest="+sha(content), "application/octet-stream", bytes.NewReader(content))
	if resp.StatusCode != http.StatusCreated {
		t.Errorf("good upload: status %d", resp.StatusCode)
	}

	// A manifest pushed by a digest that is not its own.
	mf := []byte(fmt.Sprintf(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":%q,"size":%d},"layers":[]}`, sha(content), len(content)))
	req, _ = http.NewRequest(http.MethodPut, srv.URL+"/v2/demo/manifests/"+wrong, bytes.NewReader(mf))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	if resp, _ = http.DefaultClient.Do(req); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("manifest with wrong digest: status %d, want 400", resp.StatusCode)
	}
	// A manifest referencing a blob never uploaded.
	missing := bytes.Replace(mf, []byte(sha(content)), []byte(wrong), 1)
	req, _ = http.NewRequest(http.MethodPut, srv.URL+"/v2/demo/manifests/v1", bytes.NewReader(missing))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	if resp, _ = http.DefaultClient.Do(req); resp.StatusCode != http.StatusNotFound {
		t.Errorf("manifest with missing blob: status %d, want 404", resp.StatusCode)
	}
	req, _ = http.NewRequest(http.MethodPut, srv.URL+"/v2/demo/manifests/"+sha(mf), bytes.NewReader(mf))
	req.Header.Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
	if resp, _ = http.DefaultClient.Do(req); resp.StatusCode != http.StatusCreated {
		t.Errorf("good manifest: status %d", resp.StatusCode)
	}
}

func TestNamesChecked(t *testing.T) {
	_, srv := start(t, t.TempDir(), nil)
	for _, p := range []string{
		"/v2/../../etc/manifests/latest",
		"/v2/Demo/manifests/latest",
		"/v2/demo/manifests/..",
		"/v2/demo/manifests/.tmp-x",
	} {
		req, _ := http.NewRequest(http.MethodPut, srv.URL+p, strings.NewReader("{}"))
		req.URL.Path = p // keep the dots
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusBadRequest && resp.StatusCode != http.StatusNotFound {
			t.Errorf("PUT %s: status %d", p, resp.StatusCode)
		}
	}
}

func TestAuth(t *testing.T) {
	// "s3cret" may push and pull, "reader" only pull.
	_, srv := start(t, t.TempDir(), func(_ context.Context, tok string) (Scope, error) {
		switch tok {
		case "s3cret":
			return Scope{Org: "acme"}, nil
		case "reader":
			return Scope{Org: "acme", ReadOnly: true}, nil
		case "down":
			return Scope{}, errors.New("catalog unavailable")
		}
		return Scope{}, ErrUnauthorized
	})
	do := func(method, h string) int {
		req, _ := http.NewRequest(method, srv.URL+"/v2/", nil)
		if h != "" {
			req.Header.Set("Authorization", h)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	get := func(h string) int { return do(http.MethodGet, h) }
	basic := "Basic " + base64.StdEncoding.EncodeToString([]byte("x:s3cret"))
	for h, want := range map[string]int{
		"":               http.StatusUnauthorized,
		"Bearer wrong":   http.StatusUnauthorized,
		"Bearer s3cret":  http.StatusOK,
		basic:            http.StatusOK,
		"Basic !!!!!!!!": http.StatusUnauthorized,
	} {
		if got := get(h); got != want {
			t.Errorf("Authorization %q: status %d, want %d", h, got, want)
		}
	}
	if got := get("Bearer reader"); got != http.StatusOK {
		t.Errorf("a reader's GET: status %d, want 200", got)
	}
	if got := do(http.MethodPost, "Bearer reader"); got != http.StatusForbidden {
		t.Errorf("a reader's POST: status %d, want 403", got)
	}
	if got := get("Bearer down"); got != http.StatusServiceUnavailable {
		t.Errorf("a token that cannot be checked: status %d, want 503", got)
	}
}
