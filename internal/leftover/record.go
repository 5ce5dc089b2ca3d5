package leftover

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/driver/hostproc"
	"github.com/flamehq/flame/internal/lockfile"
)

// DefaultDir is the host-wide directory of the records: on a tmpfs, so a
// reboot, which takes every recorded thing with it, takes the records too.
const DefaultDir = "/run/flame/owners"

// A record is two files in the directory: <name>.lock, flocked by the
// owner while it lives, and <name>.json, the owner and its things,
// replaced whole on each change.
const (
	lockExt   = ".lock"
	recordExt = ".json"
)

// maxRecord bounds what a sweep reads of a record file.
const maxRecord = 1 << 20

// Kinds of things.
const (
	KindLink     = "link"     // Name: interface name, Type: its kind (bridge, tun); a bridge's veth ports go with it
	KindRule     = "rule"     // a policy routing rule: Priority, Table, Iif, Dst
	KindTable    = "table"    // a routing table of the record's own (Table): its routes are removed
	KindNFTable  = "nftables" // Name: table name, Type: family (bridge, inet, ip6, ...)
	KindCgroup   = "cgroup"   // Name: a cgroup's directory: whatever runs in it is killed, and it is removed with its children
	KindMount    = "mount"    // Name: a mount point: unmounted (detached)
	KindLockFile = "lockfile" // Name: a lock file (internal/lockfile): removed unless another holds it
	KindForward  = "forwarding"
	KindDir      = "dir" // Name: a directory the owner made for itself: removed whole, never across a mount point, after every mount
)

// Thing is one thing a record names.
type Thing struct {
	Kind     string `json:"kind"`
	Name     string `json:"name,omitempty"`
	Type     string `json:"type,omitempty"`
	Table    int    `json:"table,omitempty"`
	Priority int    `json:"priority,omitempty"`
	Iif      string `json:"iif,omitempty"`
	Dst      string `json:"dst,omitempty"`
}

// Link is a network interface of kind typ ("bridge", "tun").
func Link(name, typ string) Thing { return Thing{Kind: KindLink, Name: name, Type: typ} }

// Rule is an IPv6 policy rule "iif <iif> to <dst> lookup <table>" at priority.
func Rule(priority, table int, iif, dst string) Thing {
	return Thing{Kind: KindRule, Priority: priority, Table: table, Iif: iif, Dst: dst}
}

// Table is a routing table the record's owner allocated for itself.
func Table(table int) Thing { return Thing{Kind: KindTable, Table: table} }

// NFTable is an nftables table of family (bridge, inet, ip, ip6).
func NFTable(family, name string) Thing { return Thing{Kind: KindNFTable, Type: family, Name: name} }

// Cgroup is a cgroup directory (any hierarchy, v1 or v2).
func Cgroup(dir string) Thing { return Thing{Kind: KindCgroup, Name: dir} }

// Mount is a mount point in the host's mount namespace.
func Mount(dir string) Thing { return Thing{Kind: KindMount, Name: dir} }

// Dir is a directory of the owner's own (a temporary data dir).
func Dir(path string) Thing { return Thing{Kind: KindDir, Name: path} }

// LockFile is a lock file taken with internal/lockfile.
func LockFile(path string) Thing { return Thing{Kind: KindLockFile, Name: path} }

// net reports whether t lives in a network namespace.
func (t Thing) net() bool {
	switch t.Kind {
	case KindLink, KindRule, KindTable, KindNFTable, KindForward:
		return true
	}
	return false
}

// state is a record file.
type state struct {
	// Owner is the owning process (hostproc.Handle).
	Owner string `json:"owner"`
	// Group is what the owner runs: a sweep by a process of the same
	// group leaves the record, whose things its new owner takes over.
	Group string `json:"group"`
	// Netns is the owner's network namespace ("dev:inode").
	Netns  string  `json:"netns"`
	Things []Thing `json:"things"`
}

// Record is a live owner's record. Its methods are safe for concurrent use.
type Record struct {
	dir, name string
	lock      *os.File
	netns     *os.File // the owner's network namespace, to give the forwarding back in

	mu        sync.Mutex
	st        state
	inherited []Thing // what a dead owner of the name recorded
	closed    bool
}

// Open takes the record called name in dir (made if absent) for this
// process: it fails when another live process holds it. What a dead owner
// of the same name recorded is kept: its things are this owner's now.
func Open(dir, name, group string) (*Record, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") || name[0] == '.' {
		return nil, fmt.Errorf("record %q: not a file name", name)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("record %s: %w", name, err)
	}
	lock, err := lockfile.Take(filepath.Join(dir, name+lockExt))
	if errors.Is(err, unix.EWOULDBLOCK) {
		return nil, fmt.Errorf("record %s in %s: held by another live process", name, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", name, err)
	}
	self, err := Self()
	if err != nil {
		lockfile.Release(lock)
		return nil, fmt.Errorf("record %s: %w", name, err)
	}
	nsFile, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		lockfile.Release(lock)
		return nil, fmt.Errorf("record %s: network namespace: %w", name, err)
	}
	netns, err := fileNetns(nsFile)
	if err != nil {
		nsFile.Close()
		lockfile.Release(lock)
		return nil, fmt.Errorf("record %s: network namespace: %w", name, err)
	}
	r := &Record{dir: dir, name: name, lock: lock, netns: nsFile}
	if old, err := readState(filepath.Join(dir, name+recordExt)); err == nil && old.Netns == netns {
		r.st.Things = old.Things
		r.inherited = slices.Clone(old.Things)
	}
	r.st.Owner, r.st.Group, r.st.Netns = self.String(), group, netns
	if err := r.writeLocked(); err != nil {
		nsFile.Close()
		lock.Close() // the lock file is a dead owner's record's too
		return nil, err
	}
	return r, nil
}

// RemoveInherited removes what a dead owner of the record's name recorded
// and is not this owner's to take over (a part that makes its things anew
// on each start), as a sweep would, and forgets it; the hold of the IPv6
// forwarding is kept (see Forwarding).
func (r *Record) RemoveInherited() Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	rep := Report{Record: r.name, Group: r.st.Group, Removed: map[string]int{}}
	var gone []Thing
	for _, t := range r.inherited {
		if t.Kind != KindForward {
			gone = append(gone, t)
		}
	}
	r.inherited = nil
	if len(gone) == 0 {
		return rep
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	removeThings(&rep, gone, true)
	if rep.Err == nil && len(rep.Left) == 0 {
		r.st.Things = slices.DeleteFunc(r.st.Things, func(t Thing) bool { return slices.Contains(gone, t) })
		rep.Err = r.writeLocked()
	}
	return rep
}

// Self is this process's durable name.
func Self() (hostproc.Handle, error) {
	st, err := hostproc.ReadStat(os.Getpid())
	if err != nil {
		return hostproc.Handle{}, fmt.Errorf("own start time: %w", err)
	}
	return hostproc.Handle{Pid: os.Getpid(), Start: st.Start, BootID: hostproc.BootID()}, nil
}

// Netns names the network namespace of the calling thread ("dev:inode").
func Netns() (string, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return "", fmt.Errorf("network namespace: %w", err)
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

// fileNetns names the network namespace f is open on.
func fileNetns(f *os.File) (string, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "", err
	}
	return fmt.Sprintf("%d:%d", st.Dev, st.Ino), nil
}

// enterNetns moves the calling thread, which must be locked to its
// goroutine, into the owner's network namespace; leave moves it back. A
// thread that cannot be moved back is left locked, so that it ends with
// its goroutine instead of serving others in the wrong namespace.
func (r *Record) enterNetns() (leave func(), err error) {
	back, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	if err := unix.Setns(int(r.netns.Fd()), unix.CLONE_NEWNET); err != nil {
		back.Close()
		return nil, fmt.Errorf("enter network namespace %s: %w", r.st.Netns, err)
	}
	return func() {
		if unix.Setns(int(back.Fd()), unix.CLONE_NEWNET) != nil {
			runtime.LockOSThread() // never unlocked: the thread goes with the goroutine
		}
		back.Close()
	}, nil
}

// Add records things, before they are made (a thing recorded and never
// made is nothing to a sweep).
func (r *Record) Add(things ...Thing) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return errors.New("record closed")
	}
	n := len(r.st.Things)
	for _, t := range things {
		if !slices.Contains(r.st.Things, t) {
			r.st.Things = append(r.st.Things, t)
		}
	}
	if len(r.st.Things) == n {
		return nil
	}
	return r.writeLocked()
}

// Drop forgets things, once they are gone.
func (r *Record) Drop(things ...Thing) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	n := len(r.st.Things)
	r.st.Things = slices.DeleteFunc(r.st.Things, func(t Thing) bool { return slices.Contains(things, t) })
	if len(r.st.Things) == n {
		return nil
	}
	return r.writeLocked()
}

// Things is what the record names now.
func (r *Record) Things() []Thing {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.st.Things)
}

func (r *Record) writeLocked() error {
	b, err := json.Marshal(r.st)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(filepath.Join(r.dir, r.name+recordExt), b, ""); err != nil {
		return fmt.Errorf("record %s: %w", r.name, err)
	}
	return nil
}

// Close removes the record, leaving its things in place (an owner removes
// what it means to remove itself, before), and gives back its hold of the
// host's IPv6 forwarding (see Forwarding), restoring the switch when this
// was the last Flame holding it.
func (r *Record) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	var errs []error
	forwarding := slices.ContainsFunc(r.st.Things, func(t Thing) bool { return t.Kind == KindForward })
	release := func() error {
		if err := os.Remove(filepath.Join(r.dir, r.name+recordExt)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("record %s: %w", r.name, err)
		}
		return nil
	}
	if forwarding {
		errs = append(errs, releaseForwarding(r.dir, r.st.Netns, r.enterNetns, release))
	} else {
		errs = append(errs, release())
	}
	lockfile.Release(r.lock)
	r.netns.Close()
	return errors.Join(errs...)
}

// readState reads a record file.
func readState(path string) (state, error) {
	f, err := os.Open(path)
	if err != nil {
		return state{}, err
	}
	defer f.Close()
	var st state
	dec := json.NewDecoder(&limitReader{f, maxRecord})
	if err := dec.Decode(&st); err != nil {
		return state{}, fmt.Errorf("%s: %w", path, err)
	}
	return st, nil
}

type limitReader struct {
	f *os.File
	n int64
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n <= 0 {
		return 0, errors.New("record too large")
	}
	if int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.f.Read(p)
	l.n -= int64(n)
	return n, err
}

// NetworkGroup is the group of the records of a private network's parts
// (an instance's sandbox drivers and mesh links): network is its id.
func NetworkGroup(network string) string { return "network " + network }
