package proccluster

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/lockfile"
	"github.com/flamehq/flame/internal/mesh"
)

// A cluster with Config.Sandbox runs its hosts with the sandbox driver and
// the private network: each agent's WireGuard endpoint is at its own
// address (meshPort), so the tunnels cross the bridge and the partitions
// cut them; it pulls images from the control plane's registry through a
// forwarder the harness runs on the loopback of the agent's namespace
// (registryPort: a registry on loopback is spoken to in plain HTTP, as the
// control plane serves it here). What a sandbox host makes outside its
// namespace — cgroups, the mounts of its machines' root file systems —
// is removed when the member is, and by Sweep after a run that died.
const (
	meshPort     = 51820
	registryPort = 4283
)

// stopTimeout bounds how long an agent may take to close after SIGTERM
// (its mesh, its driver, its stores): beyond it, it is killed.
const stopTimeout = 20 * time.Second

// DataDir is the member's data directory.
func (m *Member) DataDir() string { return m.dataDir }

// Instance is a sandbox host's instance id (see sandbox.LoadInstance), ""
// before its agent made one.
func (m *Member) Instance() string {
	b, err := os.ReadFile(filepath.Join(m.dataDir, "instance-id"))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// MeshCounters are the packets through a host's TUN, as its kernel counts
// them: Rx what the tunnels delivered to the host, Tx what the host sent
// into them.
type MeshCounters struct{ Rx, Tx uint64 }

// Mesh reads the counters of member id's TUN.
func (c *Cluster) Mesh(id string) (MeshCounters, error) {
	m, err := c.member(id)
	if err != nil {
		return MeshCounters{}, err
	}
	inst := m.Instance()
	if inst == "" {
		return MeshCounters{}, fmt.Errorf("proccluster: %s has no instance id", id)
	}
	var mc MeshCounters
	err = inNetns(m.netns, func(h *netlink.Handle) error {
		l, err := h.LinkByName(mesh.LinkName(inst, 0))
		if err != nil {
			return fmt.Errorf("mesh link of %s: %w", id, err)
		}
		st := l.Attrs().Statistics
		if st == nil {
			return fmt.Errorf("mesh link of %s: no statistics", id)
		}
		mc = MeshCounters{Rx: st.RxPackets, Tx: st.TxPackets}
		return nil
	})
	return mc, err
}

// forwarder accepts TCP connections on a listener in a host's namespace and
// joins each to a connection it opens to an address from the harness's own.
type forwarder struct {
	ln net.Listener
	to string

	mu    sync.Mutex
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

// forward listens at addr in the namespace at path and forwards to to.
func forward(path, addr, to string) (*forwarder, error) {
	var ln net.Listener
	var lerr error
	err := inside(path, func() { ln, lerr = net.Listen("tcp", addr) })
	if err == nil {
		err = lerr
	} else if ln != nil {
		ln.Close()
	}
	if err != nil {
		return nil, fmt.Errorf("forwarder at %s in %s: %w", addr, path, err)
	}
	f := &forwarder{ln: ln, to: to, conns: map[net.Conn]bool{}}
	f.wg.Add(1)
	go f.serve()
	return f, nil
}

func (f *forwarder) serve() {
	defer f.wg.Done()
	for {
		a, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			b, err := net.DialTimeout("tcp", f.to, 10*time.Second)
			if err != nil {
				a.Close()
				return
			}
			if !f.track(a, b) {
				return
			}
			done := make(chan struct{}, 2)
			for _, p := range [2][2]net.Conn{{a, b}, {b, a}} {
				go func() {
					io.Copy(p[0], p[1])
					p[0].(*net.TCPConn).CloseWrite()
					done <- struct{}{}
				}()
			}
			<-done
			<-done
			f.untrack(a, b)
		}()
	}
}

// track records a joined pair; false (both closed) once the forwarder is
// closing.
func (f *forwarder) track(cs ...net.Conn) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.conns == nil {
		for _, c := range cs {
			c.Close()
		}
		return false
	}
	for _, c := range cs {
		f.conns[c] = true
	}
	return true
}

func (f *forwarder) untrack(cs ...net.Conn) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range cs {
		c.Close()
		delete(f.conns, c)
	}
}

// close stops accepting, cuts every connection and waits for its
// goroutines.
func (f *forwarder) close() {
	f.ln.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.conns = nil
	f.mu.Unlock()
	f.wg.Wait()
}

// stop asks member m's process to end (SIGTERM) and waits for it, at most
// stopTimeout; it reports whether the process ended.
func (m *Member) stop() bool {
	if m.proc == nil {
		return true
	}
	select {
	case <-m.proc.done:
		return true
	default:
	}
	m.proc.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.proc.done:
		return true
	case <-time.After(stopTimeout):
		return false
	}
}

// sweepSandbox removes what the sandbox host with data dir dir left outside
// its namespace: every process in its instance's cgroups (its machines,
// whose namespaces are their own) is killed, the mounts below dir are
// detached and the cgroups removed. A dir without an instance id never ran
// a sandbox and has nothing to remove.
func sweepSandbox(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "instance-id"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	inst := strings.TrimSpace(string(b))
	if len(inst) != 8 || strings.Trim(inst, "0123456789abcdef") != "" {
		return fmt.Errorf("sweep %s: instance id %q", dir, inst)
	}
	var roots []string
	for _, pat := range []string{"/sys/fs/cgroup/flame-" + inst + "-*", "/sys/fs/cgroup/*/flame-" + inst + "-*"} {
		m, _ := filepath.Glob(pat)
		roots = append(roots, m...)
	}
	var errs []error
	if err := killCgroups(roots); err != nil {
		errs = append(errs, err)
	}
	if err := unmountBelow(dir); err != nil {
		errs = append(errs, err)
	}
	for _, r := range roots {
		if err := removeCgroupTree(r); err != nil {
			errs = append(errs, err)
		}
	}
	// The lock of the host's place, left by an agent that was killed:
	// removed unless a driver holds it.
	if lock, ok := placeLock(dir); ok {
		if _, err := os.Stat(lock); err == nil {
			if f, err := lockfile.Take(lock); err == nil {
				lockfile.Release(f)
			}
		}
	}
	return errors.Join(errs...)
}

// placeLock is the lock file a sandbox driver holds for the place in the
// private network kept in data dir dir.
func placeLock(dir string) (string, bool) {
	network, num, ok, err := host.LoadPlace(dir)
	if err != nil || !ok {
		return "", false
	}
	return fmt.Sprintf("/run/flame/6pn-%s-%d.lock", network, num), true
}

// cgroupTree lists root and every cgroup below it, parents first.
func cgroupTree(root string) []string {
	out := []string{root}
	es, _ := os.ReadDir(root)
	for _, e := range es {
		if e.IsDir() {
			out = append(out, cgroupTree(filepath.Join(root, e.Name()))...)
		}
	}
	return out
}

// killCgroups SIGKILLs every process of the cgroups below roots until none
// is left.
func killCgroups(roots []string) error {
	deadline := time.Now().Add(killTimeout)
	for {
		n := 0
		for _, r := range roots {
			for _, cg := range cgroupTree(r) {
				b, _ := os.ReadFile(filepath.Join(cg, "cgroup.procs"))
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil && pid > 0 && pid != os.Getpid() {
						syscall.Kill(pid, syscall.SIGKILL)
						n++
					}
				}
			}
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("sweep: %d processes still in cgroups %v after %v", n, roots, killTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// removeCgroupTree removes root and the cgroups below it, children first.
func removeCgroupTree(root string) error {
	t := cgroupTree(root)
	slices.Reverse(t)
	var errs []error
	for _, cg := range t {
		if err := unix.Rmdir(cg); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("sweep: remove cgroup %s: %w", cg, err))
		}
	}
	return errors.Join(errs...)
}

// mountsBelow lists the mount points below dir, deepest first.
func mountsBelow(dir string) ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	prefix := filepath.Clean(dir) + "/"
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		// Octal escapes (\040 for a space) are left as they are: the
		// harness's paths have none.
		if strings.HasPrefix(f[4], prefix) {
			out = append(out, f[4])
		}
	}
	slices.SortFunc(out, func(a, b string) int { return len(b) - len(a) })
	return out, nil
}

// unmountBelow detaches every mount below dir.
func unmountBelow(dir string) error {
	ms, err := mountsBelow(dir)
	if err != nil {
		return fmt.Errorf("sweep: %w", err)
	}
	var errs []error
	for _, m := range ms {
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("sweep: unmount %s: %w", m, err))
		}
	}
	return errors.Join(errs...)
}

// sandboxHost is what a sandbox host names outside its namespace, read
// while its data dir exists: its instance id (its cgroups) and the lock
// file of its place in the private network.
type sandboxHost struct {
	instance, lock string
}

// sandboxHosts reads what the cluster's sandbox hosts name outside their
// namespaces.
func (c *Cluster) sandboxHosts() ([]sandboxHost, error) {
	var out []sandboxHost
	for _, m := range c.members[1:] {
		sh := sandboxHost{instance: m.Instance()}
		if sh.instance == "" {
			return nil, fmt.Errorf("%s has no instance id", m.ID)
		}
		lock, ok := placeLock(m.dataDir)
		if !ok {
			return nil, fmt.Errorf("%s has no place in the private network", m.ID)
		}
		sh.lock = lock
		out = append(out, sh)
	}
	return out, nil
}

// leftovers lists what of the cluster is still on the machine: its
// namespaces, links, directory, the mounts below it, and its sandbox
// hosts' cgroups and lock files. Empty once every cleanup of the test
// that made it has run.
func leftovers(name string, hosts []sandboxHost) []string {
	var out []string
	if es, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range es {
			if strings.HasPrefix(e.Name(), name) {
				out = append(out, "netns "+e.Name())
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if strings.HasPrefix(l.Attrs().Name, name) {
				out = append(out, "link "+l.Attrs().Name)
			}
		}
	}
	dir := filepath.Join(os.TempDir(), name)
	if _, err := os.Stat(dir); err == nil {
		out = append(out, "directory "+dir)
	}
	if ms, err := mountsBelow(dir); err == nil {
		for _, m := range ms {
			out = append(out, "mount "+m)
		}
	}
	for _, h := range hosts {
		for _, pat := range []string{"/sys/fs/cgroup/flame-" + h.instance + "-*", "/sys/fs/cgroup/*/flame-" + h.instance + "-*"} {
			m, _ := filepath.Glob(pat)
			for _, cg := range m {
				out = append(out, "cgroup "+cg)
			}
		}
		if _, err := os.Stat(h.lock); err == nil {
			out = append(out, "lock "+h.lock)
		}
	}
	return out
}
