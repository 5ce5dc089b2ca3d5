package leftover

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver/hostproc"
	"github.com/flamehq/flame/internal/lockfile"
)

// Report is what a sweep did of one dead owner's record.
type Report struct {
	Record string // the record's name
	Owner  string // the dead owner (hostproc.Handle)
	Group  string
	// Removed counts what was removed, by what it is ("bridge", "veth",
	// "cgroup", "rule", "route", "nftables table", "mount", "lock file").
	Removed map[string]int
	// Left says what was left, and why.
	Left []string
	Err  error
}

func (r Report) String() string {
	keys := make([]string, 0, len(r.Removed))
	for k := range r.Removed {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		n := r.Removed[k]
		if n != 1 {
			k = plural(k)
		}
		parts = append(parts, fmt.Sprintf("%d %s", n, k))
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ", ")
}

func plural(s string) string {
	if strings.HasSuffix(s, "s") {
		return s + "es"
	}
	return s + "s"
}

// Sweep removes what the dead owners of records in dir left: of every
// record whose lock is free, whose owner is provably gone (another boot,
// no such process, or the pid another process's now) and whose group is
// not keep, the things it names, then the record. A record of a live
// owner, or one whose owner cannot be told dead, is left alone. Each
// record swept is logged and reported; one of which something could not
// be removed is kept for the next sweep.
func Sweep(dir, keep string, log *slog.Logger) []Report {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	paths, _ := filepath.Glob(filepath.Join(dir, "*"+recordExt))
	sort.Strings(paths)
	// The records that name directories last: what is mounted under one
	// is another record's (a driver's machines under a dev cluster's
	// data dir), and a directory is never removed across a mount.
	dirs := map[string]bool{}
	for _, p := range paths {
		dirs[p] = namesDir(p)
	}
	sort.SliceStable(paths, func(i, j int) bool { return !dirs[paths[i]] && dirs[paths[j]] })
	var out []Report
	for _, p := range paths {
		name := strings.TrimSuffix(filepath.Base(p), recordExt)
		rep, swept := sweepOne(dir, name, keep)
		if !swept {
			continue
		}
		out = append(out, rep)
		// A warning: a Flame on this host died without cleaning up.
		msg := fmt.Sprintf("removed leftovers of %s, whose owner is dead: %s", rep.Group, rep)
		if rep.Err != nil {
			log.Warn(msg+"; not all: its record is kept for the next sweep", "record", name, "owner", rep.Owner, "left", rep.Left, "err", rep.Err)
		} else if len(rep.Left) > 0 {
			log.Warn(msg, "record", name, "owner", rep.Owner, "left", rep.Left, "err", rep.Err)
		} else {
			log.Warn(msg, "record", name, "owner", rep.Owner)
		}
	}
	return out
}

// namesDir reports whether the record file at path names a directory.
func namesDir(path string) bool {
	st, err := readState(path)
	return err == nil && slices.ContainsFunc(st.Things, func(t Thing) bool { return t.Kind == KindDir })
}

// sweepOne sweeps the record called name, if its owner is dead.
func sweepOne(dir, name, keep string) (Report, bool) {
	rep := Report{Record: name, Removed: map[string]int{}}
	path := filepath.Join(dir, name+recordExt)
	if st, err := readState(path); err != nil || st.Group == keep {
		return rep, false
	}
	lock, err := lockfile.Take(filepath.Join(dir, name+lockExt))
	if err != nil {
		return rep, false // held: its owner lives
	}
	st, err := readState(path) // again, under the lock
	if err != nil {
		// Closed meanwhile (or a record that was never written whole):
		// nothing of it to sweep.
		if errors.Is(err, os.ErrNotExist) {
			lockfile.Release(lock)
		} else {
			lock.Close()
		}
		return rep, false
	}
	rep.Owner, rep.Group = st.Owner, st.Group
	if st.Group == keep || !ownerDead(st.Owner) {
		lock.Close()
		return rep, false
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	here, _ := Netns()
	removeThings(&rep, st.Things, st.Netns == here)
	if rep.Err != nil {
		// Kept, whole, for the next sweep to try again (what is gone
		// already is nothing to it).
		lock.Close()
		return rep, true
	}
	release := func() error {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	if slices.ContainsFunc(st.Things, func(t Thing) bool { return t.Kind == KindForward }) {
		if err := releaseForwarding(dir, st.Netns, nil, release); err != nil {
			rep.Err = errors.Join(rep.Err, err)
		}
	} else if err := release(); err != nil {
		rep.Err = errors.Join(rep.Err, err)
	}
	lockfile.Release(lock)
	return rep, true
}

// ownerDead reports whether the process h names is provably gone.
func ownerDead(handle string) bool {
	h, err := hostproc.ParseHandle(handle)
	if err != nil {
		return false
	}
	if boot := hostproc.BootID(); boot == "" || h.BootID != boot {
		return boot != "" && h.BootID != ""
	}
	st, err := hostproc.ReadStat(h.Pid)
	if errors.Is(err, hostproc.ErrNoProcess) {
		return true
	}
	if err != nil {
		return false
	}
	return st.Start != h.Start || st.State == 'Z' || st.State == 'X'
}

// removeThings removes things, in an order that lets each go: the
// processes in the cgroups first (a sandbox holds its network and mounts),
// the links last. With sameNetns false, the things of a network namespace
// are left: not reachable from here, they go with their namespace.
func removeThings(rep *Report, things []Thing, sameNetns bool) {
	order := []string{KindCgroup, KindMount, KindNFTable, KindRule, KindTable, KindLink, KindLockFile, KindDir}
	for _, kind := range order {
		for _, t := range things {
			if t.Kind != kind {
				continue
			}
			if t.net() && !sameNetns {
				rep.Left = append(rep.Left, fmt.Sprintf("%s %s: in another network namespace", t.Kind, t.Name))
				continue
			}
			var err error
			switch kind {
			case KindCgroup:
				err = removeCgroupTree(rep, t.Name)
			case KindMount:
				err = removeMount(rep, t.Name)
			case KindNFTable:
				err = removeNFTable(rep, t)
			case KindRule:
				err = removeRule(rep, t)
			case KindTable:
				err = removeTable(rep, t.Table)
			case KindLink:
				err = removeLink(rep, t)
			case KindLockFile:
				err = removeLockFile(rep, t.Name)
			case KindDir:
				err = removeDir(rep, t.Name)
			}
			if err != nil {
				rep.Err = errors.Join(rep.Err, err)
			}
		}
	}
}

// removeLockFile removes a lock file nobody holds.
func removeLockFile(rep *Report, path string) error {
	if _, err := os.Stat(path); err != nil {
		return nil
	}
	f, err := lockfile.Take(path)
	if errors.Is(err, unix.EWOULDBLOCK) {
		rep.Left = append(rep.Left, "lock file "+path+": held by another")
		return nil
	}
	if err != nil {
		return fmt.Errorf("lock file %s: %w", path, err)
	}
	lockfile.Release(f)
	rep.Removed["lock file"]++
	return nil
}

// removeMount unmounts what is mounted at dir (stacked mounts too).
func removeMount(rep *Report, dir string) error {
	for range 8 {
		var self, parent unix.Stat_t
		if unix.Lstat(dir, &self) != nil || unix.Lstat(filepath.Dir(dir), &parent) != nil || self.Dev == parent.Dev {
			return nil
		}
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
				return nil
			}
			return fmt.Errorf("unmount %s: %w", dir, err)
		}
		rep.Removed["mount"]++
	}
	return nil
}

// removeDir removes the directory dir and what it holds, on dir's own file
// system only: what is mounted below it, and the directories holding it,
// are left, and reported.
func removeDir(rep *Report, dir string) error {
	if !filepath.IsAbs(dir) || filepath.Clean(dir) == "/" {
		return fmt.Errorf("directory %q: not one to remove", dir)
	}
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return fmt.Errorf("directory %s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		rep.Left = append(rep.Left, "directory "+dir+": not a directory")
		return nil
	}
	if removeTree(rep, dir, st.Dev) {
		rep.Removed["directory"]++
	}
	return nil
}

// removeTree removes path if it is on device dev, a directory after its
// entries, and reports whether it is gone.
func removeTree(rep *Report, path string, dev uint64) bool {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return errors.Is(err, unix.ENOENT)
	}
	if st.Dev != dev {
		rep.Left = append(rep.Left, path+": a mount point")
		return false
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		err := unix.Unlink(path)
		return err == nil || errors.Is(err, unix.ENOENT)
	}
	entries, err := os.ReadDir(path)
	if err != nil {
		rep.Left = append(rep.Left, path+": "+err.Error())
		return false
	}
	all := true
	for _, e := range entries {
		if !removeTree(rep, filepath.Join(path, e.Name()), dev) {
			all = false
		}
	}
	if !all {
		return false
	}
	err = unix.Rmdir(path)
	return err == nil || errors.Is(err, unix.ENOENT)
}
