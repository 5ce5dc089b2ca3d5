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

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// A driver makes things that are global to the machine it runs on, outside
// its state dir: a bridge, cgroup parents, a private network prefix (and so
// a route), veth pairs. Several Flames may run on one machine — a `flame
// dev` beside another, or beside the tests — so none of these names is
// fixed: each comes from an instance id, a random id kept in the state of
// whoever runs the driver (a `flame agent`'s data dir, or a `flame dev`'s for
// all its hosts). A driver restarted on the same state finds the same names,
// and so adopts its sandboxes; another state never shares them.
//
// The 6PN layout (internal/mesh/layout): an instance is a network, its 32
// bits the second and third groups of fdaa:<id hi16>:<id lo16>::/48, host
// index h of the instance is host number h+1 in it, and a machine of org o
// there has its address in fdaa:<id hi16>:<id lo16>:<o>:<h+1>::/80. Two
// instances share a prefix only when their whole ids are equal; New refuses
// a host of a network another driver on the machine holds or another link
// routes.
//
// State from before instance ids (a data dir whose sandbox state exists but
// which keeps no instance id) keeps the names it ran under — bridge
// flame<h>, cgroup parent flame-<h>, prefix fdaa:0:<h+1>::/64 — so that its
// sandboxes are adopted and its cgroups and bridge found: its instance id is
// LegacyInstance. Those prefixes never meet an instance's (whose fourth
// group is never 0).

// instanceFile holds the instance id in its directory.
const instanceFile = "instance-id"

// instanceIDLen is the length of an instance id: hex digits, 32 bits.
const instanceIDLen = 8

// LegacyInstance is the instance id of state made before instance ids:
// its names are the fixed ones of that time (see InstanceNames).
const LegacyInstance = "legacy"

// MaxHostIndex is the largest host number InstanceNames takes.
const MaxHostIndex = 9999

// LoadInstance returns the instance id kept in dir, making and keeping one
// on first use: LegacyInstance when dir holds sandbox state of a Flame from
// before instance ids (see legacyState), else a random id.
func LoadInstance(dir string) (string, error) {
	path := filepath.Join(dir, instanceFile)
	if id, err := readInstance(path); !errors.Is(err, os.ErrNotExist) && err != errEmptyInstance {
		return id, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	// Starts racing on one dir take turns; the file itself is only ever
	// linked into place whole, so a crash leaves either no id or one.
	unlock, err := lockDir(dir)
	if err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	defer unlock()
	id, err := readInstance(path)
	if err == errEmptyInstance {
		// What an earlier version left when it crashed between creating
		// the file and writing it: no driver ever ran under it.
		if err := os.Remove(path); err != nil {
			return "", fmt.Errorf("instance id: remove empty %s: %w", path, err)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		return id, err
	}
	id = LegacyInstance
	if !legacyState(dir) {
		var tok [instanceIDLen / 2]byte
		rand.Read(tok[:])
		id = hex.EncodeToString(tok[:])
	}
	if err := linkNew(path, id+"\n"); err != nil {
		if errors.Is(err, os.ErrExist) {
			return readInstance(path)
		}
		return "", fmt.Errorf("instance id: %w", err)
	}
	return id, nil
}

// errEmptyInstance is an instance file without an id.
var errEmptyInstance = errors.New("empty instance id")

// readInstance reads the instance id in path.
func readInstance(path string) (string, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	if err != nil {
		return "", fmt.Errorf("instance id: %w", err)
	}
	id := strings.TrimSpace(string(b))
	if id == "" {
		return "", errEmptyInstance
	}
	if !validInstance(id) {
		return "", fmt.Errorf("instance id in %s: %q is not %d hex digits", path, id, instanceIDLen)
	}
	return id, nil
}

// linkNew puts a file holding s at path, whole or not at all: written to
// a temporary file, synced, and linked to path, which fails with
// os.ErrExist when path exists (link(2) never replaces).
func linkNew(path, s string) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	_, err = f.WriteString(s)
	if err == nil {
		err = f.Chmod(0o644)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if err := os.Link(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// lockDir takes an exclusive lock of dir (flock), waiting for it.
func lockDir(dir string) (unlock func(), err error) {
	d, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(d.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return func() { d.Close() }, nil
}

// legacyState reports whether dir holds the sandbox state of a Flame from
// before instance ids: the address leases a driver makes when it starts
// (and where its machines' addresses are), in dir itself (a driver's state
// dir), in dir/sandbox (an agent's data dir) or in dir/<host>/sandbox (a
// dev cluster's). A driver of today keeps its instance id before it makes
// any of them.
func legacyState(dir string) bool {
	dirs := []string{filepath.Join(dir, "leases"), filepath.Join(dir, "sandbox", "leases")}
	hosts, _ := filepath.Glob(filepath.Join(dir, "*", "sandbox", "leases"))
	for _, d := range append(dirs, hosts...) {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			return true
		}
	}
	return false
}

func validInstance(id string) bool {
	if id == LegacyInstance {
		return true
	}
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
	Bridge       string // "fl<instance>-<host>": at most 15 characters (IFNAMSIZ)
	CgroupParent string // "flame-<instance>-<host>"
	// Network is the instance id's 32 bits, Host the host index + 1: the
	// host's place in the private network (see internal/mesh/layout).
	Network layout.Network
	Host    layout.Host
	// HostPrefix is the one prefix of a legacy instance's host (no
	// Network): fdaa:0:<host+1>::/64.
	HostPrefix netip.Prefix
}

// InstanceNames returns the names of host number host (0 to MaxHostIndex)
// of an instance: its hosts share the 6PN network fdaa:<instance>::/48 (the
// instance id's 32 bits; an id of zeros is no network), host h is number
// h+1 in it, and its machines have addresses in their orgs' networks (see
// internal/mesh/layout). The hosts of LegacyInstance have the names of
// before instance ids: flame<host>, flame-<host> and one prefix,
// fdaa:0:<host+1>::/64, for all their machines.
func InstanceNames(instance string, host int) (Names, error) {
	if !validInstance(instance) {
		return Names{}, fmt.Errorf("instance id %q: want %d hex digits", instance, instanceIDLen)
	}
	if host < 0 || host > MaxHostIndex {
		return Names{}, fmt.Errorf("host index %d: want 0 to %d", host, MaxHostIndex)
	}
	n := strconv.Itoa(host)
	if instance == LegacyInstance {
		prefix, err := netip.ParsePrefix(fmt.Sprintf("fdaa:0:%x::/64", host+1))
		if err != nil {
			return Names{}, err
		}
		return Names{Bridge: "flame" + n, CgroupParent: "flame-" + n, HostPrefix: prefix}, nil
	}
	network, err := layout.ParseNetwork(instance)
	if err != nil {
		return Names{}, fmt.Errorf("instance id %q: %w", instance, err)
	}
	return Names{Bridge: "fl" + instance + "-" + n, CgroupParent: "flame-" + instance + "-" + n,
		Network: network, Host: layout.Host(host + 1)}, nil
}
