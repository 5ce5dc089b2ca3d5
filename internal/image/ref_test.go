package image

import (
	"strings"
	"testing"

	"github.com/flamehq/flame/api"
)

// TestParserAcceptsWhatTheAPIAccepts: every image reference the API lets
// through parses here, so a create refused for its image is refused at
// the door, not after placement.
func TestParserAcceptsWhatTheAPIAccepts(t *testing.T) {
	for _, ref := range []string{
		"nginx", "nginx:1.25", "library/nginx", "flame/demo-app", "registry.example:5000/team/app:v1",
		"localhost:5000/x", "127.0.0.1:5000/a/b:c", "ghcr.io/o/r@sha256:" + strings.Repeat("ab", 32),
		"ghcr.io/o/r:v1@sha256:" + strings.Repeat("0", 64), "a__b/c-d.e_f:V_1.2-3", "Registry.Example/x",
	} {
		if err := api.CheckImageRef(ref); err != nil {
			t.Errorf("the API refuses %q: %v", ref, err)
		}
		if _, err := parseRef(ref); err != nil {
			t.Errorf("the API accepts %q, the store does not: %v", ref, err)
		}
	}
	// An exec image is the exec driver's: the store (and so the sandbox
	// driver) refuses it.
	if _, err := parseRef(api.ExecImagePrefix + "/bin/sh"); err == nil {
		t.Error("the store accepts an exec image")
	}
	for _, ref := range []string{"UPPER::bad@@ref", "Nginx", "nginx:"} {
		if _, err := parseRef(ref); err == nil {
			t.Errorf("the store accepts %q", ref)
		}
		if api.CheckImageRef(ref) == nil {
			t.Errorf("the API accepts %q", ref)
		}
	}
}

// FuzzImageRefAgreement: whatever reference the API accepts (other than an
// exec image, which is the exec driver's), the store's parser accepts too.
func FuzzImageRefAgreement(f *testing.F) {
	for _, s := range []string{"nginx", "a/b:c", "localhost:5000/x@sha256:" + strings.Repeat("0", 64), "UPPER::bad@@ref", "exec:/bin/sh"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ref string) {
		if api.CheckImageRef(ref) != nil || strings.HasPrefix(ref, api.ExecImagePrefix) {
			return
		}
		if _, err := parseRef(ref); err != nil {
			t.Fatalf("the API accepts %q, the store does not: %v", ref, err)
		}
	})
}
