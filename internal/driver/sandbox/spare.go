package sandbox

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Starting an init costs milliseconds that have nothing to do with the
// machine: the flame binary's runtime and package initialization, and on
// cgroup v1 the move of the init into a cgroup, which waits for an RCU grace
// period. So the driver keeps one spare init, started ahead of time in new
// namespaces and in a spare cgroup of its own, blocked reading its
// configuration from its start socket. Nothing about a machine reaches it
// before then: its stdio is /dev/null, and what it needs of the host (the
// machine's log, directory, OOM counter and root filesystem, mounted after
// the spare's mount namespace was made) comes over the socket as file
// descriptors (see sendFiles).
//
// Start takes the spare and makes its cgroup the machine's: on v1 the spare
// cgroup is renamed (a process forked by a thread is born in that thread's
// cgroups, so the spare is forked by a locked thread moved into the spare
// cgroup first); on v2, where cgroups cannot be renamed, the spare is born in
// its cgroup (clone3 with CLONE_INTO_CGROUP) and moved into the machine's
// while the sandbox is set up. Meanwhile the next spare is made in the
// background. A spare that dies is replaced; when none is ready, Start starts
// an init of its own, as the spare would have been started.

// sparePrefix names spare cgroups.
const sparePrefix = "spare-"

// spareRecheck is how often an unclaimed spare is checked for life.
const spareRecheck = time.Second

type spare struct {
	cgroup string // the spare cgroup, until Start renames it (v1)
	init   *initProc
}

// keepSpares makes spares one after another, each handed to the Start that
// takes it, until the driver closes.
func (d *Driver) keepSpares() {
	defer d.wg.Done()
	backoff := 100 * time.Millisecond
	for {
		sp, err := d.makeSpare()
		if err != nil {
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
					d.logger.Warn("spare init died; replacing it", "pid", sp.init.h.pid)
					d.idle.Store(nil)
					d.discardSpare(sp)
					break offer
				}
			}
		}
	}
}

// makeSpare creates a spare cgroup and starts an init in it.
func (d *Driver) makeSpare() (*spare, error) {
	var tok [6]byte
	rand.Read(tok[:])
	sp := &spare{cgroup: sparePrefix + hex.EncodeToString(tok[:])}
	if err := d.cg.create(sp.cgroup, limitsFor(0, 0)); err != nil {
		d.cg.remove(sp.cgroup)
		return nil, err
	}
	var err error
	if d.cg.v2 {
		sp.init, err = d.startInit(sp.cgroup)
	} else {
		// Forked by a thread in the cgroup: born in it.
		d.wg.Add(1)
		d.onSpareThread(func() {
			defer d.wg.Done()
			if err = d.cg.addThread(sp.cgroup, unix.Gettid()); err == nil {
				sp.init, err = d.startInit("")
			}
		})
	}
	if err != nil {
		d.cg.remove(sp.cgroup)
		return nil, err
	}
	return sp, nil
}

// takeSpare returns the spare init, in a cgroup called name with limits l
// (on v2: to be moved there, see moveSpare), or nil when none is ready (the
// caller then creates the cgroup and starts an init itself).
func (d *Driver) takeSpare(name string, l limits) *spare {
	if d.noSpare.Load() {
		return nil
	}
	var sp *spare
	select {
	case sp = <-d.spares:
		d.idle.Store(nil)
	default:
		return nil
	}
	if !sp.init.alive() {
		d.logger.Warn("spare init died; starting an init instead", "pid", sp.init.h.pid)
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
	if err != nil {
		d.logger.Warn("claim spare init", "err", err)
		d.discardSpare(sp)
		return nil
	}
	return sp
}

// moveSpare moves a spare's init into the machine's cgroup called name and
// removes the spare cgroup (cgroup v2: on v1 the cgroup was renamed).
func (d *Driver) moveSpare(sp *spare, name string) error {
	if !d.cg.v2 || sp.cgroup == name {
		return nil
	}
	if err := d.cg.add(name, sp.init.h.pid); err != nil {
		return err
	}
	return d.cg.remove(sp.cgroup)
}

// discardSpare kills a spare's init and removes its cgroup.
func (d *Driver) discardSpare(sp *spare) {
	sp.init.kill()
	if err := d.cg.remove(sp.cgroup); err != nil {
		d.logger.Warn("remove spare cgroup", "err", err)
	}
}

// onSpareThread runs f on a locked thread that is not the main thread, and
// leaves it locked, so that the thread exits when f returns. The main
// thread never exits (the Go runtime parks it instead), so it must never be
// moved into a machine's cgroup.
func (d *Driver) onSpareThread(f func()) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		if unix.Gettid() != unix.Getpid() {
			f()
			return
		}
		// Holding the main thread, the nested call gets another one.
		d.onSpareThread(f)
		runtime.UnlockOSThread()
	}()
	<-done
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

// addThread moves thread tid (not its whole process) into the cgroup called
// name; cgroup v1 only.
func (c *cgroups) addThread(name string, tid int) error {
	if c.v2 {
		return errors.New("cgroup v2 places processes, not threads")
	}
	for _, d := range c.dirs(name) {
		if err := writeFile(filepath.Join(d, "tasks"), strconv.Itoa(tid)); err != nil {
			return fmt.Errorf("move thread into %s: %w", d, err)
		}
	}
	return nil
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
