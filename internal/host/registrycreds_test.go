package host

import (
	"context"
	"errors"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/image/registry"
)

// TestHostCredentialsOnlyForNamesItQualifies: the host sends its
// credentials to the platform registry only with image names it qualified
// itself (those the control plane checked against the machine's org). A
// name that spells the registry out — under an alias the control plane does
// not know — is pulled as anyone would, and is refused, even when the image
// is already on the host.
func TestHostCredentialsOnlyForNamesItQualifies(t *testing.T) {
	reg, err := registry.New(registry.Config{Dir: t.TempDir(),
		Auth: func(_ context.Context, tok string) (registry.Scope, error) {
			if tok == "hosts-secret" {
				return registry.Scope{Admin: true}, nil
			}
			return registry.Scope{}, registry.ErrUnauthorized
		}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	t.Cleanup(srv.Close)
	regAddr := strings.TrimPrefix(srv.URL, "http://")

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "hello"), []byte("acme's code"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := image.Build(context.Background(), image.BuildSpec{Dir: dir, Entrypoint: []string{"/hello"}})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	digest, err := image.Push(context.Background(), img, regAddr+"/acme/app:v1", image.Remote{Token: "hosts-secret"})
	if err != nil {
		t.Fatal(err)
	}
	store, err := image.NewStore(image.StoreConfig{Dir: t.TempDir(), Auth: func(r string) string {
		if r == regAddr {
			return "hosts-secret"
		}
		return ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	d := defaultRegistry{store, regAddr}
	ctx := context.Background()
	if _, err := d.Pull(ctx, "acme/app@"+digest); err != nil {
		t.Fatalf("a name the host qualifies: %v", err)
	}
	for _, ref := range []string{
		regAddr + "/acme/app@" + digest, // already on the host
		regAddr + "/acme/app:v1",
		"localhost:" + regAddr[strings.LastIndexByte(regAddr, ':')+1:] + "/acme/app:v1", // an alias

	} {
		if _, err := d.Pull(ctx, ref); !errors.Is(err, image.ErrUnauthorized) {
			t.Errorf("pull of %s: %v, want ErrUnauthorized", ref, err)
		}
	}
}
