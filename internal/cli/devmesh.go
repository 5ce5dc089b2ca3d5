package cli

import (
	"os"

	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// devMesh is the private network between a dev cluster's hosts: with
// sandboxes (as root, an instance of its own), a WireGuard tunnel between
// every two hosts over the simulated network; with the exec driver, or
// state from before instance ids, none (machines are host processes on
// one loopback, or keep the layout they ran under).
func devMesh(instance, driverKind string) (*devcluster.MeshConfig, error) {
	if instance == "" || instance == sandbox.LegacyInstance || driverKind == host.DriverExec || os.Geteuid() != 0 {
		return nil, nil
	}
	network, err := layout.ParseNetwork(instance)
	if err != nil {
		return nil, err
	}
	return &devcluster.MeshConfig{
		Network:  network,
		Instance: instance,
		Bridge: func(index int) string {
			n, _ := sandbox.InstanceNames(instance, index)
			return n.Bridge
		},
	}, nil
}
