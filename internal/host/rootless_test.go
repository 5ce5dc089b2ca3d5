package host

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Run by a user other than root, --driver auto is the rootless sandbox
// where the probe says the kernel allows it, else the exec driver (only
// where allowed), saying why.
func TestNewDriverRootlessChoice(t *testing.T) {
	file := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	broken := filepath.Join(file, "data") // no sandbox driver can be made here
	saved := probeRootless
	t.Cleanup(func() { probeRootless = saved })
	noUserns := errors.New("user namespaces disabled (probe)")

	probeRootless = func(string) error { return noUserns }
	d, kind, err := newDriver(DriverConfig{Kind: DriverAuto, DataDir: broken, AllowHostExec: true}, false)
	if err != nil || kind != DriverExec {
		t.Fatalf("probe failing, exec allowed: %q, %v; want the exec driver", kind, err)
	}
	closeDriver(d)
	_, kind, err = newDriver(DriverConfig{Kind: DriverAuto, DataDir: broken}, false)
	if !errors.Is(err, ErrHostExecNotAllowed) || !strings.Contains(err.Error(), noUserns.Error()) || kind != "" {
		t.Fatalf("probe failing, exec not allowed: %q, %v; want an error saying why", kind, err)
	}

	// The probe succeeding, auto is the sandbox, and only the sandbox: a
	// sandbox that cannot be made is an error, even with exec allowed.
	probeRootless = func(string) error { return nil }
	_, kind, err = newDriver(DriverConfig{Kind: DriverAuto, DataDir: broken, AllowHostExec: true}, false)
	if err == nil || kind != "" || !strings.Contains(err.Error(), "sandbox driver") {
		t.Fatalf("probe passing: %q, %v; want the sandbox driver's error", kind, err)
	}
}
