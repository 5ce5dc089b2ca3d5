package sandbox

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// Every sandbox has a user namespace of its own: its uids and gids 0 to
// 65535 are, outside, a range of the host's ids that nothing else on the
// host uses, so root inside is an unprivileged user outside, whose
// capabilities hold only over the sandbox's namespaces and the files of
// its root filesystem.
//
// Ranges are leased host-wide, not per driver: several Flames may run on
// one machine, and none may share a range. A lease is a file named for the
// range's first id under idLeaseDir, created exclusively (O_EXCL), holding
// who took it ("<state dir>\t<machine or spare>"); it is removed when the
// range is given back. Ranges are chosen at random among idSlots, so that
// drivers rarely try the same one, and a range taken is tried again
// elsewhere. The leases are on /run (a tmpfs): a reboot, which ends every
// sandbox, ends them too. A range outlives the driver that took it, as a
// sandbox outlives its agent: the machine's is recorded under the state
// dir (ids/<machine>) until Cleanup gives it back, after the sandbox's
// last process ended. A spare's is taken with the spare; the start that
// claims the spare makes it the machine's; a spare discarded gives it
// back, and New gives back the ranges of its state dir's spares that a
// driver which died left (their inits end when their start socket closes).

// idRangeSize is how many ids a sandbox has: 0 to 65535 inside.
const idRangeSize = 1 << 16

// The ranges: slot s is ids s<<16 to s<<16+65535. Slots below idFirstSlot
// (ids under 16M) are left to the host (its users, and the subordinate
// ranges of /etc/subuid, which start at 100000); the last slot would reach
// id 2^32-1, which means "no id".
const (
	idFirstSlot = 256
	idLastSlot  = 1<<16 - 2
)

// idLeaseDir holds the host's id range leases.
var idLeaseDir = filepath.Join(prefixLockDir, "ids")

// idLeaseName names the lease file of the range whose first host id is base.
func idLeaseName(base uint32) string { return strconv.FormatUint(uint64(base), 10) }

// allocIDs leases a free range for owner (a machine id or a spare's name)
// and returns its first host id.
func (d *Driver) allocIDs(owner string) (uint32, error) {
	if err := os.MkdirAll(idLeaseDir, 0o700); err != nil {
		return 0, fmt.Errorf("id range: %w", err)
	}
	content := d.cfg.StateDir + "\t" + owner + "\n"
	for range 128 {
		var b [4]byte
		rand.Read(b[:])
		slot := idFirstSlot + binary.LittleEndian.Uint32(b[:])%(idLastSlot-idFirstSlot+1)
		base := slot << 16
		f, err := os.OpenFile(filepath.Join(idLeaseDir, idLeaseName(base)), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, os.ErrExist) {
			continue
		}
		if err != nil {
			return 0, fmt.Errorf("id range: %w", err)
		}
		_, err = f.WriteString(content)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			os.Remove(f.Name())
			return 0, fmt.Errorf("id range: %w", err)
		}
		return base, nil
	}
	return 0, errors.New("id range: no free range found")
}

// releaseIDs gives back the range at base, if this driver's state dir
// holds it.
func (d *Driver) releaseIDs(base uint32) error {
	path := filepath.Join(idLeaseDir, idLeaseName(base))
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("release id range %d: %w", base, err)
	}
	if dir, _, _ := strings.Cut(string(b), "\t"); dir != d.cfg.StateDir {
		return nil // another driver's since
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("release id range %d: %w", base, err)
	}
	return nil
}

// idRecord is where the machine's range is recorded.
func (d *Driver) idRecord(machine string) string {
	return filepath.Join(d.cfg.StateDir, "ids", machine)
}

// assignIDs records base, leased for a spare or for the machine, as the
// machine's range.
func (d *Driver) assignIDs(machine string, base uint32) error {
	if err := os.MkdirAll(filepath.Join(d.cfg.StateDir, "ids"), 0o700); err != nil {
		return fmt.Errorf("id range: %w", err)
	}
	lease := filepath.Join(idLeaseDir, idLeaseName(base))
	if err := os.WriteFile(lease+".tmp", []byte(d.cfg.StateDir+"\t"+machine+"\n"), 0o600); err == nil {
		os.Rename(lease+".tmp", lease)
	}
	rec := d.idRecord(machine)
	if err := os.WriteFile(rec+".tmp", []byte(idLeaseName(base)+"\n"), 0o600); err != nil {
		return fmt.Errorf("id range: %w", err)
	}
	if err := os.Rename(rec+".tmp", rec); err != nil {
		return fmt.Errorf("id range: %w", err)
	}
	return nil
}

// machineIDs is the range recorded for machine.
func (d *Driver) machineIDs(machine string) (uint32, bool) {
	b, err := os.ReadFile(d.idRecord(machine))
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 32)
	return uint32(v), err == nil
}

// releaseMachineIDs gives back machine's range once none of its sandbox's
// processes is left.
func (d *Driver) releaseMachineIDs(machine string) error {
	base, ok := d.machineIDs(machine)
	if !ok {
		return nil
	}
	if err := d.releaseIDs(base); err != nil {
		return err
	}
	if err := os.Remove(d.idRecord(machine)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("id range: %w", err)
	}
	return nil
}

// sweepSpareIDs gives back the ranges of this state dir's spares that a
// driver which died left, and those of state dirs that no longer exist.
func (d *Driver) sweepSpareIDs() {
	es, _ := os.ReadDir(idLeaseDir)
	for _, e := range es {
		path := filepath.Join(idLeaseDir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		dir, owner, _ := strings.Cut(strings.TrimSpace(string(b)), "\t")
		_, serr := os.Stat(dir)
		switch {
		case dir == d.cfg.StateDir && strings.HasPrefix(owner, sparePrefix):
			os.Remove(path)
		case errors.Is(serr, os.ErrNotExist) && filepath.IsAbs(dir):
			// A driver whose state is gone (a dev cluster's, removed
			// with its machines) left it.
			os.Remove(path)
		}
	}
}

// idMappings are the uid and gid maps of a sandbox whose range starts at
// base.
func idMappings(base uint32) []syscall.SysProcIDMap {
	return []syscall.SysProcIDMap{{ContainerID: 0, HostID: int(base), Size: idRangeSize}}
}

// makeStatusDir makes the machine's statusDir anew, owned by the root of
// the sandbox whose range starts at ids.
func makeStatusDir(dir string, ids uint32) error {
	p := filepath.Join(dir, statusDir)
	if err := os.RemoveAll(p); err != nil {
		return err
	}
	if err := os.Mkdir(p, 0o700); err != nil {
		return err
	}
	return os.Lchown(p, int(ids), int(ids))
}
