package host

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/flamehq/flame/internal/driver"
)

// The driver fails closed: no kind falls back to host processes, and the
// exec driver runs only where it was allowed.
func TestNewDriverFailsClosed(t *testing.T) {
	// A data dir below a file: the sandbox driver cannot be made there,
	// as root or not.
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	broken := filepath.Join(file, "data")
	for _, tc := range []struct {
		name     string
		cfg      DriverConfig
		root     bool
		wantKind string // "" when an error is wanted
		wantErr  error
	}{
		{"auto as root, no sandbox", DriverConfig{Kind: DriverAuto, DataDir: broken}, true, "", nil},
		{"auto as root, no sandbox, exec allowed", DriverConfig{Kind: DriverAuto, DataDir: broken, AllowHostExec: true}, true, "", nil},
		{"empty kind as root, no sandbox", DriverConfig{DataDir: broken, AllowHostExec: true}, true, "", nil},
		{"auto not root", DriverConfig{Kind: DriverAuto, DataDir: broken}, false, "", ErrHostExecNotAllowed},
		{"auto not root, allowed", DriverConfig{Kind: DriverAuto, DataDir: broken, AllowHostExec: true}, false, DriverExec, nil},
		{"exec as root", DriverConfig{Kind: DriverExec}, true, "", ErrHostExecNotAllowed},
		{"exec not root", DriverConfig{Kind: DriverExec}, false, "", ErrHostExecNotAllowed},
		{"exec allowed", DriverConfig{Kind: DriverExec, AllowHostExec: true}, true, DriverExec, nil},
		{"sandbox, none", DriverConfig{Kind: DriverSandbox, DataDir: broken, AllowHostExec: true}, true, "", nil},
		{"unknown", DriverConfig{Kind: "vm", AllowHostExec: true}, true, "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, kind, err := newDriver(tc.cfg, tc.root)
			if tc.wantKind != "" {
				if err != nil || kind != tc.wantKind {
					t.Fatalf("got %q, %v; want %q", kind, err, tc.wantKind)
				}
				closeDriver(d)
				return
			}
			if err == nil {
				closeDriver(d)
				t.Fatalf("got a %s driver, want an error", kind)
			}
			if kind != "" {
				t.Errorf("kind %q with error %v", kind, err)
			}
			if tc.wantErr != nil && !errors.Is(err, tc.wantErr) {
				t.Errorf("error %v, want %v", err, tc.wantErr)
			}
		})
	}
}

func closeDriver(d driver.Driver) {
	if c, ok := d.(io.Closer); ok {
		c.Close()
	}
}
