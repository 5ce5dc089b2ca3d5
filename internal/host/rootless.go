package host

import (
	"fmt"
	"os"

	"github.com/flamehq/flame/internal/driver/sandbox"
)

// RootlessNotice is what a program says when it runs the sandbox driver as
// a user other than root (NewDriver leaves saying it to its caller, once).
const RootlessNotice = "rootless sandbox: machines run from their images in user namespaces as the user running flame (root inside), " +
	"without memory, cpu or pids limits, reached on loopback addresses (127.x.y.z) at their services' and checks' ports, with no outbound network"

// probeRootless reports whether a user other than root can run rootless
// sandboxes with dataDir (see sandbox.ProbeRootless); a variable for tests.
var probeRootless = func(dataDir string) error {
	if dataDir == "" {
		return fmt.Errorf("rootless sandboxes: a data dir is required")
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return fmt.Errorf("rootless sandboxes: %w", err)
	}
	return sandbox.ProbeRootless("", dataDir)
}
