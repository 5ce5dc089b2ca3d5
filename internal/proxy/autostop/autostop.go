// Package autostop decides which idle machines the proxies stop, by Fly's
// rule, without doing any I/O: Plan takes every machine as one host's
// cluster snapshot shows it, and the time, and names at most one machine
// per app and region to stop (or suspend).
//
// The rule, per app and region, over its running machines (started, not
// cordoned, on a host that is up): with two or more, excess = running −
// (running at or over their soft limit + 1), and one is stopped when the
// excess is at least one; a lone machine is stopped when it has no load.
// Never below min_machines_running, counted in the app's primary region
// (the machine's PRIMARY_REGION, or its own region without one): a machine
// there is stopped only while the app keeps at least that many running
// there after it. Machines whose services all say autostop off are never
// chosen, but count as running.
//
// Every host runs Plan over the same snapshot and acts only on the machines
// it owns, so the choice must not depend on which host computes it: the
// machine chosen is the least loaded, ties broken by machine id. The one
// input only the owner knows — when it last saw a request to the machine —
// can only keep a machine running: if a host's view differs there, no two
// hosts stop two machines for one excess (each host's choice would have to
// be better than the other's). A machine being stopped is cordoned first,
// so it no longer counts as running for the next pass anywhere.
package autostop

import (
	"cmp"
	"fmt"
	"slices"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Mode is what autostop does to a machine.
type Mode uint8

// Modes.
const (
	Off     Mode = iota // never stopped
	Stop                // stopped
	Suspend             // suspended (stopped where the driver cannot suspend)
)

// Machine is one machine of an app as the decision needs it.
type Machine struct {
	ID, App, Region, Host string
	// PrimaryRegion is the app's primary region as the machine says it;
	// empty means its own region.
	PrimaryRegion string
	// Running: started, not cordoned, on a host that is up.
	Running bool
	// Mode is the gentlest of its services' autostop settings (off if any
	// service says off).
	Mode Mode
	// MinRunning is the largest min_machines_running of its services.
	MinRunning int
	// Load is the concurrency its host last published; SoftLimit the
	// smallest soft limit of its services (zero: Fly's default).
	Load      int
	SoftLimit int
	// LastActive is when its owner last saw a request or connection to
	// it (zero when unknown: another host's machine).
	LastActive time.Time
}

// Decision is one machine to stop.
type Decision struct {
	MachineID, App, Region, Host string
	Suspend                      bool
	// Reason says why, for the log.
	Reason string
}

// Plan returns the machines to stop now: at most one per app and region,
// in app then region order. A machine active less than idle before now is
// not chosen.
func Plan(ms []Machine, now time.Time, idle time.Duration) []Decision {
	type key struct{ app, region string }
	groups := map[key][]*Machine{}
	minRun := map[string]int{} // app → min_machines_running
	inPrimary := map[key]int{} // (app, primary region) → running there
	for i := range ms {
		m := &ms[i]
		groups[key{m.App, m.Region}] = append(groups[key{m.App, m.Region}], m)
		minRun[m.App] = max(minRun[m.App], m.MinRunning)
		if m.Running {
			inPrimary[key{m.App, m.Region}]++
		}
	}
	keys := make([]key, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, func(a, b key) int { return cmp.Or(cmp.Compare(a.app, b.app), cmp.Compare(a.region, b.region)) })

	var out []Decision
	for _, k := range keys {
		running, over := 0, 0
		for _, m := range groups[k] {
			if m.Running {
				running++
				if m.Load >= soft(m) {
					over++
				}
			}
		}
		var reason string
		switch {
		case running == 0:
			continue
		case running == 1:
			reason = "the region's only running machine has no load"
		default:
			excess := running - (over + 1)
			if excess < 1 {
				continue
			}
			reason = fmt.Sprintf("%d running machines, %d at their soft limit: an excess of %d", running, over, excess)
		}
		var best *Machine
		for _, m := range groups[k] {
			switch {
			case !m.Running || m.Mode == Off:
				continue
			case running == 1 && m.Load > 0, m.Load >= soft(m):
				continue
			case !m.LastActive.IsZero() && now.Sub(m.LastActive) < idle:
				continue
			}
			primary := m.PrimaryRegion
			if primary == "" {
				primary = m.Region
			}
			if primary == m.Region && inPrimary[key{m.App, m.Region}]-1 < minRun[m.App] {
				continue
			}
			if best == nil || m.Load < best.Load || m.Load == best.Load && m.ID < best.ID {
				best = m
			}
		}
		if best == nil {
			continue
		}
		out = append(out, Decision{MachineID: best.ID, App: best.App, Region: best.Region, Host: best.Host,
			Suspend: best.Mode == Suspend, Reason: reason})
	}
	return out
}

func soft(m *Machine) int {
	if m.SoftLimit > 0 {
		return m.SoftLimit
	}
	return route.DefaultSoftLimit
}
