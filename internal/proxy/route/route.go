// Package route decides where the edge proxy sends a request, without doing
// any I/O: an immutable Table built from the cluster's facts (machines with
// their services and health, hosts with their liveness, region and RTT, and
// each machine's published concurrency), and a selection that orders the
// machines of an app's service for one request — the first choice, then the
// retries — allocating nothing.
//
// The order is Fly's: machines in the edge's region first, least loaded,
// then closest by RTT; a machine at its soft limit only when every other is
// too; a machine at its hard limit never. Traffic leaves the region only when
// every local machine is unhealthy or at its hard limit, and then goes to the
// nearest region that can take it. Cordoned machines, machines failing a
// services[].checks check and machines on hosts that are down get nothing.
// The fly-prefer-region, fly-force-region, fly-prefer-instance-id and
// fly-force-instance-id headers change the order as Fly documents.
//
// The package is pure: the proxy builds a Table from each cluster snapshot
// and swaps it in atomically, and supplies the live load and the randomness
// that breaks ties with every query. The live load may also demote machines
// whose circuit breaker is open (Demoter) and shed an app's regions that
// fail (Shedder): their machines come after every other. The region
// breaker's sliding window and decisions live here too (RegionBreaker),
// with time as an argument. The table also knows each app's organization,
// for replays between the apps of one.
package route

import (
	"cmp"
	"slices"
	"time"
)

// Fly's defaults for a service's concurrency limits.
const (
	DefaultSoftLimit = 20
	DefaultHardLimit = 25
)

// MaxCandidates is the most candidates one selection returns: the first
// choice and the retries after it.
const MaxCandidates = 8

// HostStatus is what the edge believes of a host's liveness.
type HostStatus uint8

// Host statuses. A suspect host may still answer: its machines are tried,
// but after every machine on a host believed alive.
const (
	HostDown HostStatus = iota
	HostAlive
	HostSuspect
)

// Host is one host as the edge sees it.
type Host struct {
	ID     string
	Region string
	Status HostStatus
	// RTT is the measured round trip from the edge's host, zero when
	// unknown (and for the edge's host itself).
	RTT time.Duration
}

// Machine is one machine of an app as the route table needs it.
type Machine struct {
	ID         string
	InstanceID string
	App        string
	// Org is the organization of the machine's app ("" when unknown).
	Org    string
	Region string
	Host   string
	// PrivateIP is the address the machine's host reaches it at.
	PrivateIP string
	Started   bool
	// Stopped is true for a stopped or suspended machine: one a start
	// brings back (see Table.Startable).
	Stopped  bool
	Cordoned bool
	// Draining: cordoned by autostop, which is about to stop it. It takes
	// no traffic, but an edge may ask its host to keep it (startable).
	Draining bool
	// Healthy is false while any of its services[].checks checks is not
	// passing (top-level checks only report and do not count).
	Healthy  bool
	Services []Service
}

// Service is one service of a machine: where it listens inside the machine,
// the public ports it answers on, and its concurrency limits (zero: Fly's
// defaults; a hard limit below the soft one is raised to it).
type Service struct {
	InternalPort int
	Ports        []PortRange
	SoftLimit    int
	HardLimit    int
	// Autostart lets an edge start the machine when it is stopped and no
	// started machine can take a request.
	Autostart bool
}

// PortRange is a public port (Start == End) or a range of them, how the
// edge serves it, and whether plain HTTP requests on it are redirected to
// HTTPS.
type PortRange struct {
	Start, End int
	ForceHTTPS bool
	Handler    Handler
}

// Handler is how the edge serves a public port.
type Handler uint8

// Handlers. The zero value is HTTP.
const (
	HandlerHTTP Handler = iota
	// HandlerTCP passes a connection's bytes through untouched.
	HandlerTCP
	// HandlerProxyProto passes them through after a PROXY protocol header
	// (version 1, text) naming the client's address and the edge's.
	HandlerProxyProto
	// HandlerProxyProtoV2 is HandlerProxyProto with a version 2 (binary)
	// header.
	HandlerProxyProtoV2
)

// Raw reports whether connections on the port are passed through as
// bytes (not served as HTTP).
func (h Handler) Raw() bool {
	return h == HandlerTCP || h == HandlerProxyProto || h == HandlerProxyProtoV2
}

// Facts are what a Table is built from.
type Facts struct {
	// Self is the edge's host and Region its region.
	Self   string
	Region string
	Hosts  []Host
	// Machines of every app; a machine id listed twice keeps the first.
	Machines []Machine
	// Load is the concurrency each machine's host last published, by
	// machine id; missing means zero.
	Load map[string]int
}

// Exclusion is why a machine of an app gets no traffic from this table.
type Exclusion uint8

// Exclusions, in the order they are checked.
const (
	Included      Exclusion = iota
	NotStarted              // the machine is not started
	Cordoned                // taken out of rotation by its owner
	FailingChecks           // a services[].checks check is not passing
	HostNotAlive            // its host is down, or unknown to the edge
	NoAddress               // its host published no private address
)

var exclusionText = [...]string{
	Included:      "routable",
	NotStarted:    "not started",
	Cordoned:      "cordoned",
	FailingChecks: "failing checks",
	HostNotAlive:  "host not alive",
	NoAddress:     "no private address",
}

func (e Exclusion) String() string {
	if int(e) < len(exclusionText) {
		return exclusionText[e]
	}
	return "unknown"
}

// Target is one machine's service as a destination: everything the proxy
// needs to deliver a request to it. Targets belong to their Table and must
// not be modified.
type Target struct {
	MachineID  string
	InstanceID string
	App        string
	Region     string
	Host       string
	// Addr is the machine's private address and Port the service's
	// internal port in it.
	Addr string
	Port int
	// OnSelf is true when the machine runs on the edge's own host.
	OnSelf bool
	// ForceHTTPS: the port answers plain HTTP with a redirect to HTTPS.
	ForceHTTPS bool
	// Handler is how the edge serves the public port.
	Handler   Handler
	SoftLimit int
	HardLimit int
	// Excluded says why the target gets no traffic (Included when it does).
	Excluded Exclusion
	// Published is the concurrency the machine's host last published.
	Published int
	// RTT is the measured round trip to the machine's host (zero when
	// unknown, and for the edge's own host).
	RTT time.Duration

	lo, hi     int // public ports
	suspect    bool
	regionRank int // 0 for the edge's region, then nearer regions first
	slot       uint64

	// startable: stopped with autostart and not cordoned, or draining; on
	// a host not down.
	startable bool
}

// app is the routing state of one app.
type app struct {
	targets  []Target
	byPort   map[int][]int32 // single public ports → target indices
	ranges   []int32         // targets whose public ports are a range
	machines int             // machines of the app, any state
	org      string          // "" when unknown, or when its machines disagree
	orgSet   bool
}

// Table is the route table of one edge at one moment. It is immutable.
type Table struct {
	self, region string
	apps         map[string]*app
	regionRank   map[string]int
	// tcpPorts are the public ports served as raw TCP, with the apps that
	// declare each (sorted; more than one is a conflict).
	tcpPorts map[int][]string
}

// Build makes the table for Facts. It copies what it keeps.
func Build(f Facts) *Table {
	t := &Table{self: f.Self, region: f.Region, apps: map[string]*app{}, regionRank: map[string]int{}, tcpPorts: map[int][]string{}}
	hosts := make(map[string]*Host, len(f.Hosts))
	for i := range f.Hosts {
		hosts[f.Hosts[i].ID] = &f.Hosts[i]
	}
	t.rankRegions(f.Hosts)
	seen := make(map[string]bool, len(f.Machines))
	for i := range f.Machines {
		m := &f.Machines[i]
		if m.App == "" || seen[m.ID] {
			continue
		}
		seen[m.ID] = true
		a := t.apps[m.App]
		if a == nil {
			a = &app{byPort: map[int][]int32{}}
			t.apps[m.App] = a
		}
		a.machines++
		a.addOrg(m.Org)
		h := hosts[m.Host]
		excl := exclusion(m, h)
		for _, s := range m.Services {
			soft := s.SoftLimit
			if soft <= 0 {
				soft = DefaultSoftLimit
			}
			hard := s.HardLimit
			if hard <= 0 {
				hard = max(DefaultHardLimit, soft)
			}
			hard = max(hard, soft)
			for _, p := range s.Ports {
				if p.Start <= 0 || p.End < p.Start {
					continue
				}
				tg := Target{
					MachineID: m.ID, InstanceID: m.InstanceID, App: m.App, Region: m.Region, Host: m.Host,
					Addr: m.PrivateIP, Port: s.InternalPort, OnSelf: m.Host == f.Self,
					SoftLimit: soft, HardLimit: hard, Excluded: excl, Published: max(f.Load[m.ID], 0),
					ForceHTTPS: p.ForceHTTPS, Handler: p.Handler, lo: p.Start, hi: p.End,
				}
				if p.Handler.Raw() {
					t.claimTCP(m.App, p.Start, p.End)
				}
				if h != nil {
					tg.suspect = h.Status == HostSuspect
					tg.RTT = h.RTT
				}
				tg.startable = (m.Stopped && s.Autostart && !m.Cordoned || m.Started && m.Draining) && h != nil && h.Status != HostDown
				tg.regionRank = t.rank(m.Region)
				tg.slot = mix(uint64(len(a.targets)) + 1)
				idx := int32(len(a.targets))
				a.targets = append(a.targets, tg)
				if p.Start == p.End {
					// One machine answers a port once: a second
					// service claiming it is ignored.
					l := a.byPort[p.Start]
					if len(l) > 0 && a.targets[l[len(l)-1]].MachineID == m.ID {
						continue
					}
					a.byPort[p.Start] = append(l, idx)
				} else {
					a.ranges = append(a.ranges, idx)
				}
			}
		}
	}
	return t
}

// addOrg notes the org one of the app's machines names: an app whose
// machines name different orgs (or none) belongs to no org here.
func (a *app) addOrg(org string) {
	if !a.orgSet {
		a.org, a.orgSet = org, true
	} else if a.org != org {
		a.org = ""
	}
}

// SameOrg reports whether two apps are both known and of one organization:
// a machine of one may send a request to the other (fly-replay's app=). An
// app whose org is not known belongs to none.
func (t *Table) SameOrg(app1, app2 string) bool {
	a, b := t.apps[app1], t.apps[app2]
	return a != nil && b != nil && a.org != "" && a.org == b.org
}

// claimTCP records that app serves the public ports lo..hi as raw TCP.
func (t *Table) claimTCP(appName string, lo, hi int) {
	for port := lo; port <= hi && port <= 65535; port++ {
		l := t.tcpPorts[port]
		if i, found := slices.BinarySearch(l, appName); !found {
			t.tcpPorts[port] = slices.Insert(l, i, appName)
		}
	}
}

// TCPPorts returns the public ports some machine serves as raw TCP, each
// with the apps that declare it, sorted. A port is one app's: the control
// plane refuses a second app's claim, so two apps on one port mean facts
// that disagree, and an edge serves neither. The map belongs to the table
// and must not be modified.
func (t *Table) TCPPorts() map[int][]string { return t.tcpPorts }

func exclusion(m *Machine, h *Host) Exclusion {
	switch {
	case !m.Started:
		return NotStarted
	case m.Cordoned:
		return Cordoned
	case !m.Healthy:
		return FailingChecks
	case h == nil || h.Status == HostDown:
		return HostNotAlive
	case m.PrivateIP == "":
		return NoAddress
	}
	return Included
}

// rankRegions orders regions by the smallest RTT to one of their live
// hosts: the edge's region first, regions whose RTT is unknown last, ties
// by name.
func (t *Table) rankRegions(hosts []Host) {
	type reg struct {
		name  string
		rtt   time.Duration
		known bool
	}
	best := map[string]*reg{}
	for _, h := range hosts {
		r := best[h.Region]
		if r == nil {
			r = &reg{name: h.Region}
			best[h.Region] = r
		}
		if h.Status == HostDown || h.RTT <= 0 {
			continue
		}
		if !r.known || h.RTT < r.rtt {
			r.rtt, r.known = h.RTT, true
		}
	}
	var list []*reg
	for name, r := range best {
		if name != t.region {
			list = append(list, r)
		}
	}
	slices.SortFunc(list, func(a, b *reg) int {
		if a.known != b.known {
			if a.known {
				return -1
			}
			return 1
		}
		return cmp.Or(cmp.Compare(a.rtt, b.rtt), cmp.Compare(a.name, b.name))
	})
	t.regionRank[t.region] = 0
	for i, r := range list {
		t.regionRank[r.name] = i + 1
	}
}

// rank is a region's place in the edge's order; a region with no known
// host comes after every known one.
func (t *Table) rank(region string) int {
	if r, ok := t.regionRank[region]; ok {
		return r
	}
	return len(t.regionRank) + 1
}

// Region is the edge's region.
func (t *Table) Region() string { return t.region }

// Self is the edge's host.
func (t *Table) Self() string { return t.self }

// HasApp reports whether any machine of the app, in any state, is known.
func (t *Table) HasApp(name string) bool { return t.apps[name] != nil }

// Targets returns every target of an app's service on a public port, routable
// or not, in table order. It is for explanations and tests, not the hot path.
func (t *Table) Targets(appName string, port int) []*Target {
	a := t.apps[appName]
	if a == nil {
		return nil
	}
	var out []*Target
	for _, i := range a.byPort[port] {
		out = append(out, &a.targets[i])
	}
	if len(out) > 0 {
		return out
	}
	for _, i := range a.ranges {
		if tg := &a.targets[i]; tg.lo <= port && port <= tg.hi {
			out = append(out, tg)
		}
	}
	return out
}

// OnSelf returns the target of machine id for an app's public port if the
// machine runs on the edge's own host, whatever its state: the proxy of the
// machine's host delivers what another edge chose, after checking it here.
func (t *Table) OnSelf(appName string, port int, machineID string) *Target {
	a := t.apps[appName]
	if a == nil {
		return nil
	}
	for _, i := range a.byPort[port] {
		if tg := &a.targets[i]; tg.MachineID == machineID && tg.OnSelf {
			return tg
		}
	}
	for _, i := range a.ranges {
		if tg := &a.targets[i]; tg.MachineID == machineID && tg.OnSelf && tg.lo <= port && port <= tg.hi {
			return tg
		}
	}
	return nil
}

// mix is splitmix64's finalizer: a cheap, well-spread hash of a slot number
// and the query's randomness, to break ties.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}
