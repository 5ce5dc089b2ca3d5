package api

import (
	"encoding/json"
	"fmt"
	"strconv"
	"time"
)

// Machine states, as the API names them. The lifecycle (internal/machine)
// is their one home: it owns the list, their kinds and the transitions
// between them. These are its names on the wire, repeated here because the
// domain package reaches no implementation; a test proves they agree.
const (
	StateCreating     = "creating"
	StateCreated      = "created"
	StateStarting     = "starting"
	StateStarted      = "started"
	StateStopping     = "stopping"
	StateStopped      = "stopped"
	StateRestarting   = "restarting"
	StateSuspending   = "suspending"
	StateSuspended    = "suspended"
	StateUpdating     = "updating"
	StateReplacing    = "replacing"
	StateReplaced     = "replaced"
	StateDestroying   = "destroying"
	StateDestroyed    = "destroyed"
	StateFailed       = "failed"
	StateLaunchFailed = "launch_failed"
)

// Host statuses of a machine as seen by whoever answers for it.
const (
	HostStatusOK          = "ok"
	HostStatusUnknown     = "unknown"
	HostStatusUnreachable = "unreachable"
)

// Machine is one machine as the API returns it.
type Machine struct {
	ID         string          `json:"id"`
	Name       string          `json:"name,omitempty"`
	State      string          `json:"state"`
	Region     string          `json:"region,omitempty"`
	ImageRef   ImageRef        `json:"image_ref"`
	InstanceID string          `json:"instance_id,omitempty"`
	Version    string          `json:"version,omitempty"`
	PrivateIP  string          `json:"private_ip,omitempty"`
	CreatedAt  string          `json:"created_at,omitempty"`
	UpdatedAt  string          `json:"updated_at,omitempty"`
	Config     *MachineConfig  `json:"config,omitempty"`
	Events     []*MachineEvent `json:"events,omitempty"`
	Checks     []*CheckStatus  `json:"checks,omitempty"`
	LeaseNonce string          `json:"nonce,omitempty"`
	HostStatus string          `json:"host_status,omitempty"`
	Cordoned   bool            `json:"cordoned,omitempty"`
	// IncompleteConfig is set instead of Config when the host owning the
	// machine cannot be asked for the full configuration.
	IncompleteConfig *MachineConfig `json:"incomplete_config,omitempty"`
}

// ImageRef is the resolved image a machine runs.
type ImageRef struct {
	Registry   string            `json:"registry,omitempty"`
	Repository string            `json:"repository,omitempty"`
	Tag        string            `json:"tag,omitempty"`
	Digest     string            `json:"digest,omitempty"`
	Labels     map[string]string `json:"labels,omitempty"`
}

// Event types.
const (
	EventLaunch  = "launch"
	EventStart   = "start"
	EventExit    = "exit"
	EventUpdate  = "update"
	EventStop    = "stop"
	EventRestart = "restart"
	EventDestroy = "destroy"
	EventSuspend = "suspend"
	// EventPublish (a Flame extension) reports a machine its host could not
	// publish to the cluster (status "rejected", the reason in the message):
	// DNS and the proxy do not see it.
	EventPublish = "publish"
)

// Event sources.
const (
	SourceUser = "user"
	// SourceFlyd marks events the host agent caused on its own (Flame's agent
	// plays the part Fly calls flyd, and clients match on the name).
	SourceFlyd = "flyd"
)

// MachineEvent is one entry of a machine's event log.
type MachineEvent struct {
	ID        string          `json:"id,omitempty"`
	Type      string          `json:"type"`
	Status    string          `json:"status"`
	Source    string          `json:"source,omitempty"`
	Timestamp int64           `json:"timestamp"` // milliseconds since the Unix epoch
	Request   *MachineRequest `json:"request,omitempty"`
}

// Time returns the event's timestamp as a time.Time.
func (e *MachineEvent) Time() time.Time { return time.UnixMilli(e.Timestamp) }

// MachineRequest is the detail attached to an event.
type MachineRequest struct {
	ExitEvent    *ExitEvent `json:"exit_event,omitempty"`
	RestartCount int        `json:"restart_count,omitempty"`
	// Message says why, in words, when the event alone does not (a failed launch).
	Message string `json:"message,omitempty"`
}

// ExitEvent describes how a machine's main process ended.
type ExitEvent struct {
	ExitCode      int       `json:"exit_code"`
	Signal        int       `json:"signal,omitempty"`
	OOMKilled     bool      `json:"oom_killed,omitempty"`
	RequestedStop bool      `json:"requested_stop,omitempty"`
	Restarting    bool      `json:"restarting,omitempty"`
	ExitedAt      time.Time `json:"exited_at"`
}

// Check statuses.
const (
	CheckPassing  = "passing"
	CheckWarning  = "warning"
	CheckCritical = "critical"
)

// CheckStatus is the last result of one health check.
type CheckStatus struct {
	Name      string     `json:"name"`
	Status    string     `json:"status"`
	Output    string     `json:"output,omitempty"`
	UpdatedAt *time.Time `json:"updated_at,omitempty"`
}

// LaunchMachineInput is the body of a create (and of an update).
type LaunchMachineInput struct {
	Config                  *MachineConfig `json:"config"`
	Region                  string         `json:"region,omitempty"`
	Name                    string         `json:"name,omitempty"`
	SkipLaunch              bool           `json:"skip_launch,omitempty"`
	SkipServiceRegistration bool           `json:"skip_service_registration,omitempty"`
	SkipSecrets             bool           `json:"skip_secrets,omitempty"`
	MinSecretsVersion       *uint64        `json:"min_secrets_version,omitempty"`
	LeaseTTL                int            `json:"lease_ttl,omitempty"`
	// CurrentVersion, on an update, must match the machine's instance_id when set.
	CurrentVersion string `json:"current_version,omitempty"`

	// The fields below are set by Flame's control plane when it asks a host
	// to run a machine; its public API refuses them.

	// ID is the machine id the control plane chose (14 lowercase hex).
	ID string `json:"id,omitempty"`
	// Org is the slug of the org that owns the app.
	Org string `json:"org,omitempty"`
	// OrgNetwork is the org's number in the private network (1–65535),
	// the same on every host; a host numbers orgs itself when it is 0.
	OrgNetwork uint16 `json:"org_network,omitempty"`
	// Secrets are the app's secrets in plain text, given to the workload as
	// environment variables and never shown in the machine's config.
	Secrets map[string]string `json:"secrets,omitempty"`
}

// StopMachineInput is the body of a stop.
type StopMachineInput struct {
	Signal  string    `json:"signal,omitempty"`
	Timeout *Duration `json:"timeout,omitempty"`
}

// SignalMachineInput is the body of a signal.
type SignalMachineInput struct {
	Signal string `json:"signal"`
}

// signalNames are the signals Fly's API names, by their Linux numbers.
var signalNames = map[int64]string{
	1: "SIGHUP", 2: "SIGINT", 3: "SIGQUIT", 9: "SIGKILL",
	10: "SIGUSR1", 12: "SIGUSR2", 15: "SIGTERM",
}

// UnmarshalJSON reads the signal as a name ("SIGKILL") or, as Fly's own client
// sends it for a kill, as a number (9), which becomes its name.
func (s *SignalMachineInput) UnmarshalJSON(b []byte) error {
	var raw struct {
		Signal json.RawMessage `json:"signal"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	if len(raw.Signal) == 0 || string(raw.Signal) == "null" {
		s.Signal = ""
		return nil
	}
	if err := json.Unmarshal(raw.Signal, &s.Signal); err == nil {
		return nil
	}
	var n int64
	if err := json.Unmarshal(raw.Signal, &n); err != nil {
		return fmt.Errorf("invalid signal %s: want a name like \"SIGTERM\" or a number", raw.Signal)
	}
	if name, ok := signalNames[n]; ok {
		s.Signal = name
	} else {
		s.Signal = strconv.FormatInt(n, 10)
	}
	return nil
}

// StartResponse answers a start.
type StartResponse struct {
	Message       string `json:"message,omitempty"`
	Status        string `json:"status,omitempty"`
	PreviousState string `json:"previous_state,omitempty"`
}

// OK is the body of calls that answer nothing but success.
type OK struct {
	OK bool `json:"ok"`
}

// ExecRequest is the body of an exec. Command is the argv; Cmd, a single
// shell-style string, is accepted for older clients.
type ExecRequest struct {
	Command   []string `json:"command,omitempty"`
	Cmd       string   `json:"cmd,omitempty"`
	Container string   `json:"container,omitempty"`
	Stdin     string   `json:"stdin,omitempty"`
	Timeout   int      `json:"timeout,omitempty"` // seconds
}

// ExecResponse is what an exec answers.
type ExecResponse struct {
	ExitCode int    `json:"exit_code"`
	Stdout   string `json:"stdout"`
	Stderr   string `json:"stderr"`
}

// MachineVersion is one config version of a machine.
type MachineVersion struct {
	Version   string         `json:"version"` // the instance_id of that version
	State     string         `json:"state"`
	CreatedAt string         `json:"created_at,omitempty"`
	Config    *MachineConfig `json:"config,omitempty"`
}

// ProcessStat is one row of a machine's process list.
type ProcessStat struct {
	Pid       int32  `json:"pid"`
	Command   string `json:"command"`
	Directory string `json:"directory"`
	CPU       uint64 `json:"cpu"`
	RSS       uint64 `json:"rss"`
	Stime     uint64 `json:"stime"`
	Rtime     uint64 `json:"rtime"`
}

// Lease is the state of a machine's lease.
type Lease struct {
	Status  string     `json:"status,omitempty"`
	Data    *LeaseData `json:"data,omitempty"`
	Message string     `json:"message,omitempty"`
	Code    string     `json:"code,omitempty"`
}

// LeaseData is a held lease.
type LeaseData struct {
	Nonce       string `json:"nonce,omitempty"`
	ExpiresAt   int64  `json:"expires_at,omitempty"` // Unix seconds
	Owner       string `json:"owner,omitempty"`
	Description string `json:"description,omitempty"`
	Version     string `json:"version,omitempty"`
}

// LeaseInput is the body of a lease acquisition or refresh.
type LeaseInput struct {
	TTL         int    `json:"ttl,omitempty"` // seconds
	Description string `json:"description,omitempty"`
}

// LeaseNonceHeader carries a lease's nonce on every mutating call while a
// machine is leased.
const LeaseNonceHeader = "fly-machine-lease-nonce"

// MetadataInput is the body of a metadata write.
type MetadataInput struct {
	Value string `json:"value"`
}

// LogEntry is one line of a machine's output.
type LogEntry struct {
	Timestamp time.Time `json:"timestamp"`
	Stream    string    `json:"stream,omitempty"` // stdout or stderr, when known
	Message   string    `json:"message"`
	MachineID string    `json:"instance,omitempty"`
	Region    string    `json:"region,omitempty"`
}
