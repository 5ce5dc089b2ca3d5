package host

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// placeFile keeps, in a host's data dir, the private network's numbers its
// enrollment gave it.
const placeFile = "mesh-place.json"

type meshPlace struct {
	Network string `json:"network"`
	Host    int    `json:"host"`
}

// savePlace keeps what enrollment gave; a control plane that gave nothing
// leaves nothing.
func savePlace(dataDir, network string, hostNumber int) error {
	if network == "" && hostNumber == 0 {
		return nil
	}
	if _, err := layout.ParseNetwork(network); err != nil || hostNumber < 1 || hostNumber > 0xffff {
		return fmt.Errorf("enroll: private network %q host %d: not a place in a network", network, hostNumber)
	}
	b, _ := json.Marshal(meshPlace{Network: network, Host: hostNumber})
	return atomicfile.Write(filepath.Join(dataDir, placeFile), b, "") // 0600, as CreateTemp makes it
}

// LoadPlace is the cluster's network and this host's number in it, as its
// enrollment gave them; ok is false for a host never enrolled (or
// enrolled by a control plane that gave none).
func LoadPlace(dataDir string) (network layout.Network, hostNumber layout.Host, ok bool, err error) {
	b, err := os.ReadFile(filepath.Join(dataDir, placeFile))
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, false, nil
	}
	if err != nil {
		return 0, 0, false, fmt.Errorf("private network place: %w", err)
	}
	var p meshPlace
	if err := json.Unmarshal(b, &p); err != nil {
		return 0, 0, false, fmt.Errorf("private network place %s: %w", placeFile, err)
	}
	n, err := layout.ParseNetwork(p.Network)
	if err != nil || p.Host < 1 || p.Host > 0xffff {
		return 0, 0, false, fmt.Errorf("private network place %s: network %q host %d", placeFile, p.Network, p.Host)
	}
	return n, layout.Host(p.Host), true, nil
}
