package cli

import (
	"encoding/json"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/flamehq/flame/internal/image/registry"
)

// TestImageBuildAndList builds a directory into an image, pushes it to a real
// registry and lists it, through the commands as a user runs them.
func TestImageBuildAndList(t *testing.T) {
	reg, err := registry.New(registry.Config{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(reg)
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")

	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "app"), []byte("#!/bin/sh\necho hi\n"), 0o755)
	code, _, stderr := run("image", "build", dir, "--name", "demo:v1", "--entrypoint", "/app", "--registry", addr)
	if code != 0 {
		t.Fatalf("build: exit %d: %s", code, stderr)
	}
	code, out, stderr := run("image", "ls", "--json", "--registry", addr)
	if code != 0 {
		t.Fatalf("ls: exit %d: %s", code, stderr)
	}
	var listing []map[string]any
	if err := json.Unmarshal([]byte(out), &listing); err != nil || len(listing) != 1 {
		t.Fatalf("ls --json = %s (%v)", out, err)
	}
	if !strings.Contains(out, "demo") || !strings.Contains(out, "v1") || !strings.Contains(out, "sha256:") {
		t.Errorf("listing lacks repository, tag or digest: %s", out)
	}

	// Bad input: a directory that is not there, a file that is not an image.
	if code, _, stderr := run("image", "build", filepath.Join(dir, "nope"), "--name", "x", "--entrypoint", "/x", "--registry", addr); code != 1 || stderr == "" {
		t.Errorf("build of a missing dir: exit %d %q", code, stderr)
	}
	bogus := filepath.Join(dir, "bogus.tar")
	os.WriteFile(bogus, []byte("not a tarball"), 0o644)
	if code, _, stderr := run("image", "import", bogus, "--name", "x", "--registry", addr); code != 1 || stderr == "" {
		t.Errorf("import of garbage: exit %d %q", code, stderr)
	}
	if code, _, _ := run("image", "build"); code != 2 {
		t.Errorf("build without a dir: exit %d, want 2", code)
	}
}
