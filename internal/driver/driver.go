// Package driver defines how the host agent runs a machine's workload: the
// Driver interface and the values that cross it. Implementations live in
// sub-packages (exec, fake; sandboxes and microVMs later).
package driver

import (
	"context"
	"errors"
	"syscall"
	"time"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// Spec is everything a driver needs to run one instance (config version) of a
// machine. The agent builds it from the machine's config; drivers never read
// the agent's store.
type Spec struct {
	MachineID  string
	InstanceID string
	App        string
	Region     string
	// Org is the number of the machine's org in the private network
	// (internal/mesh/layout): drivers that give machines addresses put
	// it in the org's network, which is all the machine may reach there.
	Org layout.Org
	// Dir is a directory the agent owns for this machine; a driver may keep
	// files there. It exists before Prepare is called.
	Dir string
	// LogPath is the file the workload's stdout and stderr are appended to.
	// It must survive the agent: a workload re-adopted by a new agent keeps
	// writing there.
	LogPath string
	// Image is the machine's image reference, as configured.
	Image string
	// Entrypoint and Cmd come from the config's init; with an empty
	// Entrypoint the driver uses the image's own.
	Entrypoint []string
	Cmd        []string
	// Env is the full environment of the workload, FLY_* variables included.
	Env map[string]string
	// MemoryMB and CPUs are the guest size (drivers that can, enforce them).
	MemoryMB int
	CPUs     int
	// RootfsSizeMB caps what the workload writes to its root filesystem
	// (drivers that can, enforce it; 0: api.DefaultGuestRootfsSizeMB).
	RootfsSizeMB int
	// Ports are the TCP ports the host reaches the workload on: its TCP
	// services' internal ports and its health checks' ports, sorted, each
	// once. Drivers whose machines the host cannot route to (the rootless
	// sandbox) forward these from the machine's address; others ignore it.
	Ports []int
}

// Image is what Prepare resolved a spec's image reference to.
type Image struct {
	// Ref is the reference as resolved (a registry's canonical name, or the
	// host program for drivers that run host programs).
	Ref string
	// Digest is the image manifest's digest ("sha256:…"), empty when the
	// driver does not run images from a registry.
	Digest string
}

// Exit is how a workload ended.
type Exit struct {
	Code      int            // exit status; -1 when killed by a signal or unknown
	Signal    syscall.Signal // the signal that killed it, 0 if none
	OOMKilled bool
	// Unknown is set when the driver saw the workload end but could not learn
	// its status (a re-adopted process that is not the agent's child).
	Unknown bool
	At      time.Time
}

// Failed reports whether the exit counts as a failure for restart policies.
func (e Exit) Failed() bool { return e.Unknown || e.Signal != 0 || e.Code != 0 || e.OOMKilled }

// Process is a running workload.
type Process interface {
	// Handle identifies the workload durably: the agent records it and hands
	// it back to Adopt after a restart.
	Handle() string
	// Pid is the workload's main process id on the host (0 if none).
	Pid() int
	// Signal delivers sig to the workload (its whole process group).
	Signal(sig syscall.Signal) error
	// Stop delivers sig, waits up to timeout for the workload to end, then
	// kills it with SIGKILL, and returns how it ended.
	Stop(ctx context.Context, sig syscall.Signal, timeout time.Duration) (Exit, error)
	// Done is closed once the workload has ended.
	Done() <-chan struct{}
	// Exit is how it ended; valid once Done is closed.
	Exit() Exit
}

// ExecResult is the output of a command run inside a machine.
type ExecResult struct {
	ExitCode int
	Stdout   []byte
	Stderr   []byte
}

// Driver runs workloads.
type Driver interface {
	// Name is the driver's name as configured ("exec", "fake", ...).
	Name() string
	// Prepare makes everything ready to Start spec: it resolves the image
	// (pulling it if the driver pulls images) and fails with ErrImage when
	// the image does not exist or is not one it runs, and with
	// ErrUnavailable when it could not get the image now (registry down or
	// failing, a local disk or unpack error): a retry, here or on another
	// host, may succeed. Prepare is idempotent.
	Prepare(ctx context.Context, spec Spec) (Image, error)
	// Start starts the workload and returns once it runs (for exec: once the
	// program has been executed).
	Start(ctx context.Context, spec Spec) (Process, error)
	// Adopt reattaches to a workload started earlier, possibly by another
	// agent process, from its recorded handle. With an empty handle it looks
	// for a workload of spec's instance that was started but never recorded
	// (the agent died between Start and its record). It returns ErrGone when
	// no such workload runs.
	Adopt(ctx context.Context, spec Spec, handle string) (Process, error)
	// Exec runs command in the machine's context and returns its output.
	Exec(ctx context.Context, spec Spec, command []string, stdin []byte) (ExecResult, error)
	// Cleanup removes what Prepare and Start left behind for spec. The
	// workload has ended. Cleanup is idempotent.
	Cleanup(ctx context.Context, spec Spec) error
}

// Errors drivers return.
var (
	// ErrImage: the image does not exist, its reference does not parse or
	// names something this driver does not run, or it has nothing to run.
	// Retrying does not help.
	ErrImage = errors.New("image not runnable")
	// ErrUnavailable: the image could not be got now: its registry cannot
	// be reached or failed, or storing it on this host failed. Retrying
	// later, or on another host, may succeed.
	ErrUnavailable = errors.New("image unavailable")
	// ErrGone: the workload to adopt no longer runs.
	ErrGone = errors.New("workload gone")
)
