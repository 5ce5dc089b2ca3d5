package proccluster

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// killTimeout bounds how long the processes of a namespace may take to be
// gone after SIGKILL: the kernel needs no cooperation from them, so this is
// far beyond what it takes.
const killTimeout = 10 * time.Second

// newNetns makes a network namespace bound at netnsDir/name, with its
// loopback up. The calling goroutine's thread is back in its own namespace
// when it returns.
func newNetns(name string) (string, error) {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return "", fmt.Errorf("netns %s: %w", name, err)
	}
	p := filepath.Join(netnsDir, name)
	err := inThread(func() error {
		orig, err := netns.Get()
		if err != nil {
			return err
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name) // moves this thread into it
		if err != nil {
			return err
		}
		ns.Close()
		return netns.Set(orig)
	})
	if err != nil {
		os.Remove(p) // NewNamed may have made the file
		return "", fmt.Errorf("netns %s: %w", name, err)
	}
	err = inNetns(p, func(h *netlink.Handle) error {
		lo, err := h.LinkByName("lo")
		if err != nil {
			return err
		}
		return h.LinkSetUp(lo)
	})
	if err != nil {
		deleteNetns(p)
		return "", fmt.Errorf("netns %s: loopback: %w", name, err)
	}
	return p, nil
}

// inThread runs f on a thread of its own, locked: f may move the thread
// into another namespace as long as it moves it back before returning nil.
// A thread f leaves elsewhere (an error) ends with the goroutine, so the
// namespace never leaks into other goroutines.
func inThread(f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := f()
		if err == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// inNetns calls f with a netlink handle in the namespace at path.
func inNetns(path string, f func(*netlink.Handle) error) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	return f(h)
}

// inside runs f on a thread in the network namespace at path, and takes
// the thread back out after (one that cannot leave is never reused:
// inThread). What f makes there (a socket, a child forked from the
// thread) stays in the namespace.
func inside(path string, f func()) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer ns.Close()
	return inThread(func() error {
		orig, err := netns.Get()
		if err != nil {
			return err
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			return err
		}
		f()
		return netns.Set(orig)
	})
}

// startIn starts cmd in the network namespace at path.
func startIn(path string, cmd *exec.Cmd) error {
	var startErr error
	// The child is forked from the thread, so it starts in the namespace;
	// its parent-death signal is tied to that thread, which lives on
	// (unlocked) in the runtime's pool.
	if err := inside(path, func() { startErr = cmd.Start() }); err != nil {
		if cmd.Process != nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
		return fmt.Errorf("enter %s: %w", path, err)
	}
	return startErr
}

// deleteNetns unbinds the namespace at path; the kernel frees it (and the
// veth and nftables tables in it) once no process is left in it.
func deleteNetns(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// netnsID is how /proc/<pid>/ns/net names the namespace at path.
func netnsID(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", err
	}
	return "net:[" + strconv.FormatUint(st.Ino, 10) + "]", nil
}

// netnsPids returns the processes in the namespace at path, never this one
// (one of whose threads may be passing through it).
func netnsPids(path string) ([]int, error) {
	id, err := netnsID(path)
	if err != nil {
		return nil, err
	}
	es, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range es {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if l, err := os.Readlink("/proc/" + e.Name() + "/ns/net"); err == nil && l == id {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// signalNetns sends sig to every process in the namespace at path, first
// to those listed in first (a process that forks, to stop it before its
// children are read), and returns how many it signalled.
func signalNetns(path string, sig syscall.Signal, first ...int) (int, error) {
	for _, pid := range first {
		syscall.Kill(pid, sig)
	}
	pids, err := netnsPids(path)
	for _, pid := range pids {
		syscall.Kill(pid, sig)
	}
	return len(pids), err
}

// killNetns SIGKILLs every process in the namespace at path until none is
// left (a process forking meanwhile is caught by the next pass).
func killNetns(path string, first ...int) error {
	deadline := time.Now().Add(killTimeout)
	for {
		n, err := signalNetns(path, syscall.SIGKILL, first...)
		if err != nil {
			return fmt.Errorf("kill the processes of %s: %w", path, err)
		}
		if n == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("kill the processes of %s: %d still there after %v", path, n, killTimeout)
		}
		first = nil
		time.Sleep(10 * time.Millisecond)
	}
}

// network is a cluster's bridge and subnet: the bridge holds .1, the hosts
// .2 onwards.
type network struct {
	bridge string
	subnet *net.IPNet
}

// newNetwork makes a bridge named name on a /24 of 10.0.0.0/8 that no
// route of this namespace covers, picked at random.
func newNetwork(name string) (*network, error) {
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	var subnet *net.IPNet
	for try := 0; try < 100 && subnet == nil; try++ {
		var b [2]byte
		if _, err := randRead(b[:]); err != nil {
			return nil, err
		}
		if b[0] == 0 { // 10.0.x.0 is the most used
			continue
		}
		cand := &net.IPNet{IP: net.IPv4(10, b[0], b[1], 0).To4(), Mask: net.CIDRMask(24, 32)}
		free := true
		for _, r := range routes {
			if ones, _ := r.Dst.Mask.Size(); r.Dst != nil && ones > 0 && (r.Dst.Contains(cand.IP) || cand.Contains(r.Dst.IP)) {
				free = false
			}
		}
		for _, a := range addrs {
			if a.IPNet != nil && (a.IPNet.Contains(cand.IP) || cand.Contains(a.IP)) {
				free = false
			}
		}
		if free {
			subnet = cand
		}
	}
	if subnet == nil {
		return nil, errors.New("no free /24 in 10.0.0.0/8")
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
	if err := netlink.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("bridge %s: %w", name, err)
	}
	n := &network{bridge: name, subnet: subnet}
	if err := netlink.AddrAdd(br, &netlink.Addr{IPNet: n.addr(1)}); err != nil {
		n.close()
		return nil, fmt.Errorf("bridge %s: address: %w", name, err)
	}
	if err := netlink.LinkSetUp(br); err != nil {
		n.close()
		return nil, fmt.Errorf("bridge %s: up: %w", name, err)
	}
	return n, nil
}

// addr returns the subnet's address i, with the subnet's mask.
func (n *network) addr(i int) *net.IPNet {
	ip := make(net.IP, 4)
	copy(ip, n.subnet.IP.To4())
	ip[3] = byte(i)
	return &net.IPNet{IP: ip, Mask: n.subnet.Mask}
}

// attach plugs the namespace at path into the bridge through a veth pair
// (veth on this side, eth0 in the namespace), with address i.
func (n *network) attach(path, veth string, i int) error {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return err
	}
	defer ns.Close()
	br, err := netlink.LinkByName(n.bridge)
	if err != nil {
		return err
	}
	v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: veth, MasterIndex: br.Attrs().Index},
		PeerName: "eth0", PeerNamespace: netlink.NsFd(ns)}
	if err := netlink.LinkAdd(v); err != nil {
		return fmt.Errorf("veth %s: %w", veth, err)
	}
	if err := netlink.LinkSetUp(v); err != nil {
		return fmt.Errorf("veth %s: up: %w", veth, err)
	}
	return inNetns(path, func(h *netlink.Handle) error {
		eth, err := h.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := h.AddrAdd(eth, &netlink.Addr{IPNet: n.addr(i)}); err != nil {
			return fmt.Errorf("address: %w", err)
		}
		return h.LinkSetUp(eth)
	})
}

// close deletes the bridge.
func (n *network) close() error { return deleteLink(n.bridge) }

// deleteLink deletes the link named name, if there is one.
func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return err
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return err
	}
	return nil
}
