package sandbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Starting an init costs milliseconds that have nothing to do with the
// machine: the flame binary's runtime and package initialization, the
// sandbox's network namespace and veth pair, and on cgroup v1 the move of
// the init into a cgroup, which waits for an RCU grace period. So the driver
// keeps one spare init, started ahead of time in new namespaces and in a
// spare cgroup of its own, with its network connected but for the machine's
// name and address (see sandboxNet), blocked reading its configuration from
// its start socket. Nothing about a machine reaches it before then: its
// stdio is /dev/null, and what it needs of the host (the machine's log,
// directory, OOM counter and root filesystem, mounted after the spare's
// mount namespace was made) comes over the socket as file descriptors (see
// sendFiles).
//
// Start takes the spare and makes its cgroup the machine's: on v1 the spare
// cgroup is renamed (the spare was moved into it when it was made); on v2,
// where cgroups cannot be renamed, the spare is born in its cgroup (clone3
// with CLONE_INTO_CGROUP) and moved into the machine's while the sandbox is
// set up. The next spare is made once that start is over, successful or
// not, so that making it does not compete with the start for the CPU and
// the kernel's cgroup and network locks; a start that finds the spare still
// being made waits for it a moment. A spare that dies is replaced; when
// none is ready, Start starts an init of its own, as the spare would have
// been started.

// sparePrefix names spare cgroups, spareLinkPrefix the host end of a
// spare's veth pair (15 characters in all with the spare's 12 hex digits,
// and never a machine's "f<14 hex digits>").
const (
	sparePrefix     = "spare-"
	spareLinkPrefix = "fsp"
)

// spareRecheck is how often an unclaimed spare is checked for life.
const spareRecheck = time.Second

// spareWait bounds how long a start waits for a spare being made.
const spareWait = 50 * time.Millisecond

type spare struct {
	cgroup string // the spare cgroup, until Start renames it (v1)
	ids    uint32 // the spare's id range, until a start makes it the machine's
	init   *initProc
	net    *sandboxNet

	done     chan struct{} // closed by release
	released sync.Once
}

// release tells the driver the start that took sp is over, successful or
// not: the next spare can be made.
func (sp *spare) release() { sp.released.Do(func() { close(sp.done) }) }

// keepSpares makes spares one after another, each handed to the Start that
// takes it, until the driver closes.
func (d *Driver) keepSpares() {
	defer d.wg.Done()
	backoff := 100 * time.Millisecond
	for {
		d.making.Store(true)
		sp, err := d.makeSpare()
		if err != nil {
			d.making.Store(false)
			d.logger.Warn("make spare init; starts will start their own", "err", err)
			select {
			case <-d.stop:
				return
			case <-time.After(backoff):
				backoff = min(2*backoff, 30*time.Second)
				continue
			}
		}
		backoff = 100 * time.Millisecond
		d.idle.Store(sp)
	offer:
		for {
			select {
			case d.spares <- sp:
				break offer
			case <-d.stop:
				d.idle.Store(nil)
				d.discardSpare(sp)
				return
			case <-time.After(spareRecheck):
				if !sp.init.alive() {
					d.logger.Warn("spare init died; replacing it", "pid", sp.init.h.Pid)
					d.idle.Store(nil)
					d.discardSpare(sp)
					break offer
				}
			}
		}
		// The next spare is made once the start that took this one is
		// over: making it meanwhile would compete with that start for
		// the CPU and for the kernel's cgroup and network locks.
		select {
		case <-sp.done:
		case <-d.stop:
			return
		}
	}
}

// makeSpare creates a spare cgroup, starts an init in it and connects its
// network, all but the machine's name and address (see sandboxNet). On
// cgroup v2 the init is born in the spare cgroup; on v1 it is moved there
// (a move waits for an RCU grace period, milliseconds) while its network
// is made.
func (d *Driver) makeSpare() (_ *spare, err error) {
	var tok [6]byte
	rand.Read(tok[:])
	sp := &spare{cgroup: sparePrefix + hex.EncodeToString(tok[:]), done: make(chan struct{})}
	if err := d.cg.create(sp.cgroup, limitsFor(0, 0)); err != nil {
		d.cg.remove(sp.cgroup)
		return nil, err
	}
	cgroup := ""
	if d.cg.v2 {
		cgroup = sp.cgroup
	}
	if sp.ids, err = d.allocIDs(sp.cgroup); err != nil {
		d.cg.remove(sp.cgroup)
		return nil, err
	}
	if sp.init, err = d.startInit(cgroup, sp.ids); err != nil {
		d.cg.remove(sp.cgroup)
		d.releaseIDs(sp.ids)
		return nil, err
	}
	joined := make(chan error, 1)
	if d.cg.v2 {
		joined <- nil
	} else {
		go func() { joined <- d.cg.add(sp.cgroup, sp.init.h.Pid) }()
	}
	sp.net, err = d.connectSandbox(sp.init.h.Pid, spareLinkPrefix+hex.EncodeToString(tok[:]))
	if jerr := <-joined; err == nil {
		err = jerr
	}
	if err != nil {
		d.discardSpare(sp)
		return nil, err
	}
	return sp, nil
}

// takeSpare returns the spare init, in a cgroup called name with limits l
// (on v2: to be moved there, see moveSpare), or nil when none is ready (the
// caller then creates the cgroup and starts an init itself). The caller
// releases a spare it got once its start is over. When the spare is being
// made, one start at a time waits for it for up to spareWait: it is ready
// sooner than an init started from scratch would be.
func (d *Driver) takeSpare(ctx context.Context, name string, l limits) *spare {
	if d.noSpare.Load() {
		return nil
	}
	var sp *spare
	select {
	case sp = <-d.spares:
	default:
		if !d.making.Load() || !d.waiting.CompareAndSwap(false, true) {
			return nil
		}
		t := time.NewTimer(spareWait)
		select {
		case sp = <-d.spares:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		d.waiting.Store(false)
		if sp == nil {
			return nil
		}
	}
	d.idle.Store(nil)
	if !sp.init.alive() {
		d.logger.Warn("spare init died; starting an init instead", "pid", sp.init.h.Pid)
		d.discardSpare(sp)
		return nil
	}
	var err error
	if d.cg.v2 {
		err = d.cg.create(name, l)
	} else if err = d.cg.rename(sp.cgroup, name); err == nil {
		sp.cgroup = name
		err = d.cg.setLimits(name, l)
	}
	if err == nil {
		err = d.assignIDs(name, sp.ids)
	}
	if err != nil {
		d.logger.Warn("claim spare init", "err", err)
		d.discardSpare(sp)
		return nil
	}
	sp.ids = 0 // the machine's now
	return sp
}

// moveSpare moves a spare's init into the machine's cgroup called name and
// removes the spare cgroup (cgroup v2: on v1 the cgroup was renamed).
func (d *Driver) moveSpare(sp *spare, name string) error {
	if !d.cg.v2 || sp.cgroup == name {
		return nil
	}
	if err := d.cg.add(name, sp.init.h.Pid); err != nil {
		return err
	}
	return d.cg.remove(sp.cgroup)
}

// discardSpare kills a spare's init and removes its veth pair and cgroup.
func (d *Driver) discardSpare(sp *spare) {
	defer sp.release()
	if sp.net != nil {
		sp.net.close(true)
	}
	sp.init.kill()
	if err := d.cg.remove(sp.cgroup); err != nil {
		d.logger.Warn("remove spare cgroup", "err", err)
	}
	if sp.ids != 0 {
		if err := d.releaseIDs(sp.ids); err != nil {
			d.logger.Warn("release spare id range", "err", err)
		}
	}
}

// sweepSpares removes the empty spare cgroups a driver that died left (its
// spare inits end when their start socket closes).
func (d *Driver) sweepSpares() {
	for _, r := range d.cg.roots {
		es, _ := os.ReadDir(r)
		for _, e := range es {
			if !e.IsDir() || !strings.HasPrefix(e.Name(), sparePrefix) {
				continue
			}
			procs := "tasks"
			if d.cg.v2 {
				procs = "cgroup.procs"
			}
			if b, err := os.ReadFile(filepath.Join(r, e.Name(), procs)); err == nil && len(b) == 0 {
				unix.Rmdir(filepath.Join(r, e.Name()))
			}
		}
	}
}

// rename renames the cgroup from to to (cgroup v1 only: cgroup v2 has no
// rename).
func (c *cgroups) rename(from, to string) error {
	if c.v2 {
		return errors.New("cgroup v2 cgroups cannot be renamed")
	}
	fromDirs, toDirs := c.dirs(from), c.dirs(to)
	for i := range fromDirs {
		if err := os.Rename(fromDirs[i], toDirs[i]); err != nil {
			return err
		}
	}
	return nil
}
