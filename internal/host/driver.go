package host

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/image"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// Driver kinds.
const (
	DriverAuto    = "auto"    // as root the sandbox (or an error); else the rootless sandbox where the kernel allows it, else exec, if allowed
	DriverExec    = "exec"    // host processes, no isolation: needs AllowHostExec
	DriverSandbox = "sandbox" // namespaces, cgroups, OCI images
)

// DriverConfig chooses and configures a host's driver.
type DriverConfig struct {
	Kind    string // DriverAuto when empty
	DataDir string // the sandbox's state and the image store live below it
	// Registry is where image references without a registry are pulled
	// from ("flame/demo-app" → "<Registry>/flame/demo-app").
	Registry      string
	RegistryToken string
	// RegistryCredential, used when RegistryToken is empty, gives the
	// token for each pull (an enrolled host's: RegistryCredential).
	RegistryCredential func() string
	// Dial, when set, opens the image store's connections to registries
	// (a dev cluster's simulated network).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Instance names what the sandbox driver makes on the machine (its
	// bridge, cgroups and private network prefix; see
	// sandbox.InstanceNames), so that Flames sharing a machine never share
	// them. Default: the instance id kept in DataDir, made on first use.
	// Hosts of one dev cluster share their cluster's instance.
	Instance string
	// Index tells the hosts of one instance apart: it picks the host's
	// bridge, its private network prefix and its cgroup.
	Index int
	// Network and Host, when both set, place the host in the private
	// network as its enrollment did (LoadPlace), instead of the
	// instance's network and Index+1.
	Network layout.Network
	Host    layout.Host
	// AllowHostExec lets the exec driver run: machines become plain host
	// processes and "exec:" images run any host program, so whoever may
	// create a machine runs commands on the host. Without it the exec
	// driver is refused, and DriverAuto is the sandbox or an error.
	AllowHostExec bool
	Logger        *slog.Logger
}

// ErrHostExecNotAllowed is the exec driver asked for, or needed, without
// DriverConfig.AllowHostExec.
var ErrHostExecNotAllowed = errors.New("the exec driver runs machines as host processes with no isolation; it must be allowed explicitly (--allow-host-exec)")

// HostExecWarning is what a program says, loudly, when it runs the exec
// driver (NewDriver leaves saying it to its caller, once).
const HostExecWarning = "WARNING: exec driver: machines run as plain host processes with no isolation, and \"exec:\" images run any host program; anyone who may create a machine runs commands on this host as " +
	"the user running flame"

// NewDriver builds the driver cfg asks for and says which one it built. It
// fails closed: DriverAuto is, as root, the sandbox or an error (never the
// exec driver), and, as another user, the rootless sandbox where the
// kernel allows one (see sandbox.ProbeRootless), else the exec driver only
// where cfg.AllowHostExec allows it; DriverExec needs AllowHostExec too.
// The sandbox driver run by another user is rootless.
func NewDriver(cfg DriverConfig) (driver.Driver, string, error) {
	return newDriver(cfg, os.Geteuid() == 0)
}

// AutoKind is the driver DriverAuto picks: the sandbox as root, else exec.
func AutoKind(root bool) string {
	if root {
		return DriverSandbox
	}
	return DriverExec
}

func newDriver(cfg DriverConfig, root bool) (driver.Driver, string, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	kind := cfg.Kind
	if kind == "" {
		kind = DriverAuto
	}
	var noRootless error
	switch kind {
	case DriverAuto:
		kind = AutoKind(root)
		if !root {
			if noRootless = probeRootless(cfg.DataDir); noRootless == nil {
				kind = DriverSandbox
			} else {
				cfg.Logger.Warn("no rootless sandbox here: the exec driver instead", "err", noRootless)
			}
		}
	case DriverExec, DriverSandbox:
	default:
		return nil, "", fmt.Errorf("unknown driver %q: want auto, exec or sandbox", kind)
	}
	switch kind {
	case DriverExec:
		if !cfg.AllowHostExec {
			if cfg.Kind == DriverExec {
				return nil, "", ErrHostExecNotAllowed
			}
			return nil, "", fmt.Errorf("driver auto: not running as root, and %v; so no sandbox: %w", noRootless, ErrHostExecNotAllowed)
		}
		d, err := newExecDriver(cfg.Logger)
		return d, DriverExec, err
	default:
		d, err := newSandboxDriver(cfg)
		if err != nil {
			return nil, "", fmt.Errorf("sandbox driver: %w (no fallback: machines never run unsandboxed unless the exec driver is asked for)", err)
		}
		return d, DriverSandbox, nil
	}
}

func newExecDriver(log *slog.Logger) (driver.Driver, error) {
	images, err := ExecImages()
	if err != nil {
		return nil, err
	}
	return exec.New(exec.Config{Images: images}, log), nil
}

func newSandboxDriver(cfg DriverConfig) (driver.Driver, error) {
	if cfg.DataDir == "" {
		return nil, fmt.Errorf("sandbox driver: a data dir is required")
	}
	store, err := image.NewStore(image.StoreConfig{
		Dir:         filepath.Join(cfg.DataDir, "images"),
		Logger:      cfg.Logger,
		DialContext: cfg.Dial,
		Auth: func(registry string) string {
			if registry != cfg.Registry {
				return ""
			}
			if cfg.RegistryToken == "" && cfg.RegistryCredential != nil {
				return cfg.RegistryCredential()
			}
			return cfg.RegistryToken
		},
	})
	if err != nil {
		return nil, err
	}
	inst := cfg.Instance
	if inst == "" {
		if inst, err = sandbox.LoadInstance(cfg.DataDir); err != nil {
			return nil, fmt.Errorf("sandbox driver: %w", err)
		}
	}
	names, err := sandbox.InstanceNames(inst, cfg.Index)
	if err != nil {
		return nil, fmt.Errorf("sandbox driver: %w", err)
	}
	if cfg.Network != 0 && cfg.Host != 0 && names.Network != 0 {
		names.Network, names.Host = cfg.Network, cfg.Host
	}
	if inst == sandbox.LegacyInstance {
		cfg.Logger.Info("sandbox state from before instance ids: keeping the names it ran under",
			"bridge", names.Bridge, "cgroup", names.CgroupParent, "prefix", names.HostPrefix)
	}
	return sandbox.New(sandbox.Config{
		Images:       defaultRegistry{store, cfg.Registry},
		StateDir:     filepath.Join(cfg.DataDir, "sandbox"),
		Bridge:       names.Bridge,
		Network:      names.Network,
		Host:         names.Host,
		HostPrefix:   names.HostPrefix,
		CgroupParent: names.CgroupParent,
		// Whoever may run host commands may reach the host's services.
		HostAccess: cfg.AllowHostExec,
		Logger:     cfg.Logger,
	})
}

// defaultRegistry pulls references that name no registry from a default one.
type defaultRegistry struct {
	*image.Store
	registry string
}

// Pull pulls ref. The host's credentials go only with references it
// qualified itself: the control plane checked those against the machine's
// org and gives the platform registry's images without a registry. One that
// names the default registry itself slipped past that check (under a name
// the control plane does not know it by), and is pulled as anyone would.
func (d defaultRegistry) Pull(ctx context.Context, ref string) (*image.Image, error) {
	q := qualify(ref, d.registry)
	if p := d.registry + "/"; q == ref && d.registry != "" && len(ref) > len(p) && strings.EqualFold(ref[:len(p)], p) {
		return d.Store.PullAnonymous(ctx, ref)
	}
	return d.Store.Pull(ctx, q)
}

// qualify puts registry in front of ref when ref's first component is not a
// registry host (one with a dot or a port, or localhost).
func qualify(ref, registry string) string {
	if registry == "" {
		return ref
	}
	first, _, ok := strings.Cut(ref, "/")
	if ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return ref
	}
	return registry + "/" + ref
}
