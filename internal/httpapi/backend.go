package httpapi

import (
	"context"
	"time"

	"github.com/flamehq/flame/api"
)

// MachineRef names the machine a call is about, with the lease nonce the
// caller presented (empty when none). The backend checks the nonce in the same
// step as the change it guards.
type MachineRef struct {
	App        string
	ID         string
	LeaseNonce string
}

// ListFilter narrows a machine listing.
type ListFilter struct {
	Region         string
	Metadata       map[string]string // every pair must match
	IncludeDeleted bool
}

// RestartOptions tune a restart.
type RestartOptions struct {
	Signal    string
	Timeout   time.Duration // 0 = the machine's stop_config or default
	ForceStop bool          // kill at once instead of waiting
}

// WaitOptions say what a wait waits for.
type WaitOptions struct {
	States     []string      // any of these; the handler fills in api.StateStarted when none
	InstanceID string        // wait for this version to reach State
	Timeout    time.Duration // default 60 s, at most 60 s
}

// LogOptions select log lines.
type LogOptions struct {
	Tail   int  // the last Tail lines (0 = all kept)
	Follow bool // keep streaming until ctx ends
}

// Backend answers the Machines API. The host agent implements it for its own
// machines; the control plane implements it for the whole cluster. Errors
// should be *api.Error (anything else answers 500).
type Backend interface {
	CreateMachine(ctx context.Context, app string, in api.LaunchMachineInput) (*api.Machine, error)
	GetMachine(ctx context.Context, ref MachineRef) (*api.Machine, error)
	ListMachines(ctx context.Context, app string, f ListFilter) ([]*api.Machine, error)
	UpdateMachine(ctx context.Context, ref MachineRef, in api.LaunchMachineInput) (*api.Machine, error)
	StartMachine(ctx context.Context, ref MachineRef) (*api.StartResponse, error)
	StopMachine(ctx context.Context, ref MachineRef, in api.StopMachineInput) error
	RestartMachine(ctx context.Context, ref MachineRef, o RestartOptions) error
	SignalMachine(ctx context.Context, ref MachineRef, signal string) error
	SuspendMachine(ctx context.Context, ref MachineRef) error
	// WaitMachine returns the machine once it is in any of o.States; it
	// fails with api.ErrTimeout when o.Timeout runs out first.
	WaitMachine(ctx context.Context, ref MachineRef, o WaitOptions) (*api.Machine, error)
	// DestroyMachine removes a machine; a running one only with force
	// (stopped with SIGKILL at once).
	DestroyMachine(ctx context.Context, ref MachineRef, force bool) error

	Events(ctx context.Context, ref MachineRef) ([]*api.MachineEvent, error)
	Versions(ctx context.Context, ref MachineRef) ([]*api.MachineVersion, error)
	Processes(ctx context.Context, ref MachineRef) ([]api.ProcessStat, error)
	Exec(ctx context.Context, ref MachineRef, in api.ExecRequest) (*api.ExecResponse, error)
	// Logs calls emit for each selected line, oldest first; with Follow it
	// keeps calling it for new lines until ctx ends.
	Logs(ctx context.Context, ref MachineRef, o LogOptions, emit func(api.LogEntry) error) error

	GetLease(ctx context.Context, ref MachineRef) (*api.Lease, error)
	// AcquireLease takes the lease, or refreshes it when ref.LeaseNonce is
	// the current holder's nonce; a lease held by someone else is api.ErrConflict.
	AcquireLease(ctx context.Context, ref MachineRef, in api.LeaseInput) (*api.Lease, error)
	ReleaseLease(ctx context.Context, ref MachineRef) error

	// Cordon takes the machine out of the proxy's rotation (on=false puts it back).
	Cordon(ctx context.Context, ref MachineRef, on bool) error
	Metadata(ctx context.Context, ref MachineRef) (map[string]string, error)
	SetMetadata(ctx context.Context, ref MachineRef, key, value string) error
	DeleteMetadata(ctx context.Context, ref MachineRef, key string) error
}
