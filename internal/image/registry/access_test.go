package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// orgTokens is the token table of the access tests: two orgs, a read-only
// token of one, and an admin.
var orgTokens = map[string]Scope{
	"acme":      {Org: "acme"},
	"acme-ro":   {Org: "acme", ReadOnly: true},
	"globex":    {Org: "globex"},
	"admin":     {Admin: true},
	"flame-org": {Org: PublicNamespace}, // an org that took the public namespace's name
}

func orgAuth(_ context.Context, tok string) (Scope, error) {
	if s, ok := orgTokens[tok]; ok {
		return s, nil
	}
	return Scope{}, ErrUnauthorized
}

// call makes one request with token tok and returns the status and body.
func call(t *testing.T, srv *httptest.Server, tok, method, path string, body []byte, hdr ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, srv.URL+path, bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+tok)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func pushAs(srv *httptest.Server, tok, ref string, img v1.Image) error {
	r, err := name.ParseReference(host(srv) + "/" + ref)
	if err != nil {
		return err
	}
	return remote.Write(r, img, remote.WithAuth(&authn.Basic{Username: "x", Password: tok}))
}

func pullAs(srv *httptest.Server, tok, ref string) (v1.Hash, error) {
	r, err := name.ParseReference(host(srv) + "/" + ref)
	if err != nil {
		return v1.Hash{}, err
	}
	img, err := remote.Image(r, remote.WithAuth(&authn.Basic{Username: "x", Password: tok}))
	if err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

func randomImage(t *testing.T) v1.Image {
	t.Helper()
	img, err := random.Image(512, 2)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// TestCrossOrgPush: an org cannot push into another org's repository (the
// overwrite of a tag another org runs), nor into the public namespace, nor
// outside any org; its tag stays what its owner pushed.
func TestCrossOrgPush(t *testing.T) {
	_, srv := start(t, t.TempDir(), orgAuth)
	mine := randomImage(t)
	if err := pushAs(srv, "acme", "acme/app:v1", mine); err != nil {
		t.Fatalf("acme pushes its own repository: %v", err)
	}
	want, _ := mine.Digest()
	evil := randomImage(t)
	for _, tc := range []struct{ tok, ref string }{
		{"globex", "acme/app:v1"},
		{"globex", "acme/other:v1"},
		{"globex", "flame/demo-app:latest"},
		{"flame-org", "flame/demo-app:latest"},
		{"globex", "globex:latest"}, // not <org>/<name>
		{"acme-ro", "acme/app:v1"},
	} {
		if err := pushAs(srv, tc.tok, tc.ref, evil); err == nil {
			t.Errorf("%s pushed %s", tc.tok, tc.ref)
		}
	}
	// The raw requests too: each write is refused before anything is kept.
	for _, p := range []struct{ method, path string }{
		{http.MethodPost, "/v2/acme/app/blobs/uploads/"},
		{http.MethodPut, "/v2/acme/app/manifests/v1"},
		{http.MethodDelete, "/v2/acme/app/manifests/v1"},
	} {
		if code, _ := call(t, srv, "globex", p.method, p.path, []byte("{}")); code != http.StatusForbidden {
			t.Errorf("globex %s %s: status %d, want 403", p.method, p.path, code)
		}
	}
	if got, err := pullAs(srv, "acme", "acme/app:v1"); err != nil || got != want {
		t.Errorf("acme/app:v1 after the attempts: %v %v, want %v", got, err, want)
	}
	if err := pushAs(srv, "admin", "flame/demo-app:latest", mine); err != nil {
		t.Errorf("an admin pushes the public namespace: %v", err)
	}
}

// TestCrossOrgPull: another org's repository does not exist for a token —
// manifests, tags and blobs — not even through a repository of its own
// that names the other org's layer by digest; read-only tokens pull their
// org's images and every org pulls the public namespace.
func TestCrossOrgPull(t *testing.T) {
	_, srv := start(t, t.TempDir(), orgAuth)
	secret := randomImage(t)
	if err := pushAs(srv, "acme", "acme/app:v1", secret); err != nil {
		t.Fatal(err)
	}
	digest, _ := secret.Digest()
	layers, _ := secret.Layers()
	layer, _ := layers[0].Digest()
	mf, _ := secret.RawManifest()
	cfgDigest, _ := secret.ConfigName()

	for _, p := range []string{
		"/v2/acme/app/manifests/v1",
		"/v2/acme/app/manifests/" + digest.String(),
		"/v2/acme/app/tags/list",
		"/v2/acme/app/blobs/" + layer.String(),
		// The layer's digest through the attacker's own repository.
		"/v2/globex/steal/blobs/" + layer.String(),
	} {
		for _, m := range []string{http.MethodGet, http.MethodHead} {
			if code, body := call(t, srv, "globex", m, p, nil); code != http.StatusNotFound {
				t.Errorf("globex %s %s: status %d, want 404 (%s)", m, p, code, body)
			}
		}
	}
	// A manifest of its own naming acme's blobs gets nothing linked.
	code, body := call(t, srv, "globex", http.MethodPut, "/v2/globex/steal/manifests/v1", mf,
		"Content-Type", string(mustMediaType(t, secret)))
	if code != http.StatusNotFound || !strings.Contains(body, "MANIFEST_BLOB_UNKNOWN") {
		t.Errorf("globex pushes a manifest of acme's blobs: status %d %s, want 404 MANIFEST_BLOB_UNKNOWN", code, body)
	}
	if code, _ := call(t, srv, "globex", http.MethodGet, "/v2/globex/steal/blobs/"+cfgDigest.String(), nil); code != http.StatusNotFound {
		t.Errorf("acme's config through globex's repository: status %d", code)
	}
	if _, err := pullAs(srv, "globex", "acme/app:v1"); err == nil {
		t.Error("globex pulled acme/app:v1")
	}
	if got, err := pullAs(srv, "acme-ro", "acme/app:v1"); err != nil || got != digest {
		t.Errorf("acme's read-only token pulls: %v %v", got, err)
	}
	if err := pushAs(srv, "admin", "flame/demo-app:latest", secret); err != nil {
		t.Fatal(err)
	}
	for _, tok := range []string{"globex", "acme-ro", "flame-org"} {
		if _, err := pullAs(srv, tok, "flame/demo-app:latest"); err != nil {
			t.Errorf("%s pulls the public namespace: %v", tok, err)
		}
	}
}

func mustMediaType(t *testing.T, img v1.Image) string {
	t.Helper()
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	return string(mt)
}

// TestCatalogScoped: the catalog lists only what the token may pull.
func TestCatalogScoped(t *testing.T) {
	_, srv := start(t, t.TempDir(), orgAuth)
	img := randomImage(t)
	for tok, ref := range map[string]string{
		"acme": "acme/app:v1", "globex": "globex/secret-project:v1", "admin": "flame/demo-app:latest",
	} {
		if err := pushAs(srv, tok, ref, img); err != nil {
			t.Fatal(err)
		}
	}
	if err := pushAs(srv, "acme", "acme/team/api:v1", img); err != nil {
		t.Fatal(err)
	}
	list := func(tok, query string) ([]string, string) {
		t.Helper()
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/v2/_catalog"+query, nil)
		req.Header.Set("Authorization", "Bearer "+tok)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct{ Repositories []string }
		if err := json.NewDecoder(resp.Body).Decode(&out); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("catalog: %d %v", resp.StatusCode, err)
		}
		return out.Repositories, resp.Header.Get("Link")
	}
	for tok, want := range map[string][]string{
		"acme":    {"acme/app", "acme/team/api", "flame/demo-app"},
		"acme-ro": {"acme/app", "acme/team/api", "flame/demo-app"},
		"globex":  {"flame/demo-app", "globex/secret-project"},
		"admin":   {"acme/app", "acme/team/api", "flame/demo-app", "globex/secret-project"},
	} {
		if got, _ := list(tok, ""); !slices.Equal(got, want) {
			t.Errorf("%s's catalog: %v, want %v", tok, got, want)
		}
	}
	// Pages skip what the token may not see, and end where its list ends.
	got, link := list("globex", "?n=1")
	if !slices.Equal(got, []string{"flame/demo-app"}) || !strings.Contains(link, "last=flame%2Fdemo-app") {
		t.Errorf("first page: %v, link %q", got, link)
	}
	got, link = list("globex", "?n=1&last=flame/demo-app")
	if !slices.Equal(got, []string{"globex/secret-project"}) || link != "" {
		t.Errorf("second page: %v, link %q", got, link)
	}
}

// TestLinksMigrated: a registry written before blobs were linked to
// repositories serves, after a restart, the blobs each repository's
// manifests reference.
func TestLinksMigrated(t *testing.T) {
	dir := t.TempDir()
	_, srv := start(t, dir, nil)
	img := randomImage(t)
	if err := pushAs(srv, "", "acme/app:v1", img); err != nil {
		t.Fatal(err)
	}
	srv.Close()
	if err := os.RemoveAll(filepath.Join(dir, "repos", "acme", "app", "_layers")); err != nil {
		t.Fatal(err)
	}
	_, srv = start(t, dir, nil)
	r, _ := name.ParseReference(host(srv) + "/acme/app:v1")
	got, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := got.Layers()
	for _, l := range layers {
		rc, err := l.Compressed()
		if err != nil {
			t.Fatalf("layer after the restart: %v", err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatalf("layer after the restart: %v", err)
		}
		rc.Close()
	}
}
