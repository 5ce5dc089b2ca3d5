package cluster

import (
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/place"
)

// Resources is an amount of compute: a host's capacity, or what it has
// free. It is placement's type, named here for the records that carry it.
type Resources = place.Resources

// Check statuses.
const (
	CheckPassing  = "passing"
	CheckWarning  = "warning"
	CheckCritical = "critical"
)

// MaxLoad is the most a machine's published load may say: the largest
// concurrency limit a service may declare, so a load at MaxLoad is at every
// hard limit. A host clamps what it counts to it.
const MaxLoad = api.MaxConcurrencyLimit

// Machine is what every host knows of one machine: enough to route to it,
// answer DNS for it and count it in placement. Its full configuration stays
// with the host that runs it.
type Machine struct {
	ID           string `json:"id"`
	App          string `json:"app"`
	Org          string `json:"org,omitempty"`
	Region       string `json:"region"`
	State        string `json:"state"`
	InstanceID   string `json:"instance_id,omitempty"`
	PrivateIP    string `json:"private_ip,omitempty"`
	ProcessGroup string `json:"process_group,omitempty"`
	// PrimaryRegion is the app's primary region as the machine's config
	// says it (its PRIMARY_REGION); empty means the machine's own region.
	// Autostop counts min_machines_running there.
	PrimaryRegion string `json:"primary_region,omitempty"`
	Cordoned      bool   `json:"cordoned,omitempty"`
	// Draining is set, with Cordoned, while autostop drains the machine
	// before stopping it: an edge with no other machine for a request asks
	// its host to keep it instead (see internal/proxy).
	Draining bool          `json:"draining,omitempty"`
	Services []Service     `json:"services,omitempty"`
	Checks   []CheckStatus `json:"checks,omitempty"`
	// Load is the requests and connections in flight to the machine through
	// its host's proxy, as the host last sampled it (at most MaxLoad: a
	// count past it is past every hard limit anyway).
	Load int `json:"load,omitempty"`

	// Host is the host that published the machine. It is set by the cluster
	// from the record's owner and never taken from the wire.
	Host string `json:"host,omitempty"`
}

// Service is one port of a machine exposed through the proxy.
type Service struct {
	Protocol     string      `json:"protocol"` // tcp or udp
	InternalPort int         `json:"internal_port"`
	Ports        []Port      `json:"ports,omitempty"`
	Concurrency  Concurrency `json:"concurrency,omitzero"`
	// Autostop is what the proxy does to an idle machine: AutostopOff ("",
	// the default, or "off"), AutostopStop or AutostopSuspend.
	Autostop string `json:"autostop,omitempty"`
	// Autostart lets an edge start the machine (stopped or suspended) when
	// a request finds no machine to take it.
	Autostart bool `json:"autostart,omitempty"`
	// MinMachinesRunning is how many machines of the app autostop leaves
	// started in its primary region (at most api.MaxMinMachinesRunning).
	MinMachinesRunning int `json:"min_machines_running,omitempty"`
}

// Autostop values of a Service, the api package's names.
const (
	AutostopOff     = api.AutostopOff
	AutostopStop    = api.AutostopStop
	AutostopSuspend = api.AutostopSuspend
)

// Port is one public port, or a range of them, of a service.
type Port struct {
	Port       int      `json:"port,omitempty"`
	StartPort  int      `json:"start_port,omitempty"`
	EndPort    int      `json:"end_port,omitempty"`
	Handlers   []string `json:"handlers,omitempty"`
	ForceHTTPS bool     `json:"force_https,omitempty"`
	// ProxyProto is the PROXY protocol version a proxy_proto port sends
	// (api.ProxyProtoV1 or V2; "" is v1).
	ProxyProto string `json:"proxy_proto,omitempty"`
}

// Concurrency is how much load a service takes before the proxy prefers
// other machines (soft) or refuses to send more (hard).
type Concurrency struct {
	Type      string `json:"type,omitempty"` // connections or requests
	SoftLimit int    `json:"soft_limit,omitempty"`
	HardLimit int    `json:"hard_limit,omitempty"`
}

// CheckStatus is the last result of one health check of a machine.
type CheckStatus struct {
	Name   string `json:"name"`
	Status string `json:"status"` // passing, warning or critical
	Output string `json:"output,omitempty"`
}

// Passing reports whether every check of the machine passes (a machine
// without checks passes).
func (m *Machine) Passing() bool {
	for _, c := range m.Checks {
		if c.Status != CheckPassing {
			return false
		}
	}
	return true
}

// HostFacts is everything a host publishes about itself: its machines, its
// load and what it has free. Only the host itself publishes them.
type HostFacts struct {
	Machines []Machine `json:"machines"`
	Free     Resources `json:"free"`
	// Load is the host's recent CPU load per CPU (1.0: every CPU busy).
	Load float64 `json:"load"`
}

// HostStatus is what this host believes of another host's liveness.
type HostStatus string

// Host statuses. A host that is dead or has left keeps its facts, so its
// machines can be shown as unreachable, until it returns or is removed.
const (
	StatusAlive   HostStatus = "alive"
	StatusSuspect HostStatus = "suspect"
	StatusDead    HostStatus = "dead"
	StatusLeft    HostStatus = "left"
)

// Host is one host as this host sees it.
type Host struct {
	ID       string            `json:"id"`
	Region   string            `json:"region"`
	Addrs    map[string]string `json:"addrs,omitempty"` // "api", "proxy", "dns", "gossip", …
	Capacity Resources         `json:"capacity"`
	Free     Resources         `json:"free"`
	Load     float64           `json:"load"`
	Status   HostStatus        `json:"status"`
	// Since is when this host last saw Status change.
	Since time.Time `json:"since"`
	// RTT is the smoothed round-trip time from this host; zero when unknown
	// (and for this host itself).
	RTT time.Duration `json:"rtt"`
	// Version is the version of the host's facts held here; zero when none
	// have arrived yet.
	Version  uint64     `json:"version"`
	Machines []*Machine `json:"machines,omitempty"` // sorted by ID
}

// Up reports whether the host is believed reachable (alive or merely
// suspect).
func (h *Host) Up() bool { return h.Status == StatusAlive || h.Status == StatusSuspect }
