package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// A driver makes things that are global to the machine it runs on, outside
// its state dir: a bridge, cgroup parents, a private network prefix (and so
// a route), veth pairs. Several Flames may run on one machine — a `flame
// dev` beside another, or beside the tests — so none of these names is
// fixed: each comes from an instance id, a random id kept in the state of
// whoever runs the driver (a `flame agent`'s data dir, or a `flame dev`'s for
// all its hosts). A driver restarted on the same state finds the same names,
// and so adopts its sandboxes; another state never shares them.

// instanceFile holds the instance id in its directory.
const instanceFile = "instance-id"

// instanceIDLen is the length of an instance id: hex digits, 32 bits.
const instanceIDLen = 8

// MaxHostIndex is the largest host number InstanceNames takes.
const MaxHostIndex = 9999

// LoadInstance returns the instance id kept in dir, making and keeping a
// random one on first use.
func LoadInstance(dir string) (string, error) {
	path := filepath.Join(dir, instanceFile)
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if !validInstance(id) {
			return "", fmt.Errorf("instance id in %s: %q is not %d hex digits", path, id, instanceIDLen)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("instance id: %w", err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	var tok [instanceIDLen / 2]byte
	rand.Read(tok[:])
	id := hex.EncodeToString(tok[:])
	// Created exclusively: of two starts racing on one dir, the second
	// reads the first's id.
	if err := createExclusive(path, id+"\n"); err != nil {
		if errors.Is(err, os.ErrExist) {
			return LoadInstance(dir)
		}
		return "", fmt.Errorf("instance id: %w", err)
	}
	return id, nil
}

func validInstance(id string) bool {
	if len(id) != instanceIDLen {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// Names are the machine-global names of one driver.
type Names struct {
	Bridge       string       // "fl<instance>-<host>": at most 15 characters (IFNAMSIZ)
	CgroupParent string       // "flame-<instance>-<host>"
	HostPrefix   netip.Prefix // fdaa:<network>:<host+1>::/64, the network from the instance
}

// InstanceNames returns the names of host number host (0 to MaxHostIndex)
// of an instance: its hosts share the 6PN network (the instance's first 16
// bits), each has a prefix of its own in it.
func InstanceNames(instance string, host int) (Names, error) {
	if !validInstance(instance) {
		return Names{}, fmt.Errorf("instance id %q: want %d hex digits", instance, instanceIDLen)
	}
	if host < 0 || host > MaxHostIndex {
		return Names{}, fmt.Errorf("host index %d: want 0 to %d", host, MaxHostIndex)
	}
	network, _ := strconv.ParseUint(instance[:4], 16, 16)
	prefix, err := netip.ParsePrefix(fmt.Sprintf("fdaa:%x:%x::/64", network, host+1))
	if err != nil {
		return Names{}, err
	}
	n := strconv.Itoa(host)
	return Names{Bridge: "fl" + instance + "-" + n, CgroupParent: "flame-" + instance + "-" + n, HostPrefix: prefix}, nil
}
