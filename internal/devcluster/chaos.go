package devcluster

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/proxy/route"
)

// Faults of the network, beside the crashes of faults.go. They act on the
// simulated network the cluster's parts talk over — gossip, the control
// plane's calls to the hosts, the edges' backhaul, the global entry's hops
// to the edges — so every protocol meets them as it would meet a real
// network's: a partition cuts the links between two sides (each sees the
// other fall silent; streams hold their data, as TCP retransmits, until it
// heals), loss drops datagrams (gossip's probes) and a slow link adds to
// the latency of a link both ways. A stalled host's programs keep running
// but nothing it sends or is sent arrives until the stall ends, as a VM
// paused by its hypervisor. What clients reach on real loopback (the
// hosts' APIs, the edges) is not on the simulated network: a partition or
// a stall reaches it only where it calls across the cluster.
//
// Sides are named by host ids, the control plane's member ("control") and
// region codes (every host of the region; the control plane is named on
// its own).

// Errors of the fault API.
var (
	// ErrUnknownTarget is returned for a name that is no host, control
	// plane or region of the cluster.
	ErrUnknownTarget = errors.New("devcluster: no such host or region")
	// ErrBadFault is returned for a fault that cannot be: sides that
	// overlap, a loss or a delay out of range.
	ErrBadFault = errors.New("devcluster: bad fault")
)

// Limits of the faults one may ask for.
const (
	MaxSlowLink = 10 * time.Second
	MaxStall    = 10 * time.Minute
)

// LinkFault is one fault between two sides, as it was asked for.
type LinkFault struct {
	// Kind is "partition", "loss" or "slow-link".
	Kind string   `json:"kind"`
	A    []string `json:"a"`
	B    []string `json:"b"`
	// Percent is the share of datagrams lost (loss).
	Percent float64 `json:"percent,omitempty"`
	// DelayMS is the latency added one way, in milliseconds (slow-link).
	DelayMS int64 `json:"delay_ms,omitempty"`
}

// Stall is a stalled host and when it resumes.
type Stall struct {
	Host  string    `json:"host"`
	Until time.Time `json:"until"`
}

// FaultStatus is every fault active in the cluster.
type FaultStatus struct {
	Killed  []string    `json:"killed"`
	Stalled []Stall     `json:"stalled"`
	Links   []LinkFault `json:"links"`
	// ControlPlane is the control plane's state: "up" or "killed" (""
	// for a cluster without one).
	ControlPlane string `json:"control_plane,omitempty"`
}

// members expands names (hosts, "control", regions) to the cluster's
// members on the simulated network, sorted and without repeats.
func (c *Cluster) members(names []string) ([]string, error) {
	if len(names) == 0 {
		return nil, fmt.Errorf("%w: an empty side", ErrBadFault)
	}
	var out []string
	for _, n := range names {
		switch {
		case c.host(n) != nil:
			out = append(out, n)
		case n == controlID && c.cfg.ControlPlane:
			out = append(out, n)
		case slices.Contains(c.cfg.Regions, n):
			for _, h := range c.Hosts {
				if h.Region == n {
					out = append(out, h.ID)
				}
			}
		default:
			return nil, fmt.Errorf("%w: %q", ErrUnknownTarget, n)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// sides expands two sides and refuses a member on both.
func (c *Cluster) sides(a, b []string) ([]string, []string, error) {
	ma, err := c.members(a)
	if err != nil {
		return nil, nil, err
	}
	mb, err := c.members(b)
	if err != nil {
		return nil, nil, err
	}
	for _, m := range ma {
		if slices.Contains(mb, m) {
			return nil, nil, fmt.Errorf("%w: %s is on both sides", ErrBadFault, m)
		}
	}
	return ma, mb, nil
}

// setLinks changes the fault of every link between the two sides and
// records the fault as asked (replacing one of the same kind between the
// same sides; a zero one only clears).
func (c *Cluster) setLinks(f LinkFault, change func(*netsim.LinkFault)) error {
	ma, mb, err := c.sides(f.A, f.B)
	if err != nil {
		return err
	}
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	for _, x := range ma {
		for _, y := range mb {
			lf := c.Net.Link(x, y)
			change(&lf)
			if err := c.Net.SetLink(x, y, lf); err != nil {
				return fmt.Errorf("devcluster: link %s-%s: %w", x, y, err)
			}
		}
	}
	f.A, f.B = slices.Clone(f.A), slices.Clone(f.B)
	c.faults.links = slices.DeleteFunc(c.faults.links, func(o LinkFault) bool {
		return o.Kind == f.Kind && sameSides(o, f)
	})
	if f.Kind == "partition" || f.Percent > 0 || f.DelayMS > 0 {
		c.faults.links = append(c.faults.links, f)
	}
	return nil
}

func sameSides(x, y LinkFault) bool {
	eq := func(p, q []string) bool {
		return strings.Join(sorted(p), ",") == strings.Join(sorted(q), ",")
	}
	return eq(x.A, y.A) && eq(x.B, y.B) || eq(x.A, y.B) && eq(x.B, y.A)
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	slices.Sort(s)
	return s
}

// Partition cuts every link between a member of side a and one of side b.
// Partitions add up; Heal ends them all.
func (c *Cluster) Partition(a, b []string) error {
	return c.setLinks(LinkFault{Kind: "partition", A: a, B: b}, func(lf *netsim.LinkFault) { lf.Cut = true })
}

// Loss makes the links between the two sides lose percent (0 to 100) of
// their datagrams, both ways; 0 ends it. Streams are not lossy.
func (c *Cluster) Loss(a, b []string, percent float64) error {
	if !(percent >= 0 && percent <= 100) { // NaN too
		return fmt.Errorf("%w: loss of %v%%: want 0 to 100", ErrBadFault, percent)
	}
	return c.setLinks(LinkFault{Kind: "loss", A: a, B: b, Percent: percent}, func(lf *netsim.LinkFault) { lf.Loss = percent / 100 })
}

// SlowLink adds extra to the one-way latency of the links between the two
// sides, both ways; 0 ends it.
func (c *Cluster) SlowLink(a, b []string, extra time.Duration) error {
	if extra < 0 || extra > MaxSlowLink {
		return fmt.Errorf("%w: extra latency %v: want 0 to %v", ErrBadFault, extra, MaxSlowLink)
	}
	return c.setLinks(LinkFault{Kind: "slow-link", A: a, B: b, DelayMS: extra.Milliseconds()}, func(lf *netsim.LinkFault) { lf.Delay = extra })
}

// Heal ends every partition, loss and slow link. Killed and stalled hosts
// stay as they are.
func (c *Cluster) Heal() {
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	c.Net.ClearLinks()
	c.faults.links = nil
}

// stall is one stalled host's resumption.
type stall struct {
	until time.Time
	timer *time.Timer
}

// StallHost silences a live host's network for d: its goroutines keep
// running, but nothing it sends arrives and nothing sent to it arrives
// (datagrams are lost, stream data waits) until the stall ends. Stalling
// a stalled host again sets when it resumes.
func (c *Cluster) StallHost(hostID string, d time.Duration) error {
	if d <= 0 || d > MaxStall {
		return fmt.Errorf("%w: stall of %v: want more than 0 and at most %v", ErrBadFault, d, MaxStall)
	}
	if c.host(hostID) == nil {
		return fmt.Errorf("%w: %q", ErrUnknownTarget, hostID)
	}
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	if c.faults.killed[hostID] {
		return fmt.Errorf("%w: %s", ErrHostKilled, hostID)
	}
	if c.faults.closed {
		return errors.New("devcluster: closed")
	}
	if old := c.faults.stalls[hostID]; old != nil {
		old.timer.Stop()
	}
	if c.faults.stalls == nil {
		c.faults.stalls = map[string]*stall{}
	}
	s := &stall{until: time.Now().Add(d)}
	s.timer = time.AfterFunc(d, func() { c.resume(hostID, s) })
	c.faults.stalls[hostID] = s
	c.Net.Kill(hostID)
	return nil
}

// resume ends a stall, unless another replaced it or the host was killed
// meanwhile.
func (c *Cluster) resume(hostID string, s *stall) {
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	if c.faults.stalls[hostID] != s {
		return
	}
	delete(c.faults.stalls, hostID)
	if !c.faults.killed[hostID] && !c.faults.closed {
		c.Net.Revive(hostID)
	}
}

// stopStalls ends the stalls' timers for Close.
func (c *Cluster) stopStalls() {
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	c.faults.closed = true
	for id, s := range c.faults.stalls {
		s.timer.Stop()
		delete(c.faults.stalls, id)
	}
}

// Status returns the faults active now.
func (c *Cluster) Status() FaultStatus {
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	st := FaultStatus{Killed: []string{}, Stalled: []Stall{}, Links: slices.Clone(c.faults.links)}
	if st.Links == nil {
		st.Links = []LinkFault{}
	}
	for _, h := range c.Hosts {
		if c.faults.killed[h.ID] {
			st.Killed = append(st.Killed, h.ID)
		} else if s := c.faults.stalls[h.ID]; s != nil {
			st.Stalled = append(st.Stalled, Stall{Host: h.ID, Until: s.until})
		}
	}
	if c.cfg.ControlPlane {
		st.ControlPlane = "up"
		if c.PlaneDown() {
			st.ControlPlane = "killed"
		}
	}
	return st
}

// ErrNotKilled is returned for reviving a host that is not killed.
var ErrNotKilled = errors.New("devcluster: host not killed")

// Revive starts killed hosts again — a host by id, or every killed host of
// a region — as a restarted agent starts: from its data dir, at the
// addresses it had, rejoining the cluster. Machines it had are found in its
// data dir, with their processes gone. It returns the ids it revived.
// Revive replaces the revived hosts' *Host in Hosts: nothing may use them
// meanwhile.
func (c *Cluster) Revive(ctx context.Context, name string) ([]string, error) {
	var ids []string
	switch {
	case c.host(name) != nil:
		if !c.Killed(name) {
			return nil, fmt.Errorf("%w: %s", ErrNotKilled, name)
		}
		ids = []string{name}
	case slices.Contains(c.cfg.Regions, name):
		for _, h := range c.Hosts {
			if h.Region == name && c.Killed(h.ID) {
				ids = append(ids, h.ID)
			}
		}
		if len(ids) == 0 {
			return nil, fmt.Errorf("%w: no host of region %s is", ErrNotKilled, name)
		}
	default:
		return nil, fmt.Errorf("%w: %q", ErrUnknownTarget, name)
	}
	for i, id := range ids {
		if err := c.revive(ctx, id); err != nil {
			return ids[:i], err
		}
	}
	return ids, nil
}

// revive starts one killed host again, once its close is over.
func (c *Cluster) revive(ctx context.Context, id string) error {
	c.faults.mu.Lock()
	gone := c.faults.gone[id]
	c.faults.mu.Unlock()
	if gone != nil {
		select {
		case <-gone:
		case <-ctx.Done():
			return fmt.Errorf("devcluster: revive %s: its close is not over: %w", id, ctx.Err())
		}
	}
	i := slices.IndexFunc(c.Hosts, func(h *Host) bool { return h.ID == id })
	old := c.Hosts[i]
	// It joins through any live member.
	var seed string
	for _, h := range c.Hosts {
		if !c.Killed(h.ID) {
			seed = h.Cluster.GossipAddr()
			break
		}
	}
	if seed == "" && c.Plane != nil && !c.PlaneDown() {
		seed = c.Plane.Cluster.GossipAddr()
	}
	c.Net.Revive(id)
	// The host lives as long as the cluster, not as the call that revived
	// it (a chaos API request): its loops do not take ctx's end.
	h, err := c.startHost(context.WithoutCancel(ctx), id, old.Region, i, old.Addr(), old.DNSAddr, old.EdgeAddr, seed)
	if err != nil {
		c.Net.Kill(id)
		return fmt.Errorf("devcluster: revive %s: %w", id, err)
	}
	c.Hosts[i] = h
	c.faults.mu.Lock()
	delete(c.faults.killed, id)
	delete(c.faults.gone, id)
	c.faults.mu.Unlock()
	if h.EdgeAddr != "" && c.global != nil {
		c.awaitRoutes(ctx, h)
		c.global.edgeUp(h.Region)
	}
	return nil
}

// edgeReadyWait bounds how long a revived edge waits to be announced.
const edgeReadyWait = 10 * time.Second

// awaitRoutes waits, up to edgeReadyWait, until a revived host's edge
// can route: its view holds the facts of every other host not killed, and
// its route table every machine of that view with a public port. Anycast
// announces a point of presence once its proxy is ready, not when its
// process starts: before, the edge knows only its own machines, just
// restarting, and would answer its clients "no candidate".
func (c *Cluster) awaitRoutes(ctx context.Context, h *Host) {
	deadline := time.Now().Add(edgeReadyWait)
	for {
		if c.routesReady(h) {
			return
		}
		if time.Now().After(deadline) {
			c.cfg.Logger.Warn("announcing a revived edge that cannot route everything yet", "host", h.ID, "waited", edgeReadyWait)
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (c *Cluster) routesReady(h *Host) bool {
	snap := h.Cluster.Snapshot()
	for _, o := range c.Hosts {
		if o.ID == h.ID || c.Killed(o.ID) {
			continue
		}
		if f := snap.Host(o.ID); f == nil || f.Version == 0 {
			return false
		}
	}
	table := h.Proxy.Table()
	for _, m := range snap.Machines() {
		if snap.Machine(m.ID) != m {
			continue // a copy another host is believed over
		}
		for _, s := range m.Services {
			for _, p := range s.Ports {
				if p.Port > 0 && !slices.ContainsFunc(table.Targets(m.App, p.Port), func(tg *route.Target) bool { return tg.MachineID == m.ID }) {
					return false
				}
			}
		}
	}
	return true
}

// reviveToDestroy revives every killed host, so that a Shutdown that
// destroys everything destroys their machines too and removes what their
// drivers keep.
func (c *Cluster) reviveToDestroy(ctx context.Context) error {
	var errs []error
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			errs = append(errs, c.revive(ctx, h.ID))
		}
	}
	return errors.Join(errs...)
}
