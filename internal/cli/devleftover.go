package cli

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"

	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/leftover"
)

// devLeftovers, as root, sweeps what dead Flames left on the host (see
// internal/leftover; each sandbox driver's start does too, this covers a
// dev cluster of the exec driver) and keeps a record of a temporary data
// dir, so that a `flame dev` killed has it removed (image layers, the
// registry's blobs) by the next Flame to start here. done removes the
// data dir, then closes the record.
func devLeftovers(instance, dataDir string, temporary bool, log *slog.Logger) (done func(), err error) {
	if os.Geteuid() != 0 {
		return func() {}, nil
	}
	group := leftover.NetworkGroup(instance) // its sandbox drivers' and mesh links' group
	switch instance {
	case "":
		group = "dev " + strconv.Itoa(os.Getpid())
	case sandbox.LegacyInstance:
		group = sandbox.LegacyInstance
	}
	leftover.Sweep(leftover.DefaultDir, group, log)
	if !temporary {
		return func() {}, nil
	}
	rec, err := leftover.Open(leftover.DefaultDir, "dev-"+filepath.Base(dataDir), group)
	if err != nil {
		return nil, err
	}
	if err := rec.Add(leftover.Dir(dataDir)); err != nil {
		rec.Close()
		return nil, err
	}
	return func() {
		os.RemoveAll(dataDir)
		rec.Close()
	}, nil
}
