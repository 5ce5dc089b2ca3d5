package server

import (
	"os"
	"path/filepath"
	"testing"
)

// TestServerIDKept: a plane's id survives its restart, so that after a
// crash it finds its own reconciler lock and carries on with it.
func TestServerIDKept(t *testing.T) {
	path := filepath.Join(t.TempDir(), "server-id")
	a, err := serverID(path)
	if err != nil || a == "" {
		t.Fatalf("serverID: %q %v", a, err)
	}
	b, err := serverID(path)
	if err != nil || b != a {
		t.Fatalf("serverID again: %q %v, want %q", b, err, a)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("server-id file: %v %v", fi.Mode(), err)
	}
	if err := os.WriteFile(path, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := serverID(path); err == nil {
		t.Fatal("an empty server id accepted")
	}
}
