package proccluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// flameBin is the flame binary Main built; "" until then.
var flameBin string

// BinEnv names a flame binary Main uses instead of building one: for a test
// that runs its own test binary again as a child.
const BinEnv = "FLAME_PROCCLUSTER_BIN"

// Bin returns the flame binary Main built ("" when it built none).
func Bin() string { return flameBin }

// Main is the TestMain of a package whose tests use clusters: as root it
// sweeps what dead runs left behind and builds the flame binary once into
// a temporary directory, then runs the tests and removes the binary. As
// another user it only runs the tests (New skips).
func Main(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		return m.Run()
	}
	if err := Sweep(); err != nil {
		fmt.Fprintf(os.Stderr, "proccluster: sweeping leftovers of dead runs: %v\n", err)
	}
	if bin := os.Getenv(BinEnv); bin != "" {
		flameBin = bin // a test binary run by a test of this package
		return m.Run()
	}
	dir, err := os.MkdirTemp("", pidName(os.Getpid())+"bin")
	if err != nil {
		fmt.Fprintf(os.Stderr, "proccluster: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "flame")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/flamehq/flame/cmd/flame").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "proccluster: build flame: %v\n%s", err, out)
		return 1
	}
	flameBin = bin
	return m.Run()
}
