package image

import (
	"context"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// TestLocalImageOnlyFromItsRepository: an image already on the host is
// taken by digest without the registry only for the repository it was
// pulled from; named by its digest under another repository (or another
// registry), the registry is asked, so knowing a digest is not having the
// image.
func TestLocalImageOnlyFromItsRepository(t *testing.T) {
	reg := newTestRegistry(t)
	img := imageOf(t, v1.Config{Cmd: []string{"/app"}}, layerOf(t, tarEntry{name: "app", body: "acme's code"}))
	digest := push(t, img, reg.host+"/acme/app:v1")
	s := newTestStore(t)
	ctx := context.Background()
	if _, err := s.Pull(ctx, reg.host+"/acme/app:v1"); err != nil {
		t.Fatal(err)
	}
	reg.srv.Close()
	if _, err := s.Pull(ctx, reg.host+"/acme/app@"+digest); err != nil {
		t.Errorf("by digest from its repository, registry down: %v", err)
	}
	for _, ref := range []string{
		reg.host + "/globex/steal@" + digest,
		"registry.invalid:5000/acme/app@" + digest,
	} {
		if _, err := s.Pull(ctx, ref); err == nil {
			t.Errorf("pull of %s took the local image", ref)
		}
	}
	if _, err := s.PullAnonymous(ctx, reg.host+"/acme/app@"+digest); err == nil {
		t.Error("an anonymous pull took the local image")
	}
}
