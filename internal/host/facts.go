package host

import (
	"context"
	"errors"
	"net/http"
	"net/netip"
	"slices"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/agent"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/dns"
)

// publishOnce publishes this host's facts. Machines the cluster leaves out
// (their records break its rules: a config from before the API checked
// them, or a bug) are each reported once per reason: a warning, and an
// event on the machine, so its owner sees why DNS and the proxy do not
// know it. reported holds what was reported already; load is the requests
// in flight per machine through this host's proxy.
func (h *Host) publishOnce(reported map[string]string, load map[string]int) {
	var draining map[string]bool
	if h.Proxy != nil {
		draining = h.Proxy.Draining()
	}
	err := h.Cluster.Publish(hostFacts(h.Agent.AllMachines(), h.Agent.Used(), h.cfg.Cluster.Capacity, load, draining))
	var rej *cluster.RejectedError
	if err != nil && !errors.As(err, &rej) {
		h.log.Warn("publish host facts", "err", err)
		return
	}
	var now map[string]error
	if rej != nil {
		now = rej.Machines
	}
	for id := range reported {
		if now[id] == nil {
			delete(reported, id)
		}
	}
	for id, why := range now {
		msg := "not published to the cluster (DNS and the proxy do not see this machine): " + why.Error()
		if reported[id] == msg {
			continue
		}
		reported[id] = msg
		h.log.Warn("machine left out of this host's facts", "machine", id, "err", why)
		ev := &api.MachineEvent{Type: api.EventPublish, Status: "rejected", Source: api.SourceFlyd,
			Request: &api.MachineRequest{Message: msg}}
		h.Agent.Report(id, ev)
	}
}

// hostFacts is what this host publishes: its machines as the cluster needs
// them with their load (from load, by machine id; a count past
// cluster.MaxLoad is past every hard limit and says MaxLoad), those autostop
// is stopping (draining) cordoned, and what it has free. Counts for machines of other hosts (this proxy's own requests to
// them) are not this host's to publish and are left out.
func hostFacts(ms []agent.AppMachine, used agent.Capacity, capacity cluster.Resources, load map[string]int, draining map[string]bool) cluster.HostFacts {
	f := cluster.HostFacts{Machines: make([]cluster.Machine, 0, len(ms)), Free: cluster.Resources{
		CPUs: max(capacity.CPUs-used.CPUs, 0), MemoryMB: max(capacity.MemoryMB-used.MemoryMB, 0),
	}}
	for _, am := range ms {
		m := am.Machine
		cm := cluster.Machine{
			ID: m.ID, App: am.App, Org: am.Org, Region: m.Region, State: m.State, InstanceID: m.InstanceID,
			PrivateIP: m.PrivateIP, Cordoned: m.Cordoned || draining[m.ID], Draining: draining[m.ID], ProcessGroup: "app",
			Load: min(max(load[m.ID], 0), cluster.MaxLoad),
		}
		if cfg := m.Config; cfg != nil {
			if g := cfg.Metadata[api.MetadataProcessGroup]; g != "" {
				cm.ProcessGroup = g
			}
			if pr := cfg.Env["PRIMARY_REGION"]; pr != cm.Region && cluster.ValidRegion(pr) {
				cm.PrimaryRegion = pr
			}
			for _, s := range cfg.Services {
				cs := clusterService(s)
				// Fly's default: a service starts its machines on
				// demand unless told not to.
				cs.Autostart = s.Autostart == nil && (cfg.DisableMachineAutostart == nil || !*cfg.DisableMachineAutostart) ||
					s.Autostart != nil && *s.Autostart
				cm.Services = append(cm.Services, cs)
			}
		}
		for _, c := range m.Checks {
			cm.Checks = append(cm.Checks, cluster.CheckStatus{Name: c.Name, Status: c.Status, Output: api.Clip(c.Output, 256)})
		}
		f.Machines = append(f.Machines, cm)
	}
	return f
}

func clusterService(s api.MachineService) cluster.Service {
	out := cluster.Service{Protocol: s.Protocol, InternalPort: s.InternalPort}
	for _, p := range s.Ports {
		cp := cluster.Port{Handlers: slices.Clone(p.Handlers), ForceHTTPS: p.ForceHTTPS}
		if o := p.ProxyProtoOptions; o != nil {
			cp.ProxyProto = o.Version
		}
		if p.Port != nil {
			cp.Port = *p.Port
		}
		if p.StartPort != nil && p.EndPort != nil {
			cp.StartPort, cp.EndPort = *p.StartPort, *p.EndPort
		}
		out.Ports = append(out.Ports, cp)
	}
	if c := s.Concurrency; c != nil {
		out.Concurrency = cluster.Concurrency{Type: c.Type, SoftLimit: c.SoftLimit, HardLimit: c.HardLimit}
	}
	if s.Autostop != nil && *s.Autostop != api.AutostopOff {
		out.Autostop = string(*s.Autostop)
	}
	if s.MinMachinesRunning != nil {
		out.MinMachinesRunning = *s.MinMachinesRunning
	}
	return out
}

// dnsSource answers DNS from the cluster's current snapshot, one snapshot
// per query.
type dnsSource struct{ c *cluster.Cluster }

var _ dns.Source = dnsSource{}

func (d dnsSource) View() dns.View { return dnsView{d.c.Snapshot()} }

// dnsView is one snapshot as DNS sees it.
type dnsView struct{ snap *cluster.Snapshot }

func (d dnsView) Instances(app string) []dns.Instance {
	snap := d.snap
	ms := snap.AppMachines(app)
	out := make([]dns.Instance, 0, len(ms))
	for _, m := range ms {
		ip, err := netip.ParseAddr(m.PrivateIP)
		if err != nil {
			continue
		}
		h := snap.HostOf(m)
		out = append(out, dns.Instance{
			ID: m.ID, App: m.App, Region: m.Region, ProcessGroup: m.ProcessGroup, IP: ip,
			// A machine on a host this one cannot reach is not offered.
			Started: m.State == api.StateStarted && h != nil && h.Up(),
		})
	}
	return out
}

func (d dnsView) Apps() []string {
	seen := map[string]bool{}
	var apps []string
	for _, m := range d.snap.Machines() {
		if !seen[m.App] {
			seen[m.App] = true
			apps = append(apps, m.App)
		}
	}
	slices.Sort(apps)
	return apps
}

// RTT is the round trip to the nearest reachable host of region (0 within
// this host's own region when nothing was measured).
func (d dnsView) RTT(region string) (time.Duration, bool) {
	snap := d.snap
	best, ok := time.Duration(0), false
	for _, h := range snap.HostsInRegion(region) {
		if !h.Up() {
			continue
		}
		if h.ID == snap.Self {
			return 0, true
		}
		if h.RTT > 0 && (!ok || h.RTT < best) {
			best, ok = h.RTT, true
		}
	}
	return best, ok
}

// autostart is the proxy's Start hook: it starts a stopped machine of this
// host for a request. A machine already started, or starting for another
// request, is no error: the proxy waits until it is ready.
func (h *Host) autostart(ctx context.Context, app, id string) error {
	ref := api.MachineRef{App: app, ID: id}
	_, err := h.Agent.StartMachine(ctx, ref)
	if err == nil {
		return nil
	}
	if m, gerr := h.Agent.GetMachine(ctx, ref); gerr == nil && (m.State == api.StateStarted || m.State == api.StateStarting) {
		return nil
	}
	return err
}

// autostop is the proxy's autostop hook: it suspends the machine when asked
// to and the driver can (no driver of this agent can yet: it is stopped
// instead), and stops it otherwise.
func (h *Host) autostop(ctx context.Context, app, id string, suspend bool) error {
	ref := api.MachineRef{App: app, ID: id}
	if suspend {
		err := h.Agent.SuspendMachine(ctx, ref)
		var ae *api.Error
		if err == nil || !errors.As(err, &ae) || ae.Status != http.StatusNotImplemented {
			return err
		}
	}
	return h.Agent.StopMachine(ctx, ref, api.StopMachineInput{})
}
