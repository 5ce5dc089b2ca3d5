package sandbox

// Rootless sandboxes: the driver run by a user other than root.
//
// New, run by a user other than root, makes a rootless driver where the
// kernel lets an unprivileged user create a user namespace and mount
// overlayfs in it (ProbeRootless). Each sandbox is then the sandbox root's
// one, with these differences:
//
//   - Ids. The init's user namespace maps the calling user (uid and gid)
//     to root and nothing else: there is no range of ids to lease (newuidmap
//     and /etc/subuid are not used). The workload and the commands Exec runs
//     are root of the namespace, whatever the image's USER says (one id is
//     all there is; the start logs it when USER names another). Outside,
//     every sandbox is the user: a process that escaped its namespaces
//     would be the user, who is the only tenant of such a host.
//   - Root filesystem. The image store, run by the user, unpacks layers
//     without their owners and whiteouts as files (the user may neither
//     chown nor set trusted xattrs): Flattener.Mount copies an image's
//     layers, whiteouts applied, into one directory, once per image
//     (kept under StateDir/rootfs, shared by every machine of the image).
//     Its files belong to the user, so root inside owns every file of the
//     image: an image whose files other users own (a /home/app of uid 1000,
//     a setuid program) sees them as root's, and a workload that drops to
//     another user is refused (no such id). The init mounts, in its own
//     user and mount namespaces, a tmpfs of the guest's rootfs_size_mb and
//     over the flattened image an overlay whose upper layer is in it
//     (overlayfs's userxattr mode): writes past the size fail with ENOSPC,
//     and go with the sandbox. Nothing is mounted in the host's namespace.
//   - Resources. An unprivileged user gets no cgroup of its own unless one
//     was delegated to it, and the driver does not use a delegated one yet:
//     machines run without memory, cpu or pids limits, which New logs once
//     (naming a delegated cgroup it found). The workload still gets a
//     cgroup namespace. The writable layer's size holds (a tmpfs).
//   - Network. Each sandbox has a network namespace of its own with only
//     its loopback, which the init brings up; it reaches nothing outside
//     (no outbound traffic, no DNS: /etc/resolv.conf names fdaa::3, which
//     does not answer). Inbound, the machine has an address of the host's
//     loopback, 127.<host>.<a>.<b>, leased under StateDir as 6PN addresses
//     are (PrivateIP, FLY_PRIVATE_IP), from a /16 of the host's own (see
//     loopbackPrefix): the driver listens there on the machine's ports
//     (driver.Spec's Ports) and forwards each connection into the sandbox
//     (see rootless_net.go). Two machines listening on one port do not
//     collide: each has its own namespace and its own host address.
//   - Spare. The init kept ready for the next start is the init alone, in
//     its new namespaces (keepRootlessSpare): no cgroup or veth to ready.
//
// The rest is the sandbox's as root runs it: PID, mount, UTS, IPC, network
// and cgroup namespaces, the same init, seccomp filter, bounding set (no
// CAP_NET_RAW), masked /proc and exec through the init.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/hostproc"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/lockfile"
)

// Flattener is what a rootless driver needs of the image store besides
// Images: a copy of an image's layers, whiteouts applied, as one directory
// (image.Store's Mount, which copies when it cannot mount overlayfs).
type Flattener interface {
	// Mount gives img a root filesystem at dir/rootfs and returns that
	// path; it is idempotent.
	Mount(ctx context.Context, img *image.Image, dir string) (string, error)
}

// rootless is what a rootless driver keeps (nil for a driver run as root).
type rootless struct {
	uid, gid int
	prefix   netip.Prefix // the machines' loopback addresses
	flat     Flattener

	flatMu sync.Mutex // one image flattened at a time

	fwdMu sync.Mutex
	fwds  map[string]*forwarder // by machine id

	// Outbound traffic (rootless_out.go): its bounds per machine, the
	// host's resolvers, and the host's addresses and this process's
	// ports, which machines do not reach.
	limits    outLimits
	resolvers []netip.AddrPort
	own       ownPorts
	// hostAccess is Config.HostAccess (tests turn it while machines run).
	hostAccess atomic.Bool

	// spare holds an init started ahead of time (it knows nothing of
	// any machine until configured); refill asks keepRootlessSpare for
	// the next one.
	spare  chan *initProc
	refill chan struct{}
}

// Rootless reports whether the driver runs sandboxes as an unprivileged
// user (see rootless.go).
func (d *Driver) Rootless() bool { return d.rl != nil }

// newRootless is New for a user other than root.
func newRootless(cfg Config) (*Driver, error) {
	fl, ok := cfg.Images.(Flattener)
	if !ok {
		return nil, errors.New("sandbox driver: rootless: the image store cannot flatten images")
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	if err := ProbeRootless(cfg.InitPath, cfg.StateDir); err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	l := leases{dir: filepath.Join(cfg.StateDir, "leases")}
	if err := l.init(); err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	d := &Driver{
		cfg:    cfg,
		logger: cfg.Logger.With("component", "driver/sandbox"),
		bootID: hostproc.BootID(),
		cg:     &cgroups{},
		leases: l,
		images: make(map[string]*image.Image),
		procs:  make(map[*sandbox]struct{}),
		stop:   make(chan struct{}),
		rl: &rootless{
			uid: os.Getuid(), gid: os.Getgid(),
			prefix:    loopbackPrefix(cfg),
			flat:      fl,
			fwds:      make(map[string]*forwarder),
			limits:    defaultOutLimits(),
			resolvers: hostResolvers("/etc/resolv.conf"),
			spare:     make(chan *initProc, 1),
			refill:    make(chan struct{}, 1),
		},
	}
	d.rl.hostAccess.Store(cfg.HostAccess)
	d.rl.refill <- struct{}{}
	d.wg.Add(1)
	go d.keepRootlessSpare()
	why := "no cgroup is delegated to this user"
	if dir := delegatedCgroup(); dir != "" {
		why = "the cgroup delegated to this user (" + dir + ") is not used by rootless sandboxes yet"
	}
	d.logger.Warn("rootless sandboxes: machines run without memory, cpu or pids limits ("+why+"); networking through the host's loopback (inbound on the machines' ports, outbound through a user-space stack)",
		"uid", d.rl.uid, "addresses", d.rl.prefix)
	return d, nil
}

// flatten returns the directory holding img's layers as one tree, making it
// on first use.
func (d *Driver) flatten(ctx context.Context, img *image.Image) (string, error) {
	key := strings.TrimPrefix(img.Digest, "sha256:")
	if key == "" || strings.ContainsAny(key, "/.") {
		key = strings.NewReplacer("/", "_", ":", "_", ".", "_").Replace(img.Ref)
	}
	dir := filepath.Join(d.cfg.StateDir, "rootfs", key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	d.rl.flatMu.Lock()
	defer d.rl.flatMu.Unlock()
	// Another driver of this state dir may be copying it.
	var lock *os.File
	for {
		f, err := lockfile.Take(dir + ".lock")
		if err == nil {
			lock = f
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			return "", err
		}
		select {
		case <-ctx.Done():
			return "", ctx.Err()
		case <-time.After(spareWait):
		}
	}
	defer lockfile.Release(lock)
	return d.rl.flat.Mount(ctx, img, dir)
}

// startRootless is Start for a rootless driver.
func (d *Driver) startRootless(ctx context.Context, spec driver.Spec) (_ driver.Process, err error) {
	img, err := d.image(ctx, spec)
	if err != nil {
		return nil, err
	}
	addr, err := d.leases.acquire(d.rl.prefix, spec.MachineID)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	if _, serr := os.Stat(filepath.Join(spec.Dir, stateFile)); serr == nil {
		if err := d.teardownRootless(ctx, spec); err != nil {
			return nil, fmt.Errorf("start %s: clear the previous run: %w", spec.MachineID, err)
		}
	}
	d.closeForwarder(spec.MachineID)
	os.Remove(filepath.Join(spec.Dir, statusFile))
	defer func() {
		if err != nil {
			if terr := d.teardownRootless(context.WithoutCancel(ctx), spec); terr != nil {
				d.logger.Warn("clean up after failed start", "machine", spec.MachineID, "err", terr)
			}
		}
	}()
	lower, err := d.flatten(ctx, img)
	if err != nil {
		return nil, fmt.Errorf("start %s: image %s: %w", spec.MachineID, img.Ref, err)
	}
	lowerfd, err := unix.Open(lower, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start %s: image %s: %w", spec.MachineID, img.Ref, err)
	}
	l, err := resolveLaunch(lowerfd, img.Config, spec, addr)
	if err != nil {
		unix.Close(lowerfd)
		return nil, fmt.Errorf("start %s: image %s: %w: %w", spec.MachineID, img.Ref, err, driver.ErrImage)
	}
	if l.UID != 0 || l.GID != 0 || len(l.Groups) > 0 {
		d.logger.Warn("rootless sandbox: the image's user runs as root of the sandbox (one id is mapped)",
			"machine", spec.MachineID, "user", img.Config.User)
		l.UID, l.GID, l.Groups = 0, 0, nil
	}
	// The ports are the host's before the workload runs: one taken by
	// another program fails the start, not the first connection.
	fw, err := d.listenForwarder(spec, addr)
	if err != nil {
		unix.Close(lowerfd)
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	ip, err := d.rootlessInit()
	if err != nil {
		fw.close()
		unix.Close(lowerfd)
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	cfg := &initConfig{
		Dir:      spec.Dir,
		Hostname: spec.MachineID,
		Hosts:    hostsFile(spec, addr),
		Resolv:   "nameserver " + dnsAddr + "\n",
		OOMFile:  os.DevNull,
		Launch:   l,
		Rootless: &rootlessInit{Lower: lower, DiskBytes: rootfsBytes(spec), Addr: addr.String()},
	}
	s, err := d.launchRootless(ctx, spec, cfg, ip, lowerfd)
	if err != nil {
		fw.close()
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	d.outbound(fw)
	d.serveForwarder(s, fw)
	d.logger.Debug("started rootless", "machine", spec.MachineID, "pid", s.h.Pid, "addr", addr, "argv", l.Argv, "ports", spec.Ports)
	return s, nil
}

// launchRootless configures the init ip, hands it the flattened image
// (lower, which it takes) and has it start the workload, as launch does
// for a sandbox of root's. It ends ip when it fails.
func (d *Driver) launchRootless(ctx context.Context, spec driver.Spec, cfg *initConfig, ip *initProc, lower int) (_ *sandbox, err error) {
	conn := ip.conn
	defer func() {
		if err != nil {
			ip.kill()
			return
		}
		conn.Close()
	}()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	conn.SetDeadline(deadline)
	if err := makeStatusDir(spec.Dir, uint32(d.rl.uid)); err != nil {
		unix.Close(lower)
		return nil, err
	}
	fds, err := openInitFiles(spec.LogPath, spec.Dir, cfg.OOMFile, lower)
	if err != nil {
		return nil, err
	}
	defer closeFds(fds)
	st := state{Instance: spec.InstanceID, Handle: ip.h.String(), Launch: cfg.Launch}
	if err := writeState(spec.Dir, st); err != nil {
		return nil, fmt.Errorf("record sandbox: %w", err)
	}
	if err := sendFiles(conn, fds); err != nil {
		return nil, fmt.Errorf("configure init: %w", err)
	}
	if err := writeMessage(conn, message{Op: "config", Config: cfg}); err != nil {
		return nil, fmt.Errorf("configure init: %w", err)
	}
	if err := awaitInit(conn, func() error { return nil }); err != nil {
		return nil, err
	}
	return d.watch(ip.h, ip.pidfd, spec.Dir, cfg.OOMFile)
}

// adoptRootless is Adopt's end for a rootless driver, once the handle is
// known to name a live init: it forwards the machine's ports again.
func (d *Driver) adoptRootless(spec driver.Spec, h handle, pidfd *os.File) (driver.Process, error) {
	s, err := d.watch(h, pidfd, spec.Dir, os.DevNull)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	d.closeForwarder(spec.MachineID)
	addr, ok := d.leases.lookup(d.rl.prefix, spec.MachineID)
	if !ok {
		d.logger.Error("adopted rootless sandbox has no address: its ports are not forwarded", "machine", spec.MachineID)
		return s, nil
	}
	fw, err := d.listenForwarder(spec, addr)
	if err != nil {
		d.logger.Error("adopted rootless sandbox: its ports are not forwarded", "machine", spec.MachineID, "err", err)
		return s, nil
	}
	d.outbound(fw)
	d.serveForwarder(s, fw)
	return s, nil
}

// teardownRootless removes a rootless sandbox of spec's machine, running or
// not, except its address: its processes (its mounts and namespaces go
// with the last of them), its forwarder and its state files.
func (d *Driver) teardownRootless(ctx context.Context, spec driver.Spec) error {
	var errs []error
	if st, err := readState(spec.Dir); err == nil {
		if h, err := hostproc.ParseHandle(st.Handle); err == nil && h.BootID == d.bootID {
			if err := killInit(ctx, h); err != nil {
				errs = append(errs, err)
			}
		}
	}
	d.closeForwarder(spec.MachineID)
	for _, f := range []string{stateFile, statusFile, statusFile + ".tmp", stateFile + ".tmp", execSocket} {
		if err := os.Remove(filepath.Join(spec.Dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(filepath.Join(spec.Dir, statusDir)); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// awaitInit follows a configured init through its start: "ready" (its root
// filesystem in place), then, once ready returns, "go", then "started".
func awaitInit(conn *net.UnixConn, ready func() error) error {
	rd := bufio.NewReader(conn)
	var m message
	for _, want := range []string{"ready", "started"} {
		if err := readMessage(rd, &m); err != nil {
			return fmt.Errorf("init: %w (see the machine's log)", err)
		}
		if m.Op == "error" {
			return fmt.Errorf("init: %s", m.Err)
		}
		if m.Op != want {
			return fmt.Errorf("init: said %q, want %q", m.Op, want)
		}
		if want == "ready" {
			if err := ready(); err != nil {
				return err
			}
			if err := writeMessage(conn, message{Op: "go"}); err != nil {
				return fmt.Errorf("start workload: %w", err)
			}
		}
	}
	return nil
}

// keepRootlessSpare keeps one init ready for the next start, as the
// sandbox of root's does (spare.go), until the driver closes: starting the
// init is most of a start's time. A rootless spare needs no cgroup or
// network: it is the init alone, in its new namespaces.
func (d *Driver) keepRootlessSpare() {
	defer d.wg.Done()
	for {
		select {
		case <-d.stop:
			select {
			case ip := <-d.rl.spare:
				ip.kill()
			default:
			}
			return
		case <-d.rl.refill:
		}
		ip, err := d.startInit("", 0)
		if err != nil {
			d.logger.Warn("rootless spare init", "err", err)
			select {
			case <-d.stop:
			case <-time.After(spareRecheck):
				d.askRefill()
			}
			continue
		}
		select {
		case d.rl.spare <- ip:
		case <-d.stop:
			ip.kill()
		}
	}
}

func (d *Driver) askRefill() {
	select {
	case d.rl.refill <- struct{}{}:
	default:
	}
}

// rootlessInit is the spare init if one is ready (and still runs), else
// one started now; either way the next spare is asked for.
func (d *Driver) rootlessInit() (*initProc, error) {
	defer d.askRefill()
	select {
	case ip := <-d.rl.spare:
		if ip.alive() {
			return ip, nil
		}
		ip.kill()
	default:
	}
	return d.startInit("", 0)
}

// delegatedCgroup is the calling process's cgroup v2 directory when it
// offers the memory, cpu and pids controllers and this user may write it (a
// subtree delegated to the user, as systemd delegates user@.service), else
// "". Rootless sandboxes do not use one yet; New says so when there is one.
func delegatedCgroup() string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	var v2 string
	for line := range strings.SplitSeq(string(b), "\n") {
		if mnt, fstype, _, ok := parseMountinfoLine(line); ok && fstype == "cgroup2" {
			v2 = mnt
			break
		}
	}
	self, err := os.ReadFile("/proc/self/cgroup")
	if v2 == "" || err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(self), "\n") {
		p, ok := strings.CutPrefix(line, "0::")
		if !ok {
			continue
		}
		dir := filepath.Join(v2, filepath.Clean("/"+p))
		ctrl, _ := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
		if hasAll(strings.Fields(string(ctrl)), "memory", "cpu", "pids") &&
			unix.Access(filepath.Join(dir, "cgroup.subtree_control"), unix.W_OK) == nil {
			return dir
		}
	}
	return ""
}
