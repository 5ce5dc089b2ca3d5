package host

import (
	"os"
	"testing"

	"github.com/flamehq/flame/internal/driver/sandbox"
)

// TestMain lets the test binary be a sandbox's init, as the flame binary is.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == sandbox.InitCommand {
		os.Exit(sandbox.InitMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}
