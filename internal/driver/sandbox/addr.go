package sandbox

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
)

// maxAddrAttempts bounds the candidates tried for a machine's address.
const maxAddrAttempts = 256

// gatewayAddr is the bridge's address: the first host address of prefix.
func gatewayAddr(prefix netip.Prefix) netip.Addr { return prefix.Masked().Addr().Next() }

// machineIDBits decodes a Fly machine id (14 hex characters, 56 bits).
func machineIDBits(id string) (uint64, bool) {
	if len(id) != 14 {
		return 0, false
	}
	b, err := hex.DecodeString("00" + id)
	if err != nil {
		return 0, false
	}
	return binary.BigEndian.Uint64(b), true
}

// addrCandidate is the attempt-th address to try for machine id in prefix.
// Attempt 0 puts a Fly machine id (56 bits) in the low bits of the address
// when the prefix leaves room for it, so different machines never collide
// and a machine keeps its address; other ids and later attempts hash the id.
// The prefix's own address and the gateway are never candidates (ok false).
func addrCandidate(prefix netip.Prefix, id string, attempt int) (netip.Addr, bool) {
	if prefix.Addr().Is4() {
		return addrCandidate4(prefix, id, attempt)
	}
	prefix = prefix.Masked()
	hostBits := 128 - prefix.Bits()
	if hostBits < 2 || !prefix.Addr().Is6() {
		return netip.Addr{}, false
	}
	var host [16]byte
	if v, ok := machineIDBits(id); ok && attempt == 0 && hostBits >= 56 {
		binary.BigEndian.PutUint64(host[8:], v)
	} else {
		sum := sha256.Sum256(fmt.Appendf(nil, "%s/%d", id, attempt))
		copy(host[:], sum[:16])
		// Keep only the host bits.
		for i := range 16 {
			keep := hostBits - (128 - 8*(i+1))
			switch {
			case keep <= 0:
				host[i] = 0
			case keep < 8:
				host[i] &= byte(1<<keep - 1)
			}
		}
	}
	a := prefix.Addr().As16()
	for i := range 16 {
		a[i] |= host[i]
	}
	addr := netip.AddrFrom16(a)
	if addr == prefix.Addr() || addr == gatewayAddr(prefix) {
		return netip.Addr{}, false
	}
	return addr, true
}

// leases records which machine holds which address, so that addresses
// survive agent restarts and two machines never share one, whichever driver
// instance assigned them: addrs/<address> holds the machine id (created
// exclusively, which is the lock), machines/<id> the address.
type leases struct{ dir string }

func (l leases) init() error {
	for _, d := range []string{"addrs", "machines"} {
		if err := os.MkdirAll(filepath.Join(l.dir, d), 0o700); err != nil {
			return err
		}
	}
	return nil
}

func (l leases) addrPath(a netip.Addr) string {
	return filepath.Join(l.dir, "addrs", strings.ReplaceAll(a.String(), ":", "_"))
}

func (l leases) machinePath(id string) string {
	return filepath.Join(l.dir, "machines", id)
}

// acquire returns machine id's address in prefix, leasing a free one if it
// holds none.
func (l leases) acquire(prefix netip.Prefix, id string) (netip.Addr, error) {
	if a, ok := l.lookup(prefix, id); ok {
		return a, nil
	}
	for attempt := range maxAddrAttempts {
		a, ok := addrCandidate(prefix, id, attempt)
		if !ok {
			continue
		}
		err := createExclusive(l.addrPath(a), id)
		if errors.Is(err, os.ErrExist) {
			if holder, _ := os.ReadFile(l.addrPath(a)); string(holder) != id {
				continue
			}
			err = nil
		}
		if err != nil {
			return netip.Addr{}, fmt.Errorf("lease %s: %w", a, err)
		}
		if err := os.WriteFile(l.machinePath(id), []byte(a.String()), 0o644); err != nil {
			os.Remove(l.addrPath(a))
			return netip.Addr{}, fmt.Errorf("lease %s: %w", a, err)
		}
		return a, nil
	}
	return netip.Addr{}, fmt.Errorf("no free address in %s for machine %s", prefix, id)
}

// lookup returns the address machine id holds in prefix (any it holds, for
// the zero prefix), if any.
func (l leases) lookup(prefix netip.Prefix, id string) (netip.Addr, bool) {
	b, err := os.ReadFile(l.machinePath(id))
	if err != nil {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(string(b))
	if err != nil || (prefix.IsValid() && !prefix.Contains(a)) {
		return netip.Addr{}, false
	}
	if holder, err := os.ReadFile(l.addrPath(a)); err != nil || string(holder) != id {
		return netip.Addr{}, false
	}
	return a, true
}

// release frees the address machine id holds.
func (l leases) release(prefix netip.Prefix, id string) error {
	if a, ok := l.lookup(prefix, id); ok {
		if err := os.Remove(l.addrPath(a)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("release %s: %w", a, err)
		}
	}
	if err := os.Remove(l.machinePath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("release address of %s: %w", id, err)
	}
	return nil
}

// createExclusive creates path holding s; it fails with os.ErrExist when
// path exists.
func createExclusive(path, s string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = f.WriteString(s)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// vethName is the host side of machine id's veth pair: "f" and the machine
// id (IFNAMSIZ allows 15 characters), or a hash of ids of another shape.
func vethName(id string) string {
	if _, ok := machineIDBits(id); ok {
		return "f" + id
	}
	sum := sha256.Sum256([]byte(id))
	return "f" + hex.EncodeToString(sum[:7])
}
