package api

import "encoding/json"

// MachineConfig is a machine's full desired configuration. An update replaces
// it whole.
type MachineConfig struct {
	Image       string                  `json:"image"`
	Env         map[string]string       `json:"env,omitempty"`
	Init        MachineInit             `json:"init"`
	Guest       *MachineGuest           `json:"guest,omitempty"`
	Metadata    map[string]string       `json:"metadata,omitempty"`
	Mounts      []MachineMount          `json:"mounts,omitempty"`
	Services    []MachineService        `json:"services,omitempty"`
	Checks      map[string]MachineCheck `json:"checks,omitempty"`
	Restart     *MachineRestart         `json:"restart,omitempty"`
	AutoDestroy bool                    `json:"auto_destroy,omitempty"`
	StopConfig  *StopConfig             `json:"stop_config,omitempty"`
	Processes   []MachineProcess        `json:"processes,omitempty"`
	Files       []*File                 `json:"files,omitempty"`
	DNS         *DNSConfig              `json:"dns,omitempty"`
	Standbys    []string                `json:"standbys,omitempty"`
	Schedule    string                  `json:"schedule,omitempty"`
	Metrics     *MachineMetrics         `json:"metrics,omitempty"`
	Statics     []*Static               `json:"statics,omitempty"`
	VMSize      string                  `json:"size,omitempty"`
	// Accepted so Fly clients decode strictly; Flame does not act on them yet.
	Containers []json.RawMessage `json:"containers,omitempty"`
	Volumes    []json.RawMessage `json:"volumes,omitempty"`
	Rootfs     json.RawMessage   `json:"rootfs,omitempty"`
	CacheDrive json.RawMessage   `json:"cache_drive,omitempty"`
	Spot       json.RawMessage   `json:"spot,omitempty"`
	// DisableMachineAutostart is the older spelling of services[].autostart=false.
	DisableMachineAutostart *bool `json:"disable_machine_autostart,omitempty"`
}

// MachineInit overrides the image's command.
type MachineInit struct {
	Exec       []string `json:"exec,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	Tty        bool     `json:"tty,omitempty"`
	SwapSizeMB *int     `json:"swap_size_mb,omitempty"`
	KernelArgs []string `json:"kernel_args,omitempty"`
}

// CPU kinds.
const (
	CPUKindShared      = "shared"
	CPUKindPerformance = "performance"
)

// MachineGuest is the size of a machine.
type MachineGuest struct {
	CPUKind    string   `json:"cpu_kind,omitempty"`
	CPUs       int      `json:"cpus,omitempty"`
	MemoryMB   int      `json:"memory_mb,omitempty"`
	GPUs       int      `json:"gpus,omitempty"`
	GPUKind    string   `json:"gpu_kind,omitempty"`
	KernelArgs []string `json:"kernel_args,omitempty"`
	// RootfsSizeMB caps what the machine writes to its root filesystem
	// (DefaultGuestRootfsSizeMB when unset).
	RootfsSizeMB int `json:"rootfs_size_mb,omitempty"`
	// Accepted for Fly clients; not acted on.
	MaxMemoryMB      int    `json:"max_memory_mb,omitempty"`
	HostDedicationID string `json:"host_dedication_id,omitempty"`
	PersistRootfs    string `json:"persist_rootfs,omitempty"`
}

// MachineMount attaches a volume.
type MachineMount struct {
	Volume                 string `json:"volume,omitempty"`
	Path                   string `json:"path,omitempty"`
	Name                   string `json:"name,omitempty"`
	SizeGb                 int    `json:"size_gb,omitempty"`
	Encrypted              bool   `json:"encrypted,omitempty"`
	ExtendThresholdPercent int    `json:"extend_threshold_percent,omitempty"`
	AddSizeGb              int    `json:"add_size_gb,omitempty"`
	SizeGbLimit            int    `json:"size_gb_limit,omitempty"`
}

// MachineService exposes a port of the machine through the proxy.
type MachineService struct {
	Protocol           string                     `json:"protocol,omitempty"`
	InternalPort       int                        `json:"internal_port,omitempty"`
	Autostop           *Autostop                  `json:"autostop,omitempty"`
	Autostart          *bool                      `json:"autostart,omitempty"`
	MinMachinesRunning *int                       `json:"min_machines_running,omitempty"`
	Ports              []MachinePort              `json:"ports,omitempty"`
	Checks             []MachineServiceCheck      `json:"checks,omitempty"`
	Concurrency        *MachineServiceConcurrency `json:"concurrency,omitempty"`
	ForceInstanceKey   *string                    `json:"force_instance_key,omitempty"`
	// ForceInstanceDescription is accepted for Fly clients; not acted on.
	ForceInstanceDescription *string `json:"force_instance_description,omitempty"`
}

// MachinePort is one public port (or port range) of a service.
type MachinePort struct {
	Port              *int               `json:"port,omitempty"`
	StartPort         *int               `json:"start_port,omitempty"`
	EndPort           *int               `json:"end_port,omitempty"`
	Handlers          []string           `json:"handlers,omitempty"`
	ForceHTTPS        bool               `json:"force_https,omitempty"`
	TLSOptions        *TLSOptions        `json:"tls_options,omitempty"`
	HTTPOptions       *HTTPOptions       `json:"http_options,omitempty"`
	ProxyProtoOptions *ProxyProtoOptions `json:"proxy_proto_options,omitempty"`
}

// TLSOptions tune the tls handler.
type TLSOptions struct {
	ALPN              []string `json:"alpn,omitempty"`
	Versions          []string `json:"versions,omitempty"`
	DefaultSelfSigned *bool    `json:"default_self_signed,omitempty"`
}

// HTTPOptions tune the http handler.
type HTTPOptions struct {
	Compress           *bool                `json:"compress,omitempty"`
	Response           *HTTPResponseOptions `json:"response,omitempty"`
	H2Backend          *bool                `json:"h2_backend,omitempty"`
	IdleTimeout        *uint32              `json:"idle_timeout,omitempty"`
	HeadersReadTimeout *uint32              `json:"headers_read_timeout,omitempty"`
	// ReplayCache is accepted for Fly clients; not acted on yet.
	ReplayCache []json.RawMessage `json:"replay_cache,omitempty"`
}

// HTTPResponseOptions change responses passing through the http handler.
type HTTPResponseOptions struct {
	Headers  map[string]any `json:"headers,omitempty"`
	Pristine *bool          `json:"pristine,omitempty"`
}

// ProxyProtoOptions tune the proxy_proto handler.
type ProxyProtoOptions struct {
	Version string `json:"version,omitempty"`
}

// Concurrency types.
const (
	ConcurrencyConnections = "connections"
	ConcurrencyRequests    = "requests"
)

// MachineServiceConcurrency limits the load the proxy sends to one machine.
type MachineServiceConcurrency struct {
	Type      string `json:"type,omitempty"`
	HardLimit int    `json:"hard_limit,omitempty"`
	SoftLimit int    `json:"soft_limit,omitempty"`
}

// MachineServiceCheck is a health check that gates routing to the machine.
type MachineServiceCheck struct {
	Type          *string             `json:"type,omitempty"`
	Port          *int                `json:"port,omitempty"`
	Interval      *Duration           `json:"interval,omitempty"`
	Timeout       *Duration           `json:"timeout,omitempty"`
	GracePeriod   *Duration           `json:"grace_period,omitempty"`
	Method        *string             `json:"method,omitempty"`
	Path          *string             `json:"path,omitempty"`
	Protocol      *string             `json:"protocol,omitempty"`
	TLSSkipVerify *bool               `json:"tls_skip_verify,omitempty"`
	TLSServerName *string             `json:"tls_server_name,omitempty"`
	Headers       []MachineHTTPHeader `json:"headers,omitempty"`
}

// MachineCheck is a top-level health check: it reports, it does not gate routing.
type MachineCheck struct {
	Type          *string             `json:"type,omitempty"`
	Port          *int                `json:"port,omitempty"`
	Interval      *Duration           `json:"interval,omitempty"`
	Timeout       *Duration           `json:"timeout,omitempty"`
	GracePeriod   *Duration           `json:"grace_period,omitempty"`
	Method        *string             `json:"method,omitempty"`
	Path          *string             `json:"path,omitempty"`
	Protocol      *string             `json:"protocol,omitempty"`
	TLSSkipVerify *bool               `json:"tls_skip_verify,omitempty"`
	TLSServerName *string             `json:"tls_server_name,omitempty"`
	Headers       []MachineHTTPHeader `json:"headers,omitempty"`
	Kind          *string             `json:"kind,omitempty"` // informational | readiness
}

// MachineHTTPHeader is one header an HTTP check sends.
type MachineHTTPHeader struct {
	Name   string   `json:"name"`
	Values []string `json:"values"`
}

// Restart policies.
const (
	RestartNo        = "no"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// DefaultMaxRetries is how often an on-failure machine is restarted before it
// is left failed, when the config does not say.
const DefaultMaxRetries = 10

// MachineRestart says what happens when the machine's process exits on its own.
type MachineRestart struct {
	Policy     string `json:"policy,omitempty"`
	MaxRetries int    `json:"max_retries,omitempty"`
	// GPUBidPrice is accepted for Fly clients; not acted on.
	GPUBidPrice float32 `json:"gpu_bid_price,omitempty"`
}

// StopConfig says how a machine is stopped.
type StopConfig struct {
	Timeout *Duration `json:"timeout,omitempty"`
	Signal  *string   `json:"signal,omitempty"`
}

// MachineProcess is one process of the machine (overrides of init).
type MachineProcess struct {
	Exec             []string          `json:"exec,omitempty"`
	Entrypoint       []string          `json:"entrypoint,omitempty"`
	Cmd              []string          `json:"cmd,omitempty"`
	User             string            `json:"user,omitempty"`
	Env              map[string]string `json:"env,omitempty"`
	IgnoreAppSecrets bool              `json:"ignore_app_secrets,omitempty"`
	// Accepted for Fly clients; not acted on yet.
	Secrets []json.RawMessage `json:"secrets,omitempty"`
	EnvFrom []json.RawMessage `json:"env_from,omitempty"`
}

// File is written into the machine's filesystem before it starts.
type File struct {
	GuestPath  string  `json:"guest_path"`
	RawValue   *string `json:"raw_value,omitempty"` // base64
	SecretName *string `json:"secret_name,omitempty"`
	Mode       uint32  `json:"mode,omitempty"`
	// ImageConfig is accepted for Fly clients; not acted on.
	ImageConfig *string `json:"image_config,omitempty"`
}

// DNSConfig tunes the machine's resolver and registration.
type DNSConfig struct {
	SkipRegistration bool     `json:"skip_registration,omitempty"`
	Nameservers      []string `json:"nameservers,omitempty"`
	Searches         []string `json:"searches,omitempty"`
	Hostname         string   `json:"hostname,omitempty"`
	// Accepted for Fly clients; not acted on yet.
	HostnameFqdn    string            `json:"hostname_fqdn,omitempty"`
	Options         []json.RawMessage `json:"options,omitempty"`
	DNSForwardRules []json.RawMessage `json:"dns_forward_rules,omitempty"`
}

// MachineMetrics says where the machine exposes Prometheus metrics.
type MachineMetrics struct {
	Port  int    `json:"port,omitempty"`
	Path  string `json:"path,omitempty"`
	HTTPS bool   `json:"https,omitempty"`
}

// Static is a path the proxy serves from storage instead of the machine.
type Static struct {
	GuestPath     string `json:"guest_path"`
	URLPrefix     string `json:"url_prefix"`
	TigrisBucket  string `json:"tigris_bucket,omitempty"`
	IndexDocument string `json:"index_document,omitempty"`
}
