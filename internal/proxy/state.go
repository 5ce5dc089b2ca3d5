package proxy

import (
	"strings"
	"sync"
	"sync/atomic"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/check"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/proxy/route"
)

// Source is the cluster view the route table is built from: a
// *cluster.Cluster.
type Source interface {
	Snapshot() *cluster.Snapshot
	Subscribe() (<-chan struct{}, func())
}

// state is what a request routes by: one table and the backhaul address of
// every host, from one snapshot, swapped as one.
type state struct {
	table    *route.Table
	backhaul map[string]string // host id → its proxy's backhaul address
	hosts    map[string]route.Host
}

// factsFrom turns a cluster snapshot into the route table's facts, as seen
// from host self in region. The load of another host's machine is what that
// host published; this host's own machines get none from the snapshot, since
// every request to them passes through this proxy, whose live count
// (inflight) is fresher than the sample this host published.
func factsFrom(snap *cluster.Snapshot, self, region string) (route.Facts, map[string]string) {
	f := route.Facts{Self: self, Region: region}
	backhaul := map[string]string{}
	if snap == nil {
		return f, backhaul
	}
	for _, h := range snap.Hosts() {
		st := route.HostDown
		switch h.Status {
		case cluster.StatusAlive:
			st = route.HostAlive
		case cluster.StatusSuspect:
			st = route.HostSuspect
		}
		f.Hosts = append(f.Hosts, route.Host{ID: h.ID, Region: h.Region, Status: st, RTT: h.RTT})
		if a := h.Addrs["proxy"]; a != "" {
			backhaul[h.ID] = a
		}
	}
	for _, m := range snap.Machines() {
		if snap.Machine(m.ID) != m {
			continue // a copy another host is believed over
		}
		rm := route.Machine{
			ID: m.ID, InstanceID: m.InstanceID, App: m.App, Org: m.Org, Region: m.Region, Host: m.Host,
			PrivateIP: m.PrivateIP, Started: m.State == "started", Cordoned: m.Cordoned, Healthy: true,
			Stopped: m.State == "stopped" || m.State == "suspended", Draining: m.Draining,
		}
		for _, c := range m.Checks {
			if strings.HasPrefix(c.Name, check.ServicePrefix) && c.Status != cluster.CheckPassing {
				rm.Healthy = false
			}
		}
		for _, s := range m.Services {
			if s.Protocol != "" && s.Protocol != "tcp" {
				continue
			}
			rs := route.Service{InternalPort: s.InternalPort, SoftLimit: s.Concurrency.SoftLimit, HardLimit: s.Concurrency.HardLimit,
				Autostart: s.Autostart}
			for _, p := range s.Ports {
				h := handlerOf(p.Handlers, p.ProxyProto)
				switch {
				case p.Port > 0:
					rs.Ports = append(rs.Ports, route.PortRange{Start: p.Port, End: p.Port, ForceHTTPS: p.ForceHTTPS, Handler: h})
				case p.StartPort > 0 && p.EndPort >= p.StartPort:
					rs.Ports = append(rs.Ports, route.PortRange{Start: p.StartPort, End: p.EndPort, ForceHTTPS: p.ForceHTTPS, Handler: h})
				}
			}
			rm.Services = append(rm.Services, rs)
		}
		f.Machines = append(f.Machines, rm)
		if m.Load > 0 && m.Host != self {
			if f.Load == nil {
				f.Load = map[string]int{}
			}
			f.Load[m.ID] = m.Load
		}
	}
	return f, backhaul
}

// handlerOf is how the edge serves a port with these handlers (and PROXY
// protocol version).
func handlerOf(handlers []string, version string) route.Handler {
	switch raw, pp := api.RawTCP(handlers); {
	case pp && version == api.ProxyProtoV2:
		return route.HandlerProxyProtoV2
	case pp:
		return route.HandlerProxyProto
	case raw:
		return route.HandlerTCP
	}
	return route.HandlerHTTP
}

// inflight counts the requests this proxy has in flight per machine: the
// live load the route table's selection reads; and, for autostop, how many
// it ever sent. Counters are never removed (one per machine this host has
// routed to).
type inflight struct {
	mu sync.RWMutex
	n  map[string]*counter
}

type counter struct {
	now   atomic.Int64 // in flight
	total atomic.Int64 // ever begun
}

var _ route.Load = (*inflight)(nil)

func (l *inflight) InFlight(id string) int {
	l.mu.RLock()
	c := l.n[id]
	l.mu.RUnlock()
	if c == nil {
		return 0
	}
	return int(c.now.Load())
}

// total is how many requests and connections to the machine ever began.
func (l *inflight) total(id string) int64 {
	l.mu.RLock()
	c := l.n[id]
	l.mu.RUnlock()
	if c == nil {
		return 0
	}
	return c.total.Load()
}

func (l *inflight) add(id string, d int64) {
	l.mu.RLock()
	c := l.n[id]
	l.mu.RUnlock()
	if c == nil {
		l.mu.Lock()
		if l.n == nil {
			l.n = map[string]*counter{}
		}
		if c = l.n[id]; c == nil {
			c = new(counter)
			l.n[id] = c
		}
		l.mu.Unlock()
	}
	c.now.Add(d)
	if d > 0 {
		c.total.Add(d)
	}
}

// snapshot returns the machines with requests in flight.
func (l *inflight) snapshot() map[string]int {
	l.mu.RLock()
	defer l.mu.RUnlock()
	out := map[string]int{}
	for id, c := range l.n {
		if v := c.now.Load(); v > 0 {
			out[id] = int(v)
		}
	}
	return out
}
