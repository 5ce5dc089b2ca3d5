package sandbox

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/leftover"
	"github.com/flamehq/flame/internal/lockfile"
	"github.com/flamehq/flame/internal/mesh/layout"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// Images is the host's image store as the driver uses it.
type Images interface {
	// Pull resolves ref, fetching what the host lacks.
	Pull(ctx context.Context, ref string) (*image.Image, error)
	// MountTree gives a machine a fresh copy-on-write root filesystem of
	// img under dir, as a detached mount (a descriptor the caller closes)
	// whose image files show the ids of the user namespace userns (an
	// open /proc/<pid>/ns/user), whose root is rootID outside.
	MountTree(ctx context.Context, img *image.Image, dir string, userns int, rootID uint32) (tree int, err error)
	// Unmount removes what MountTree made under dir; a dir with nothing
	// mounted is not an error.
	Unmount(ctx context.Context, dir string) error
}

// Config configures the sandbox driver.
type Config struct {
	// Images pulls images and mounts their root filesystems.
	Images Images
	// StateDir keeps the driver's state that outlives a machine's
	// directory: the address leases. Default /var/lib/flame/sandbox.
	StateDir string
	// Bridge is the host bridge the sandboxes are connected to, created on
	// first use. Default: the instance's (see InstanceNames), from the
	// instance id kept in StateDir.
	Bridge string
	// Network and Host place this host in the private network (6PN, see
	// internal/mesh/layout): a machine of org o (driver.Spec.Org) gets an
	// address in layout.Place{Network, o, Host}.HostPrefix(), and the
	// bridge that place's Gateway while a machine of o is here. Default:
	// the instance's.
	Network layout.Network
	Host    layout.Host
	// HostPrefix, with no Network, is the layout of a legacy instance
	// (see InstanceNames): one prefix for every machine of the host,
	// whatever its org, the bridge its first host address.
	HostPrefix netip.Prefix
	// InitPath is the flame binary, whose hidden "sandbox-init" command
	// is each sandbox's init. Default: this program.
	InitPath string
	// CgroupParent is the cgroup, below each hierarchy's root, that holds
	// the machines' cgroups. Default: the instance's.
	CgroupParent string
	// HostAccess lets a rootless sandbox's machines reach the host's own
	// services (rootless_out.go): its loopback through the gateway, and
	// its addresses — for a Flame whose only tenant is the user running it
	// (flame dev run by a user). Without it a rootless machine reaches only
	// other hosts, as a root sandbox's does.
	HostAccess bool
	Logger     *slog.Logger

	// cgroups replaces the hierarchies New detects (tests).
	cgroups *cgroups
}

// DefaultStateDir is where the driver keeps its state by default.
const DefaultStateDir = "/var/lib/flame/sandbox"

func (c *Config) setDefaults() error {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	noLayout := c.Network == 0 && !c.HostPrefix.IsValid()
	if (c.Bridge == "" || noLayout || c.CgroupParent == "") && filepath.IsAbs(c.StateDir) {
		inst, err := LoadInstance(c.StateDir)
		if err != nil {
			return err
		}
		n, err := InstanceNames(inst, 0)
		if err != nil {
			return err
		}
		if c.Bridge == "" {
			c.Bridge = n.Bridge
		}
		if noLayout {
			c.Network, c.Host, c.HostPrefix = n.Network, n.Host, n.HostPrefix
		}
		if c.CgroupParent == "" {
			c.CgroupParent = n.CgroupParent
		}
	}
	if c.Network != 0 {
		c.HostPrefix = netip.Prefix{}
	}
	c.HostPrefix = c.HostPrefix.Masked()
	if c.InitPath == "" {
		p, err := os.Executable()
		if err != nil {
			return fmt.Errorf("init path: %w", err)
		}
		c.InitPath = p
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Validate reports what is wrong with c (after defaults).
func (c *Config) Validate() error {
	var errs []error
	if c.Images == nil {
		errs = append(errs, errors.New("images: required"))
	}
	if !filepath.IsAbs(c.StateDir) {
		errs = append(errs, fmt.Errorf("state dir %q: must be absolute", c.StateDir))
	}
	if n := len(c.Bridge); n == 0 || n > 15 || strings.ContainsAny(c.Bridge, "/ :") {
		errs = append(errs, fmt.Errorf("bridge %q: not an interface name", c.Bridge))
	}
	switch {
	case c.Network != 0:
		if c.Host == 0 {
			errs = append(errs, errors.New("host: required with a network (1 to 65535)"))
		}
	case !c.HostPrefix.Addr().Is6() || c.HostPrefix.Addr().Is4In6() || c.HostPrefix.Bits() > 120:
		errs = append(errs, fmt.Errorf("host prefix %s: must be an IPv6 prefix of at most /120", c.HostPrefix))
	}
	if !filepath.IsAbs(c.InitPath) {
		errs = append(errs, fmt.Errorf("init path %q: must be absolute", c.InitPath))
	}
	if c.CgroupParent == "" || strings.HasPrefix(c.CgroupParent, "/") || strings.Contains(c.CgroupParent, "..") {
		errs = append(errs, fmt.Errorf("cgroup parent %q: must be a relative path", c.CgroupParent))
	}
	return errors.Join(errs...)
}

// ErrClosed is returned for a sandbox the driver stopped watching when it
// was closed.
var ErrClosed = errors.New("sandbox driver closed")

// Driver runs workloads in sandboxes. It is safe for concurrent use.
type Driver struct {
	cfg    Config
	logger *slog.Logger
	bootID string
	cg     *cgroups
	leases leases

	netMu       sync.Mutex
	bridgeIndex int
	prefixLock  *os.File            // see claimPrefix; nil once closed
	record      *leftover.Record    // what the driver made outside its state (sweep.go)
	gateways    map[layout.Org]bool // the orgs whose gateway the bridge has (see orgnet.go)
	filter      *filter             // nil for a legacy instance (see filter.go)
	ports       map[string]port     // machine id → its port in the filter

	imgMu  sync.Mutex
	images map[string]*image.Image // by reference, as Prepare resolved it

	spares  chan *spare           // see spare.go
	idle    atomic.Pointer[spare] // the spare made and not yet taken
	making  atomic.Bool           // a spare is being made, or will be once the start that took the last one is over
	waiting atomic.Bool           // a start waits for it
	// noSpare makes Start start an init of its own (tests).
	noSpare atomic.Bool
	stop    chan struct{} // closed by Close
	// rl is set for a driver run by a user other than root (rootless.go).
	rl *rootless

	mu     sync.Mutex
	procs  map[*sandbox]struct{} // watched and not yet ended
	closed bool
	wg     sync.WaitGroup
}

var _ driver.Driver = (*Driver)(nil)

// New returns a driver for cfg. It needs root, IPv6 and cgroups (v2 with
// the memory, cpu and pids controllers, or v1 hierarchies for them); run by
// another user it returns a rootless driver where the kernel allows one
// (see rootless.go), else an error. It
// holds cfg's prefix until Close, and refuses one another driver holds or
// another link routes before it makes anything (see claimPrefix).
func New(cfg Config) (*Driver, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	if os.Geteuid() != 0 {
		return newRootless(cfg)
	}
	if !ipv6Enabled() {
		return nil, errors.New("sandbox driver: IPv6 is disabled on this host")
	}
	sweepLeftovers(cfg, cfg.Logger)
	lock, err := claimPrefix(cfg)
	if err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	cg, err := detectCgroups(cfg.CgroupParent)
	if cfg.cgroups != nil {
		cg, err = cfg.cgroups, nil
	}
	if err != nil {
		lockfile.Release(lock)
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	rec, err := openRecord(cfg, cg, lock)
	if err != nil {
		lockfile.Release(lock)
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	l := leases{dir: filepath.Join(cfg.StateDir, "leases")}
	if err := l.init(); err != nil {
		rec.Close()
		lockfile.Release(lock)
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	d := &Driver{
		record: rec,
		cfg:    cfg,
		logger: cfg.Logger.With("component", "driver/sandbox"),
		bootID: hostproc.BootID(),
		cg:     cg,
		leases: l,
		images: make(map[string]*image.Image),
		procs:  make(map[*sandbox]struct{}),
		stop:   make(chan struct{}),
	}
	d.gateways = make(map[layout.Org]bool)
	d.ports = make(map[string]port)
	if cfg.Network != 0 {
		d.filter = newFilter(cfg.Bridge, cfg.Network)
		if err := d.filter.install(); err != nil {
			rec.Close()
			lockfile.Release(lock)
			return nil, fmt.Errorf("sandbox driver: %w", err)
		}
	}
	d.prefixLock = lock
	d.sweepSpares()
	d.sweepSpareIDs()
	d.spares = make(chan *spare)
	d.wg.Add(1)
	go d.keepSpares()
	d.logger.Debug("sandbox driver ready", "cgroup", cg.version(), "bridge", cfg.Bridge, "network", cfg.Network, "host", cfg.Host, "prefix", cfg.HostPrefix)
	return d, nil
}

// Name implements driver.Driver.
func (d *Driver) Name() string { return "sandbox" }

// CgroupVersion is the cgroup version the driver found (1 or 2).
// A rootless driver uses none (0).
func (d *Driver) CgroupVersion() int {
	if d.rl != nil {
		return 0
	}
	return d.cg.version()
}

// PrivateIP is the machine's address on the private network, once Prepare
// or Start gave it one (until Cleanup).
func (d *Driver) PrivateIP(spec driver.Spec) (netip.Addr, bool) {
	prefix, err := d.machinePrefix(spec)
	if err != nil {
		return netip.Addr{}, false
	}
	return d.leases.lookup(prefix, spec.MachineID)
}

// checkSpec rejects specs the driver cannot name things after.
func checkSpec(spec driver.Spec) error {
	id := spec.MachineID
	if id == "" || id == "." || id == ".." || strings.ContainsAny(id, "/\x00") || len(id) > 64 {
		return fmt.Errorf("machine id %q: not usable as a name", id)
	}
	if !filepath.IsAbs(spec.Dir) {
		return fmt.Errorf("machine %s: directory %q is not absolute", id, spec.Dir)
	}
	return nil
}

// Prepare pulls spec's image, checks it has something to run and gives the
// machine its private address.
func (d *Driver) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	if err := checkSpec(spec); err != nil {
		return driver.Image{}, err
	}
	img, err := d.pull(ctx, spec)
	if err != nil {
		return driver.Image{}, err
	}
	prefix, err := d.machinePrefix(spec)
	if err != nil {
		return driver.Image{}, fmt.Errorf("prepare %s: %w", spec.MachineID, err)
	}
	if _, err := d.leases.acquire(prefix, spec.MachineID); err != nil {
		return driver.Image{}, fmt.Errorf("prepare %s: %w", spec.MachineID, err)
	}
	return driver.Image{Ref: img.Ref, Digest: img.Digest}, nil
}

// pull resolves spec's image, checking it has something to run. An image
// that does not exist or cannot be run wraps driver.ErrImage; a registry
// that cannot be reached or failed, and any local failure, wrap
// driver.ErrUnavailable; a ctx that ended is returned as it is.
func (d *Driver) pull(ctx context.Context, spec driver.Spec) (*image.Image, error) {
	if spec.Image == "" {
		return nil, fmt.Errorf("no image: %w", driver.ErrImage)
	}
	img, err := d.cfg.Images.Pull(ctx, spec.Image)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("pull %s: %w", spec.Image, err)
		}
		return nil, fmt.Errorf("pull %s: %w: %w", spec.Image, err, pullClass(err))
	}
	if len(mergeArgv(img.Config, spec)) == 0 {
		return nil, fmt.Errorf("image %s: no entrypoint or cmd, and the machine's config sets none: %w", spec.Image, driver.ErrImage)
	}
	d.imgMu.Lock()
	d.images[spec.Image] = img
	d.imgMu.Unlock()
	return img, nil
}

// pullClass is the driver sentinel a pull's error maps to: what the
// registry or the reference say is wrong with the image is permanent
// (ErrImage); anything else, the registry unreachable or failing, a digest
// that did not match what arrived, a full or broken disk, may pass
// (ErrUnavailable).
func pullClass(err error) error {
	switch {
	case errors.Is(err, image.ErrNotFound), errors.Is(err, image.ErrInvalid), errors.Is(err, image.ErrUnauthorized):
		return driver.ErrImage
	default:
		return driver.ErrUnavailable
	}
}

// image is spec's image as Prepare resolved it, or pulled now.
func (d *Driver) image(ctx context.Context, spec driver.Spec) (*image.Image, error) {
	d.imgMu.Lock()
	img := d.images[spec.Image]
	d.imgMu.Unlock()
	if img != nil {
		return img, nil
	}
	return d.pull(ctx, spec)
}

// state is what the driver keeps in the machine's directory about its
// sandbox, for Adopt, Exec and Cleanup. It never holds the workload's
// environment, which carries the machine's secrets: Launch.Env is empty on
// disk, the init gets the environment over its start socket, and Exec reads
// it back from the running workload (see workloadEnv).
type state struct {
	Instance string `json:"instance"`
	Handle   string `json:"handle"`
	Launch   launch `json:"launch"`
}

const stateFile = "sandbox.json"

func mountDir(spec driver.Spec) string { return filepath.Join(spec.Dir, "rootfs") }

func readState(dir string) (state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return state{}, err
	}
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return state{}, fmt.Errorf("%s: %w", stateFile, err)
	}
	return st, nil
}

func writeState(dir string, st state) error {
	st.Launch.Env = nil
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, stateFile+".tmp")
	os.Remove(tmp) // WriteFile keeps an existing file's mode
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, filepath.Join(dir, stateFile))
}

// Start runs spec's workload in a new sandbox and returns once the
// workload's program has been executed.
func (d *Driver) Start(ctx context.Context, spec driver.Spec) (_ driver.Process, err error) {
	if err := checkSpec(spec); err != nil {
		return nil, err
	}
	if spec.LogPath == "" {
		return nil, fmt.Errorf("start %s: no log path", spec.MachineID)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	if d.rl != nil {
		return d.startRootless(ctx, spec)
	}
	img, err := d.image(ctx, spec)
	if err != nil {
		return nil, err
	}
	prefix, err := d.machinePrefix(spec)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	addr, err := d.leases.acquire(prefix, spec.MachineID)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	// An earlier run of the machine leaves its cgroup and root
	// filesystem (a machine starts from a fresh copy of its image).
	if _, serr := os.Stat(filepath.Join(spec.Dir, stateFile)); serr == nil || d.cg.exists(spec.MachineID) {
		if err := d.teardown(ctx, spec); err != nil {
			return nil, fmt.Errorf("start %s: clear the previous run: %w", spec.MachineID, err)
		}
	}
	os.Remove(filepath.Join(spec.Dir, statusFile))

	defer func() {
		if err != nil {
			if terr := d.teardown(context.WithoutCancel(ctx), spec); terr != nil {
				d.logger.Warn("clean up after failed start", "machine", spec.MachineID, "err", terr)
			}
		}
	}()
	if err = os.MkdirAll(mountDir(spec), 0o700); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	if err = d.recordMount(mountDir(spec)); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	if err = mountDisk(spec, mountDir(spec)); err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	lim := limitsFor(spec.MemoryMB, spec.CPUs)
	sp := d.takeSpare(ctx, spec.MachineID, lim)
	var ip *initProc
	if sp != nil {
		defer sp.release()
		ip = sp.init
	} else {
		if err := d.cg.create(spec.MachineID, lim); err != nil {
			return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
		}
		ids, err := d.allocIDs(spec.MachineID)
		if err == nil {
			err = d.assignIDs(spec.MachineID, ids)
		}
		if err != nil {
			d.releaseIDs(ids)
			return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
		}
		if ip, err = d.startInit(spec.MachineID, ids); err != nil {
			return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
		}
	}
	// The root filesystem is made for the init's user namespace; until
	// launch takes them, a failure ends the init and closes the tree.
	tree := -1
	defer func() {
		if err != nil && tree >= 0 {
			unix.Close(tree)
		}
		if err != nil && tree != -2 {
			if sp != nil {
				d.discardSpare(sp)
			} else {
				ip.kill()
			}
		}
	}()
	tree, err = d.rootTree(ctx, img, spec, ip.h.Pid)
	if err != nil {
		return nil, fmt.Errorf("start %s: mount image %s: %w", spec.MachineID, img.Ref, err)
	}
	l, err := resolveLaunch(tree, img.Config, spec, addr)
	if err != nil {
		return nil, fmt.Errorf("start %s: image %s: %w: %w", spec.MachineID, img.Ref, err, driver.ErrImage)
	}
	cfg := &initConfig{
		Dir:      spec.Dir,
		Hostname: spec.MachineID,
		Hosts:    hostsFile(spec, addr),
		Resolv:   "nameserver " + dnsAddr + "\n",
		OOMFile:  d.cg.oomFile(spec.MachineID),
		Launch:   l,
	}
	launchTree := tree
	tree = -2 // launch's now, as the init is
	s, err := d.launch(ctx, spec, cfg, addr, sp, ip, launchTree)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.MachineID, err)
	}
	d.logger.Debug("started", "machine", spec.MachineID, "pid", s.h.Pid, "addr", addr, "argv", l.Argv, "spare", sp != nil)
	return s, nil
}

// dnsAddr is the private network's DNS server, as on Fly.
const dnsAddr = "fdaa::3"

func hostsFile(spec driver.Spec, addr netip.Addr) string {
	names := spec.MachineID
	if spec.App != "" {
		names += " " + spec.MachineID + ".vm." + spec.App + ".internal"
	}
	return "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" +
		addr.String() + "\t" + names + "\n"
}

// resolveLaunch works out, against the image's root filesystem, how to run
// spec's workload: argv with its program found, environment, directory and
// user.
func resolveLaunch(rootfd int, ic image.Config, spec driver.Spec, addr netip.Addr) (launch, error) {
	acct, err := resolveUser(ic.User, func(name string) ([]byte, error) { return readInRoot(rootfd, name) })
	if err != nil {
		return launch{}, err
	}
	env := mergeEnv(ic, spec, addr.String())
	if _, ok := env["HOME"]; !ok {
		env["HOME"] = acct.home
	}
	dir := ic.WorkingDir
	if dir == "" {
		dir = "/"
	}
	argv := mergeArgv(ic, spec)
	prog, err := lookProgram(argv[0], dir, env["PATH"], func(p string) error { return executableInRoot(rootfd, p) })
	if err != nil {
		return launch{}, err
	}
	return launch{Path: prog, Argv: argv, Env: envList(env), Dir: dir, UID: acct.uid, GID: acct.gid, Groups: acct.groups}, nil
}

// openInRoot opens name as if rootfd were the root directory: links and
// ".." cannot leave it.
func openInRoot(rootfd int, name string, flags uint64) (*os.File, error) {
	fd, err := unix.Openat2(rootfd, strings.TrimPrefix(name, "/"), &unix.OpenHow{
		Flags:   flags | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: name, Err: err}
	}
	return os.NewFile(uintptr(fd), name), nil
}

func readInRoot(rootfd int, name string) ([]byte, error) {
	f, err := openInRoot(rootfd, name, unix.O_RDONLY)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var b strings.Builder
	_, err = bufio.NewReader(f).WriteTo(&b)
	return []byte(b.String()), err
}

func executableInRoot(rootfd int, name string) error {
	f, err := openInRoot(rootfd, name, unix.O_PATH)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return errNotFound
		}
		return err
	}
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return errors.New("not a regular file")
	}
	if st.Mode&0o111 == 0 {
		return errors.New("not executable")
	}
	return nil
}

// cloneFlags are the namespaces each sandbox gets.
const cloneFlags = unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNS | unix.CLONE_NEWUTS | unix.CLONE_NEWIPC | unix.CLONE_NEWNET

// launch configures the init ip for spec's machine — the spare sp's, or
// one Start started — in the machine's cgroup, hands it the root
// filesystem tree, connects its network and has it start the workload (see
// message). It ends ip and closes tree when it fails.
func (d *Driver) launch(ctx context.Context, spec driver.Spec, cfg *initConfig, addr netip.Addr, sp *spare, ip *initProc, tree int) (_ *sandbox, err error) {
	ids, _ := d.machineIDs(spec.MachineID)
	// The init joins its cgroup while the network is set up, where it was
	// not born in it: a move takes milliseconds of waiting, and only has
	// to be done before the workload is forked.
	joined := make(chan error, 1)
	var sn *sandboxNet
	if sp != nil {
		sn = sp.net
		go func() { joined <- d.moveSpare(sp, spec.MachineID) }()
	} else if d.cg.v2 {
		joined <- nil
	} else {
		go func() { joined <- d.cg.add(spec.MachineID, ip.h.Pid) }()
	}
	conn, h := ip.conn, ip.h
	defer func() {
		if jerr := <-joined; jerr != nil && err == nil {
			err = jerr
		}
		if err != nil {
			// The init cannot be left half set up: kill it (its
			// namespaces go with it) and reap it.
			if sn != nil {
				sn.close(true)
			}
			ip.kill()
			return
		}
		sn.close(false)
		conn.Close()
	}()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(30 * time.Second)
	}
	conn.SetDeadline(deadline)
	if err := makeStatusDir(spec.Dir, ids); err != nil {
		unix.Close(tree)
		return nil, err
	}
	fds, err := openInitFiles(spec.LogPath, spec.Dir, cfg.OOMFile, tree)
	tree = -1
	if err != nil {
		return nil, err
	}
	defer closeFds(fds)

	st := state{Instance: spec.InstanceID, Handle: h.String(), Launch: cfg.Launch}
	if err := writeState(spec.Dir, st); err != nil {
		return nil, fmt.Errorf("record sandbox: %w", err)
	}
	if err := sendFiles(conn, fds); err != nil {
		return nil, fmt.Errorf("configure init: %w", err)
	}
	if err := writeMessage(conn, message{Op: "config", Config: cfg}); err != nil {
		return nil, fmt.Errorf("configure init: %w", err)
	}
	if sn == nil {
		if sn, err = d.connectSandbox(h.Pid, vethName(spec.MachineID)); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	if err := d.attach(sn, spec, addr); err != nil {
		return nil, fmt.Errorf("network: %w", err)
	}
	rd := bufio.NewReader(conn)
	var m message
	for _, want := range []string{"ready", "started"} {
		if err := readMessage(rd, &m); err != nil {
			return nil, fmt.Errorf("init: %w (see the machine's log)", err)
		}
		if m.Op == "error" {
			return nil, fmt.Errorf("init: %s", m.Err)
		}
		if m.Op != want {
			return nil, fmt.Errorf("init: said %q, want %q", m.Op, want)
		}
		if want == "ready" {
			if err := <-joined; err != nil {
				joined <- nil
				return nil, err
			}
			joined <- nil
			if err := writeMessage(conn, message{Op: "go"}); err != nil {
				return nil, fmt.Errorf("start workload: %w", err)
			}
		}
	}
	s, err := d.watch(h, ip.pidfd, spec.Dir, cfg.OOMFile)
	if err != nil {
		return nil, err
	}
	return s, nil
}

// Adopt reattaches to the sandbox named by handle, whose init must still run
// on this boot. With an empty handle it uses the handle Start recorded in
// the machine's directory for spec's instance. The exit status of an
// adopted sandbox is exact: its init records it.
func (d *Driver) Adopt(ctx context.Context, spec driver.Spec, hs string) (driver.Process, error) {
	if hs == "" {
		st, err := readState(spec.Dir)
		if err != nil || st.Handle == "" || (spec.InstanceID != "" && st.Instance != spec.InstanceID) {
			return nil, fmt.Errorf("adopt %s: no sandbox of instance %s recorded: %w", spec.MachineID, spec.InstanceID, driver.ErrGone)
		}
		hs = st.Handle
	}
	h, err := hostproc.ParseHandle(hs)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w: %w", spec.MachineID, err, driver.ErrGone)
	}
	if h.BootID != d.bootID {
		return nil, fmt.Errorf("adopt %s: handle %q is from another boot: %w", spec.MachineID, hs, driver.ErrGone)
	}
	pidfd, err := openInit(h)
	if err != nil {
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	if d.rl != nil {
		return d.adoptRootless(spec, h, pidfd)
	}
	if err := d.refilter(spec); err != nil {
		pidfd.Close()
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	s, err := d.watch(h, pidfd, spec.Dir, d.cg.oomFile(spec.MachineID))
	if err != nil {
		pidfd.Close()
		return nil, fmt.Errorf("adopt %s: %w", spec.MachineID, err)
	}
	d.logger.Debug("adopted", "machine", spec.MachineID, "pid", h.Pid)
	return s, nil
}

// Cleanup removes everything Prepare and Start left for spec: the sandbox's
// processes if any still run, its veth, cgroup, root filesystem, state
// files and address.
func (d *Driver) Cleanup(ctx context.Context, spec driver.Spec) error {
	if err := checkSpec(spec); err != nil {
		return err
	}
	var err, rerr error
	if d.rl != nil { // rootless.go: its own sandbox, a loopback address
		err = d.teardownRootless(ctx, spec)
		rerr = d.leases.release(d.rl.prefix, spec.MachineID)
	} else {
		err = d.teardown(ctx, spec)
		rerr = d.releaseAddr(spec)
	}
	err = errors.Join(err, rerr)
	d.imgMu.Lock()
	delete(d.images, spec.Image)
	d.imgMu.Unlock()
	if err != nil {
		return fmt.Errorf("cleanup %s: %w", spec.MachineID, err)
	}
	return nil
}

// teardown removes a sandbox of spec's machine, running or not, except its
// address.
func (d *Driver) teardown(ctx context.Context, spec driver.Spec) error {
	var errs []error
	killed := true
	if st, err := readState(spec.Dir); err == nil {
		if h, err := hostproc.ParseHandle(st.Handle); err == nil && h.BootID == d.bootID {
			if err := killInit(ctx, h); err != nil {
				errs = append(errs, err)
				killed = false
			}
		}
	}
	if err := d.unfilter(spec.MachineID); err != nil {
		errs = append(errs, err)
	}
	if err := d.deleteVeth(spec.MachineID); err != nil {
		errs = append(errs, err)
	}
	if err := d.cg.remove(spec.MachineID); err != nil {
		errs = append(errs, err)
	}
	// The writable layer first: what the machine wrote goes with it.
	if err := unmountDisk(mountDir(spec)); err != nil {
		errs = append(errs, err)
	} else {
		d.forgetMount(mountDir(spec))
	}
	if err := d.cfg.Images.Unmount(ctx, mountDir(spec)); err != nil {
		errs = append(errs, fmt.Errorf("unmount root filesystem: %w", err))
	}
	for _, f := range []string{stateFile, statusFile, statusFile + ".tmp", stateFile + ".tmp", execSocket} {
		if err := os.Remove(filepath.Join(spec.Dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(filepath.Join(spec.Dir, statusDir)); err != nil {
		errs = append(errs, err)
	}
	// The id range goes back once no process of the sandbox is left.
	if killed {
		if err := d.releaseMachineIDs(spec.MachineID); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// killInit kills the init h names, if it still runs, and waits for it to
// end (its namespaces and every process in them end with it).
func killInit(ctx context.Context, h handle) error {
	pidfd, err := openInit(h)
	if errors.Is(err, driver.ErrGone) {
		return nil
	}
	if err != nil {
		return err
	}
	defer pidfd.Close()
	if err := hostproc.SignalPidfd(pidfd, unix.SIGKILL); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill sandbox %d: %w", h.Pid, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	pidfd.SetReadDeadline(deadline)
	if err := hostproc.WaitPidfd(pidfd); err != nil {
		return fmt.Errorf("kill sandbox %d: wait: %w", h.Pid, err)
	}
	if v, ok := children.Load(h.Pid); ok && v.(handle) == h {
		var ws unix.WaitStatus
		if pid, _ := unix.Wait4(h.Pid, &ws, unix.WNOHANG, nil); pid == h.Pid {
			children.CompareAndDelete(h.Pid, h)
		}
	}
	return nil
}

// Close stops watching every sandbox, as if the agent had died: the
// sandboxes keep running and their Done channels never close. Adopt, from
// this or another driver, finds them again. Close waits for the driver's
// goroutines.
func (d *Driver) Close() error {
	d.mu.Lock()
	if !d.closed {
		close(d.stop)
	}
	d.closed = true
	ss := make([]*sandbox, 0, len(d.procs))
	for s := range d.procs {
		ss = append(ss, s)
	}
	d.mu.Unlock()
	for _, s := range ss {
		s.abandon()
	}
	d.wg.Wait()
	var ferr error
	if d.filter != nil {
		ferr = d.filter.close(false)
	}
	d.netMu.Lock()
	if d.prefixLock != nil {
		lockfile.Release(d.prefixLock)
		d.prefixLock = nil
	}
	d.netMu.Unlock()
	// What the driver keeps for its running machines, and so for the
	// next driver on its state, is no leftover: the record goes.
	if d.record != nil { // none for a rootless driver
		if err := d.record.Close(); err != nil {
			ferr = errors.Join(ferr, err)
		}
	}
	return ferr
}

func (d *Driver) track(s *sandbox) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.procs[s] = struct{}{}
	d.wg.Add(1)
	return nil
}

func (d *Driver) untrack(s *sandbox) {
	d.mu.Lock()
	delete(d.procs, s)
	d.mu.Unlock()
}

// rootTree mounts spec's root filesystem of img for the sandbox whose init
// is initPid, in the init's user namespace.
func (d *Driver) rootTree(ctx context.Context, img *image.Image, spec driver.Spec, initPid int) (int, error) {
	ids, ok := d.machineIDs(spec.MachineID)
	if !ok {
		return -1, errors.New("no id range recorded")
	}
	ns, err := os.Open("/proc/" + strconv.Itoa(initPid) + "/ns/user")
	if err != nil {
		return -1, fmt.Errorf("user namespace: %w", err)
	}
	defer ns.Close()
	return d.cfg.Images.MountTree(ctx, img, mountDir(spec), int(ns.Fd()), ids)
}
