package devcluster

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
)

// Chaos runs, Jepsen-style: a seeded random schedule of faults (this
// file), applied step by step to a running dev cluster while a client
// records every request through the global entry and the edges and every
// call to the Machines API, with invariants checked after each step and at
// the end (chaoscheck.go, chaosrecord.go).
//
// The schedule is a pure function of its seed and the cluster's shape:
// the same seed gives the same steps, so a failure's seed replays it (the
// interleavings of the cluster's goroutines are not replayed: a schedule
// that broke an invariant once may need a few runs to break it again).
//
// Its rules keep the app serving, so that a failed request is a finding
// and not a fault's plain consequence:
//
//   - the cluster has at least three regions, and the app declares
//     machines in every one of them;
//   - a step starts from a healed, converged cluster, applies its faults
//     together, holds them, undoes them (revive, heal, restart) and waits
//     for the cluster to converge before the next begins;
//   - a step's data-plane faults touch one region only: one machine of
//     it, one host, the whole region, a stalled host, or the region cut
//     off from (or lossy, or slow towards) the rest — so at least two
//     regions stay whole throughout;
//   - a partition never leaves an edge alone with no machine: a single
//     host cut off from everyone is never a region's edge (the first host
//     of each region); a region cut off keeps its own edge and machines;
//   - the control plane may be killed on its own, cut off from every host,
//     or killed together with one crash (a machine, a host, a region, a
//     stall): traffic must not notice, and the reconciler catches up once
//     it returns.

// ChaosTopology is the shape of the cluster a schedule is made for.
type ChaosTopology struct {
	Regions        []string
	HostsPerRegion int
	ControlPlane   bool
}

// The kinds of fault a schedule holds.
const (
	FaultKillMachine  = "kill-machine"
	FaultKillHost     = "kill-host"
	FaultKillRegion   = "kill-region"
	FaultStallHost    = "stall-host"
	FaultPartition    = "partition"
	FaultLoss         = "loss"
	FaultSlowLink     = "slow-link"
	FaultKillPlane    = "kill-control-plane"
	chaosMaxSteps     = 1000
	chaosMinHold      = 200 * time.Millisecond
	chaosMaxHold      = time.Minute
	chaosHoldGranular = 100 * time.Millisecond
)

// ChaosFault is one fault of a step.
type ChaosFault struct {
	Kind string `json:"kind"`
	// Target is the host (kill-host, stall-host) or region (kill-region,
	// kill-machine) the fault hits.
	Target string `json:"target,omitempty"`
	// Index picks the machine of a kill-machine among the app's started
	// machines of the region, in the order of their ids (modulo their
	// number).
	Index int `json:"index,omitempty"`
	// A and B are the sides of a partition, loss or slow link.
	A       []string      `json:"a,omitempty"`
	B       []string      `json:"b,omitempty"`
	Percent float64       `json:"percent,omitempty"`
	Delay   time.Duration `json:"delay,omitempty"`
}

func (f ChaosFault) String() string {
	switch f.Kind {
	case FaultKillMachine:
		return fmt.Sprintf("%s %s#%d", f.Kind, f.Target, f.Index)
	case FaultPartition:
		return fmt.Sprintf("%s %s | %s", f.Kind, strings.Join(f.A, ","), strings.Join(f.B, ","))
	case FaultLoss:
		return fmt.Sprintf("%s %s | %s %g%%", f.Kind, strings.Join(f.A, ","), strings.Join(f.B, ","), f.Percent)
	case FaultSlowLink:
		return fmt.Sprintf("%s %s | %s +%v", f.Kind, strings.Join(f.A, ","), strings.Join(f.B, ","), f.Delay)
	case FaultKillPlane:
		return f.Kind
	}
	return f.Kind + " " + f.Target
}

// ChaosStep is faults applied together and held for Hold.
type ChaosStep struct {
	Faults []ChaosFault  `json:"faults"`
	Hold   time.Duration `json:"hold"`
}

func (s ChaosStep) String() string {
	fs := make([]string, len(s.Faults))
	for i, f := range s.Faults {
		fs[i] = f.String()
	}
	return fmt.Sprintf("%s for %v", strings.Join(fs, " + "), s.Hold)
}

// ChaosSchedule is a seed's steps.
type ChaosSchedule struct {
	Seed     int64         `json:"seed"`
	Topology ChaosTopology `json:"topology"`
	Steps    []ChaosStep   `json:"steps"`
}

func (s ChaosSchedule) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "seed %d, %d steps over %s × %d hosts", s.Seed, len(s.Steps),
		strings.Join(s.Topology.Regions, ","), s.Topology.HostsPerRegion)
	if s.Topology.ControlPlane {
		b.WriteString(" and a control plane")
	}
	b.WriteString(":\n")
	for i, st := range s.Steps {
		fmt.Fprintf(&b, "  %2d. %s\n", i+1, st)
	}
	return b.String()
}

// ErrChaosShape is returned for a schedule asked of a cluster its rules
// cannot keep serving.
var ErrChaosShape = errors.New("devcluster: chaos schedule")

// GenerateChaos makes the schedule of a seed: steps steps, each held
// between a quarter of maxHold and maxHold (in tenths of a second). It is
// pure: the same arguments give the same schedule.
func GenerateChaos(seed int64, topo ChaosTopology, steps int, maxHold time.Duration) (ChaosSchedule, error) {
	switch {
	case len(topo.Regions) < 3:
		return ChaosSchedule{}, fmt.Errorf("%w: %d regions: want at least 3, so that two stay whole", ErrChaosShape, len(topo.Regions))
	case topo.HostsPerRegion < 1 || topo.HostsPerRegion > 50:
		return ChaosSchedule{}, fmt.Errorf("%w: %d hosts per region: want 1 to 50", ErrChaosShape, topo.HostsPerRegion)
	case steps < 1 || steps > chaosMaxSteps:
		return ChaosSchedule{}, fmt.Errorf("%w: %d steps: want 1 to %d", ErrChaosShape, steps, chaosMaxSteps)
	case maxHold < chaosMinHold || maxHold > chaosMaxHold:
		return ChaosSchedule{}, fmt.Errorf("%w: hold %v: want %v to %v", ErrChaosShape, maxHold, chaosMinHold, chaosMaxHold)
	}
	topo.Regions = slices.Clone(topo.Regions)
	r := rand.New(rand.NewPCG(uint64(seed), 0x666c616d65))
	s := ChaosSchedule{Seed: seed, Topology: topo}
	type kind struct {
		name   string
		weight int
	}
	kinds := []kind{
		{FaultKillMachine, 3}, {FaultKillHost, 3}, {FaultKillRegion, 2}, {FaultStallHost, 2},
		{FaultPartition, 3}, {FaultLoss, 1}, {FaultSlowLink, 1},
	}
	if topo.ControlPlane {
		kinds = append(kinds, kind{FaultKillPlane, 1})
	}
	total := 0
	for _, k := range kinds {
		total += k.weight
	}
	host := func(region string, n int) string { return fmt.Sprintf("%s-%d", region, n) }
	others := func(region string) []string {
		return slices.DeleteFunc(slices.Clone(topo.Regions), func(o string) bool { return o == region })
	}
	lo := (max(chaosMinHold, maxHold/4) + chaosHoldGranular - 1) / chaosHoldGranular
	hi := maxHold / chaosHoldGranular
	for range steps {
		st := ChaosStep{Hold: (lo + time.Duration(r.Int64N(int64(hi-lo+1)))) * chaosHoldGranular}
		pick := r.IntN(total)
		var k string
		for _, c := range kinds {
			if pick < c.weight {
				k = c.name
				break
			}
			pick -= c.weight
		}
		region := topo.Regions[r.IntN(len(topo.Regions))]
		f := ChaosFault{Kind: k}
		switch k {
		case FaultKillMachine:
			f.Target, f.Index = region, r.IntN(1<<10)
		case FaultKillHost, FaultStallHost:
			f.Target = host(region, 1+r.IntN(topo.HostsPerRegion))
		case FaultKillRegion:
			f.Target = region
		case FaultPartition:
			switch v := r.IntN(3); {
			case v == 0 && topo.ControlPlane:
				// The control plane alone, cut off from every host.
				f.A, f.B = []string{controlID}, slices.Clone(topo.Regions)
			case v == 1 && topo.HostsPerRegion > 1:
				// One host that is not its region's edge, cut off from
				// everything else.
				h := host(region, 2+r.IntN(topo.HostsPerRegion-1))
				f.A = []string{h}
				for n := 1; n <= topo.HostsPerRegion; n++ {
					if host(region, n) != h {
						f.B = append(f.B, host(region, n))
					}
				}
				f.B = append(f.B, others(region)...)
				if topo.ControlPlane {
					f.B = append(f.B, controlID)
				}
			default:
				// A region cut off from the rest; the control plane on
				// either side.
				f.A, f.B = []string{region}, others(region)
				if topo.ControlPlane {
					if r.IntN(2) == 0 {
						f.A = append(f.A, controlID)
					} else {
						f.B = append(f.B, controlID)
					}
				}
			}
		case FaultLoss:
			f.A, f.B, f.Percent = []string{region}, others(region), float64(10+5*r.IntN(11))
		case FaultSlowLink:
			f.A, f.B, f.Delay = []string{region}, others(region), time.Duration(20+10*r.IntN(19))*time.Millisecond
		}
		st.Faults = append(st.Faults, f)
		switch k {
		case FaultKillMachine, FaultKillHost, FaultKillRegion, FaultStallHost:
			if topo.ControlPlane && r.IntN(4) == 0 {
				st.Faults = append(st.Faults, ChaosFault{Kind: FaultKillPlane})
			}
		}
		s.Steps = append(s.Steps, st)
	}
	return s, nil
}

// chaosDown returns the hosts a step's faults kill or stall: their edges
// are no edges for clients to call meanwhile.
func (c *Cluster) chaosDown(st ChaosStep) (hosts []string) {
	for _, f := range st.Faults {
		switch f.Kind {
		case FaultKillHost, FaultStallHost:
			hosts = append(hosts, f.Target)
		case FaultKillRegion:
			for _, h := range c.Hosts {
				if h.Region == f.Target {
					hosts = append(hosts, h.ID)
				}
			}
		}
	}
	return hosts
}

// applyChaos applies one fault of a step to the cluster and returns how
// to undo it. app is the app whose machines kill-machine picks from.
func (c *Cluster) applyChaos(ctx context.Context, f ChaosFault, hold time.Duration, app string) (undo func(context.Context) error, err error) {
	none := func(context.Context) error { return nil }
	heal := func(context.Context) error { c.Heal(); return nil }
	switch f.Kind {
	case FaultKillMachine:
		var ids []string
		for _, h := range c.Hosts {
			if c.Killed(h.ID) || h.Region != f.Target {
				continue
			}
			for _, am := range h.Agent.AllMachines() {
				if am.App == app && am.Machine.State == api.StateStarted {
					ids = append(ids, am.Machine.ID)
				}
			}
		}
		if len(ids) == 0 {
			return none, nil // nothing runs there now: the step is a pause
		}
		slices.Sort(ids)
		_, err := c.KillMachine(ctx, app, ids[f.Index%len(ids)])
		return none, err
	case FaultKillHost:
		if err := c.KillHost(ctx, f.Target); err != nil {
			return nil, err
		}
		return func(ctx context.Context) error { _, err := c.Revive(ctx, f.Target); return err }, nil
	case FaultKillRegion:
		if _, err := c.KillRegion(ctx, f.Target); err != nil {
			return nil, err
		}
		return func(ctx context.Context) error { _, err := c.Revive(ctx, f.Target); return err }, nil
	case FaultStallHost:
		if err := c.StallHost(f.Target, hold); err != nil {
			return nil, err
		}
		return func(ctx context.Context) error {
			for {
				st := c.Status()
				if !slices.ContainsFunc(st.Stalled, func(s Stall) bool { return s.Host == f.Target }) {
					return nil
				}
				select {
				case <-ctx.Done():
					return fmt.Errorf("devcluster: stall of %s did not end: %w", f.Target, ctx.Err())
				case <-time.After(10 * time.Millisecond):
				}
			}
		}, nil
	case FaultPartition:
		return heal, c.Partition(f.A, f.B)
	case FaultLoss:
		return heal, c.Loss(f.A, f.B, f.Percent)
	case FaultSlowLink:
		return heal, c.SlowLink(f.A, f.B, f.Delay)
	case FaultKillPlane:
		if err := c.KillControlPlane(ctx); err != nil {
			return nil, err
		}
		return c.RestartControlPlane, nil
	}
	return nil, fmt.Errorf("%w: unknown fault %q", ErrBadFault, f.Kind)
}
