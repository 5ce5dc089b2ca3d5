package api

import (
	"context"
	"slices"
	"time"
)

// Backend is the Machines API as a Go interface: the contract that a host's
// agent (its own machines) and the control plane (the whole cluster)
// implement, that internal/httpapi serves over HTTP, and that a *Client
// speaks to a remote one. A control plane forwards a call to a host by
// calling the same method on a Client pointed at that host.
//
// Errors are *Error values carrying the API's status (anything else is an
// internal error); they cross HTTP unchanged, so callers on either side test
// them with errors.Is against the sentinels (ErrNotFound, ErrConflict, ...).
type Backend interface {
	CreateMachine(ctx context.Context, app string, in LaunchMachineInput) (*Machine, error)
	GetMachine(ctx context.Context, ref MachineRef) (*Machine, error)
	ListMachines(ctx context.Context, app string, o ListMachinesOptions) ([]*Machine, error)
	UpdateMachine(ctx context.Context, ref MachineRef, in LaunchMachineInput) (*Machine, error)
	StartMachine(ctx context.Context, ref MachineRef) (*StartResponse, error)
	StopMachine(ctx context.Context, ref MachineRef, in StopMachineInput) error
	RestartMachine(ctx context.Context, ref MachineRef, o RestartOptions) error
	SignalMachine(ctx context.Context, ref MachineRef, signal string) error
	SuspendMachine(ctx context.Context, ref MachineRef) error
	// WaitMachine returns the machine once it is in any of o.Wanted(); it
	// fails with ErrTimeout when o.Timeout runs out first.
	WaitMachine(ctx context.Context, ref MachineRef, o WaitOptions) (*Machine, error)
	// DestroyMachine removes a machine; a running one only with force
	// (stopped with SIGKILL at once).
	DestroyMachine(ctx context.Context, ref MachineRef, force bool) error

	MachineEvents(ctx context.Context, ref MachineRef) ([]*MachineEvent, error)
	MachineVersions(ctx context.Context, ref MachineRef) ([]*MachineVersion, error)
	MachineProcesses(ctx context.Context, ref MachineRef) ([]ProcessStat, error)
	ExecMachine(ctx context.Context, ref MachineRef, in ExecRequest) (*ExecResponse, error)
	// MachineLogs calls emit for each selected line, oldest first; with
	// Follow it keeps calling it for new lines until ctx ends.
	MachineLogs(ctx context.Context, ref MachineRef, o LogOptions, emit func(LogEntry) error) error

	MachineLease(ctx context.Context, ref MachineRef) (*Lease, error)
	// AcquireMachineLease takes the lease, or refreshes it when
	// ref.LeaseNonce is the current holder's nonce; a lease held by someone
	// else is ErrConflict.
	AcquireMachineLease(ctx context.Context, ref MachineRef, in LeaseInput) (*Lease, error)
	ReleaseMachineLease(ctx context.Context, ref MachineRef) error

	// CordonMachine takes the machine out of the proxy's rotation (on=false
	// puts it back).
	CordonMachine(ctx context.Context, ref MachineRef, on bool) error
	MachineMetadata(ctx context.Context, ref MachineRef) (map[string]string, error)
	SetMachineMetadata(ctx context.Context, ref MachineRef, key, value string) error
	DeleteMachineMetadata(ctx context.Context, ref MachineRef, key string) error
}

// MachineRef names the machine a call is about, with the lease nonce the
// caller presented (empty when none). A backend checks the nonce in the same
// step as the change it guards; over HTTP it travels in LeaseNonceHeader.
type MachineRef struct {
	App        string
	ID         string
	LeaseNonce string
}

// ListMachinesOptions narrow a listing.
type ListMachinesOptions struct {
	Region         string            // only machines in this region
	IncludeDeleted bool              // destroyed machines too
	Metadata       map[string]string // only machines with every one of these pairs
}

// RestartOptions tune a restart. Over HTTP they travel in the query string.
type RestartOptions struct {
	ForceStop bool          // kill at once instead of a graceful stop
	Timeout   time.Duration // grace before SIGKILL; 0 = the machine's own
	Signal    string        // stop signal; "" = the machine's own
}

// WaitOptions say what a wait waits for.
type WaitOptions struct {
	State       string        // a state to wait for (Fly's single state)
	States      []string      // more states, any of which ends the wait
	Timeout     time.Duration // 0 = the server's default (60 s, also the most it allows); sent in whole seconds, rounded up
	InstanceID  string        // wait for this version of the machine
	FromEventID string        // consider only events after this one
}

// Wanted returns the states the wait ends on: State, then States, without
// repeats; none means StateStarted.
func (o WaitOptions) Wanted() []string {
	var out []string
	for _, s := range append([]string{o.State}, o.States...) {
		if s != "" && !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	if len(out) == 0 {
		out = []string{StateStarted}
	}
	return out
}

// LogOptions select log lines.
type LogOptions struct {
	Tail   int  // only the last Tail lines; 0 = all the server keeps
	Follow bool // keep streaming new lines until the context ends
}
