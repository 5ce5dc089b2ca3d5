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

// On cgroup v1, moving a process into a cgroup waits for an RCU grace
// period: milliseconds, the largest part of a start. A process forked by a
// thread is born in that thread's cgroups, though, and a v1 cgroup can be
// renamed. So the driver keeps one spare: a cgroup made ahead of time with
// one of the driver's threads already moved in. Start renames the spare to
// the machine's name, sets its limits and forks the init from that thread,
// which then exits (leaving the cgroup) while the next spare is made in the
// background. Cgroup v2 needs none of this: clone3 places the init in its
// cgroup directly.

// sparePrefix names spare cgroups.
const sparePrefix = "spare-"

type spare struct {
	name string
	reqs chan spawnReq // one request, then the thread is done
}

// spawnReq asks a spare's thread to run start (a fork); a nil start
// discards the spare.
type spawnReq struct {
	start func() (*os.Process, error)
	res   chan spawnRes
}

type spawnRes struct {
	proc *os.Process
	err  error
}

// keepSpares makes spares one after another, each handed to the Start that
// takes it, until the driver closes. It runs only on cgroup v1.
func (d *Driver) keepSpares() {
	defer d.wg.Done()
	backoff := 100 * time.Millisecond
	for {
		sp, err := d.makeSpare()
		if err != nil {
			d.logger.Warn("make spare cgroup; starts will move their init instead", "err", err)
			select {
			case <-d.stop:
				return
			case <-time.After(backoff):
				backoff = min(2*backoff, 30*time.Second)
				continue
			}
		}
		backoff = 100 * time.Millisecond
		select {
		case d.spares <- sp:
		case <-d.stop:
			d.discardSpare(sp)
			return
		}
	}
}

// makeSpare creates a spare cgroup and moves a fresh locked thread into it.
func (d *Driver) makeSpare() (*spare, error) {
	var tok [6]byte
	rand.Read(tok[:])
	sp := &spare{name: sparePrefix + hex.EncodeToString(tok[:]), reqs: make(chan spawnReq, 1)}
	if err := d.cg.create(sp.name, limitsFor(0, 0)); err != nil {
		d.cg.remove(sp.name)
		return nil, err
	}
	ready := make(chan error, 1)
	d.wg.Add(1)
	go d.onSpareThread(func() {
		defer d.wg.Done()
		if err := d.cg.addThread(sp.name, unix.Gettid()); err != nil {
			ready <- err
			return
		}
		ready <- nil
		r := <-sp.reqs
		if r.start != nil {
			p, err := r.start()
			r.res <- spawnRes{p, err}
		}
	})
	if err := <-ready; err != nil {
		d.cg.remove(sp.name)
		return nil, err
	}
	return sp, nil
}

// takeSpare returns a spare renamed to the cgroup called name with limits
// l, or nil when none is ready (the caller then creates the cgroup and moves
// its init into it).
func (d *Driver) takeSpare(name string, l limits) *spare {
	if d.spares == nil {
		return nil
	}
	var sp *spare
	select {
	case sp = <-d.spares:
	default:
		return nil
	}
	if err := d.cg.rename(sp.name, name); err != nil {
		d.logger.Warn("claim spare cgroup", "err", err)
		d.discardSpare(sp)
		return nil
	}
	sp.name = name
	if err := d.cg.setLimits(name, l); err != nil {
		d.logger.Warn("claim spare cgroup", "err", err)
		d.discardSpare(sp)
		return nil
	}
	return sp
}

// discardSpare ends a spare's thread and removes its cgroup.
func (d *Driver) discardSpare(sp *spare) {
	sp.reqs <- spawnReq{}
	if err := d.cg.remove(sp.name); err != nil {
		d.logger.Warn("remove spare cgroup", "err", err)
	}
}

// onSpareThread runs f on a locked thread that is not the main thread, and
// leaves it locked, so that the thread exits when f returns. The main
// thread never exits (the Go runtime parks it instead), so it must never be
// moved into a machine's cgroup.
func (d *Driver) onSpareThread(f func()) {
	runtime.LockOSThread()
	if unix.Gettid() != unix.Getpid() {
		f()
		return
	}
	// Holding the main thread, the new goroutine gets another one.
	done := make(chan struct{})
	go func() {
		defer close(done)
		d.onSpareThread(f)
	}()
	<-done
	runtime.UnlockOSThread()
}

// spawn runs start on sp's thread.
func (sp *spare) spawn(start func() (*os.Process, error)) (*os.Process, error) {
	res := make(chan spawnRes, 1)
	sp.reqs <- spawnReq{start: start, res: res}
	r := <-res
	return r.proc, r.err
}

// sweepSpares removes the empty spare cgroups a driver that died left.
func (d *Driver) sweepSpares() {
	for _, r := range d.cg.roots {
		es, _ := os.ReadDir(r)
		for _, e := range es {
			if !e.IsDir() || !strings.HasPrefix(e.Name(), sparePrefix) {
				continue
			}
			if b, err := os.ReadFile(filepath.Join(r, e.Name(), "tasks")); err == nil && len(b) == 0 {
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

// rename renames the cgroup from to to (cgroup v1 only).
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
