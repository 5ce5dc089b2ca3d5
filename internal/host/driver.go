package host

import (
	"context"
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
)

// Driver kinds.
const (
	DriverAuto    = "auto"    // sandbox when running as root and it works, else exec
	DriverExec    = "exec"    // host processes, no isolation
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
	Index  int
	Logger *slog.Logger
}

// NewDriver builds the driver cfg asks for and says which one it built. With
// DriverAuto a sandbox that cannot start (not root, no cgroups) falls back to
// the exec driver, with a warning.
func NewDriver(cfg DriverConfig) (driver.Driver, string, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	kind := cfg.Kind
	if kind == "" {
		kind = DriverAuto
	}
	switch kind {
	case DriverExec:
		d, err := newExecDriver(cfg.Logger)
		return d, DriverExec, err
	case DriverSandbox:
		d, err := newSandboxDriver(cfg)
		return d, DriverSandbox, err
	case DriverAuto:
		if os.Geteuid() == 0 {
			d, err := newSandboxDriver(cfg)
			if err == nil {
				return d, DriverSandbox, nil
			}
			cfg.Logger.Warn("sandbox driver unavailable; machines run as plain host processes", "err", err)
		} else {
			cfg.Logger.Warn("not running as root: machines run as plain host processes without isolation (exec driver)")
		}
		d, err := newExecDriver(cfg.Logger)
		return d, DriverExec, err
	}
	return nil, "", fmt.Errorf("unknown driver %q: want auto, exec or sandbox", kind)
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
			if registry == cfg.Registry {
				return cfg.RegistryToken
			}
			return ""
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
	if inst == sandbox.LegacyInstance {
		cfg.Logger.Info("sandbox state from before instance ids: keeping the names it ran under",
			"bridge", names.Bridge, "cgroup", names.CgroupParent, "prefix", names.HostPrefix)
	}
	return sandbox.New(sandbox.Config{
		Images:       defaultRegistry{store, cfg.Registry},
		StateDir:     filepath.Join(cfg.DataDir, "sandbox"),
		Bridge:       names.Bridge,
		HostPrefix:   names.HostPrefix,
		CgroupParent: names.CgroupParent,
		Logger:       cfg.Logger,
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
