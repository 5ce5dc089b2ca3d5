package sandbox

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/flamehq/flame/internal/leftover"
)

// A driver makes things outside its state that a process killed leaves
// behind: its bridge (and the veths of its machines), its cgroup parents
// (and the machines running in them), its packet filter's tables, the
// machines' writable layers mounted in the host's mount namespace, its
// prefix's lock file, and the host's IPv6 forwarding switched on. So that
// a `flame dev` or `flame agent` SIGKILLed leaves nothing for good, each
// driver keeps a record of them (internal/leftover) under
// leftover.DefaultDir while it lives, and New first sweeps what the dead
// owners of other records left — never the records of a live process, nor
// those of its own network (its own earlier run's, which it adopts).

// recordDir is where drivers keep their records.
var recordDir = leftover.DefaultDir

// recordGroup is what a driver's record is kept for: its network (the
// instance's, shared by all its hosts). The drivers of legacy layouts,
// whose hosts share no network, are one group: they never sweep one
// another's records (a dev cluster's hosts would sweep one another's last
// run before adopting it).
func recordGroup(cfg Config) string {
	if cfg.Network != 0 {
		return leftover.NetworkGroup(cfg.Network.String())
	}
	return LegacyInstance
}

// sweepLeftovers removes what dead Flames' drivers and mesh links left.
func sweepLeftovers(cfg Config, log *slog.Logger) {
	leftover.Sweep(recordDir, recordGroup(cfg), log.With("component", "driver/sandbox"))
}

// openRecord takes the driver's record and names in it what the driver
// makes for all its machines.
func openRecord(cfg Config, cg *cgroups, prefixLock *os.File) (*leftover.Record, error) {
	rec, err := leftover.Open(recordDir, "sandbox-"+cfg.Bridge, recordGroup(cfg))
	if err != nil {
		return nil, err
	}
	things := []leftover.Thing{leftover.Link(cfg.Bridge, "bridge"), leftover.LockFile(prefixLock.Name())}
	if cfg.Network != 0 {
		things = append(things, leftover.NFTable("bridge", filterTable(cfg.Bridge)), leftover.NFTable("inet", filterTable(cfg.Bridge)))
	}
	for _, r := range cg.roots {
		things = append(things, leftover.Cgroup(r))
	}
	if err := rec.Add(things...); err != nil {
		rec.Close()
		return nil, fmt.Errorf("record: %w", err)
	}
	return rec, nil
}

// recordMount names a machine's writable layer in the record, before it is
// mounted; forgetMount once it is unmounted. A rootless driver keeps no
// record: what it makes lives in its own namespaces and the user's dirs.
func (d *Driver) recordMount(dir string) error {
	if d.record == nil {
		return nil
	}
	return d.record.Add(leftover.Mount(dir))
}

func (d *Driver) forgetMount(dir string) {
	if d.record != nil {
		d.record.Drop(leftover.Mount(dir))
	}
}

// enableForwarding turns the host's IPv6 forwarding on while the driver
// lives (see leftover.Record.Forwarding): machines' packets to the world
// (masqueraded, see filter.go) and to other hosts are routed by the host.
func (d *Driver) enableForwarding() error {
	if err := d.record.Forwarding(d.logger); err != nil {
		return fmt.Errorf("enable IPv6 forwarding: %w", err)
	}
	return nil
}
