package lockfile

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestOneHolder: a lock file is held by one at a time, and is gone once its
// holder lets go.
func TestOneHolder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "claim.lock")
	a, err := Take(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Take(path); err != unix.EWOULDBLOCK {
		t.Fatalf("a second lock of a held file: %v, want EWOULDBLOCK", err)
	}
	Release(a)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("lock file after release: %v", err)
	}
	b, err := Take(path)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	Release(b)
}
