// Package reconcile decides what keeps a declared group of machines true.
//
// Given a group (how many machines each region runs, how many stopped
// standbys each keeps ready), the machines recorded for it with what the
// cluster shows of each, how many more machines fit in each region, and the
// time, Decide returns a Plan: the actions to take (mark lost, destroy,
// start, promote a standby, place a new machine) and the group's new
// failure backoff and pending reasons. The control plane applies the plan;
// this package does no I/O, reads no clock and starts no goroutines, so a
// pass repeated, interrupted or run by another control plane decides the
// same from the same facts.
//
// What a group promises, region by region:
//
//   - its machines run only in the regions it declares; a machine that
//     does not fit is pending, with the reason, and is placed elsewhere
//     only when the group opts in (Spill);
//   - its machines are kept started: a stopped one is started, a failed one
//     is started once and, if it fails again, replaced;
//   - a machine that stops by itself soon after it was started (within the
//     region's current backoff, BackoffBase at least) failed (the control
//     plane forgets the starts of machines stopped on request, and tells
//     the exit in Machine.Exit): the region backs off
//     and the machine stays stopped until it tries again, so a command that
//     exits at once is never restarted in a loop;
//   - a machine lost with its host is replaced, by a ready standby first;
//     one whose live host never shows it is forgotten after LostAfter;
//   - extras are destroyed, the least useful first (failed, stopped, in
//     flight, then started; the newest of each);
//   - failures back off exponentially per region: while a region backs
//     off it starts and creates nothing, and the group shows the last
//     cause and when it tries again.
package reconcile

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/place"
)

// Policy holds the timings of the decisions.
type Policy struct {
	// LostAfter is how long an entry may point at a live host that does not
	// show its machine before the entry is forgotten.
	LostAfter time.Duration
	// BackoffBase is the wait after a region's first failure; each further
	// failure doubles it, up to BackoffMax.
	BackoffBase, BackoffMax time.Duration
}

// HostStatus is what the cluster says of a machine's host.
type HostStatus int

// Host statuses.
const (
	// HostUnknown: the cluster does not know the host (not seen yet, or
	// long forgotten). Nothing is decided about its machines.
	HostUnknown HostStatus = iota
	// HostUp: alive or suspect; its machines can be asked.
	HostUp
	// HostDown: dead or left; its machines are lost.
	HostDown
)

func (h HostStatus) String() string {
	switch h {
	case HostUp:
		return "up"
	case HostDown:
		return "down"
	}
	return "unknown"
}

// Machine is one machine recorded for the group and what the cluster shows
// of it.
type Machine struct {
	ID string
	// Slot is the region whose count the machine fills.
	Slot    string
	Created time.Time
	Standby bool
	Host    HostStatus
	// State is the machine's state as its host shows it, "" when the host
	// does not show it.
	State machine.State
	// Exit says how its last run ended ("exit code 0"), when known.
	Exit string
}

// Backoff is a region's record of failures.
type Backoff struct {
	Failures int `json:"failures"`
	// Until: no start and no create in the region before then.
	Until time.Time `json:"until"`
	// At is when the last failure was seen, LastError its cause.
	At        time.Time `json:"at"`
	LastError string    `json:"last_error"`
	// Machine is the machine of the last failure: a failed machine is
	// started once; failing again, it is replaced.
	Machine string `json:"machine,omitempty"`
}

// Run is the record of a start of one of the group's machines by the
// control plane, kept until the machine has run for the region's window
// (see Decide): one that stops before did not start well.
type Run struct {
	At time.Time `json:"at"`
	// Seen is set once the machine's host has shown it started since.
	Seen bool `json:"seen,omitempty"`
}

// Group is the declared state and what the group remembers between passes.
type Group struct {
	Regions  map[string]int
	Standbys int
	// Spill lets machines that do not fit in their region be placed in
	// the nearest region with room.
	Spill bool
	// Guest is what one machine takes from a host.
	Guest   place.Resources
	Backoff map[string]Backoff
	// Pending holds, per region, why declared machines were not placed at
	// the last pass.
	Pending map[string]string
	// Started holds, by machine, the starts not yet known to be good.
	Started map[string]Run
}

// Input is everything a decision reads.
type Input struct {
	Group    Group
	Machines []Machine
	// Room is how many more machines of the group's guest fit now in each
	// region.
	Room   map[string]int
	Now    time.Time
	Policy Policy
}

// Kind is what an action does.
type Kind int

// Kinds of action.
const (
	// MarkLost: the machine's host is down; record it lost (the API stops
	// showing it, and it is destroyed if the host returns).
	MarkLost Kind = iota + 1
	// Destroy the machine and forget its entry.
	Destroy
	// Start a stopped or failed machine of the group.
	Start
	// Promote starts a standby and makes it one of the group's machines.
	Promote
	// Place creates a new machine (a standby when Standby is set).
	Place
)

func (k Kind) String() string {
	switch k {
	case MarkLost:
		return "mark-lost"
	case Destroy:
		return "destroy"
	case Start:
		return "start"
	case Promote:
		return "promote"
	case Place:
		return "place"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// Action is one step of a plan.
type Action struct {
	Kind Kind
	// Machine is the machine acted on (all kinds but Place).
	Machine string
	// Region is the slot the action is for.
	Region string
	// Regions is where a Place may put the machine, in preference order.
	Regions []string
	// Standby marks a Place of a standby.
	Standby bool
	// Retry marks a Start of a failed machine, already counted as a
	// failure in the plan's backoff.
	Retry bool
	// Why says why, for the log.
	Why string
}

func (a Action) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", a.Kind, a.Region)
	if a.Machine != "" {
		fmt.Fprintf(&b, " %s", a.Machine)
	}
	if a.Kind == Place {
		fmt.Fprintf(&b, " in=%s", strings.Join(a.Regions, ","))
		if a.Standby {
			b.WriteString(" standby")
		}
	}
	if a.Retry {
		b.WriteString(" retry")
	}
	fmt.Fprintf(&b, " (%s)", a.Why)
	return b.String()
}

// Plan is a decision: the actions, in order, and the group's backoff,
// pending reasons and starts after them. The control plane records in
// Started the machines it places started, and forgets the starts that did
// not happen.
type Plan struct {
	Actions []Action
	Backoff map[string]Backoff
	Pending map[string]string
	Started map[string]Run
}

// class is how a machine counts.
type class int

const (
	failed   class = iota // failed: started once, then replaced
	stopped               // at rest, not running: started
	inFlight              // being created, started, updated or destroyed
	started
)

func classOf(m Machine) class {
	switch m.State {
	case machine.Started:
		return started
	case machine.Stopped, machine.Created, machine.Suspended, machine.Stopping, machine.Suspending:
		return stopped
	case machine.Failed, machine.LaunchFailed:
		return failed
	}
	return inFlight // "" (not shown yet) and the transient states
}

// Failed records one more failure: the region waits BackoffBase·2^(n-1),
// at most BackoffMax, before it starts or creates again.
func (b Backoff) Failed(now time.Time, machineID, cause string, p Policy) Backoff {
	b.Failures++
	b.At, b.Machine, b.LastError = now, machineID, cause
	b.Until = now.Add(p.delay(b.Failures))
	return b
}

func (p Policy) delay(failures int) time.Duration {
	d := p.BackoffBase
	for i := 1; i < failures && d < p.BackoffMax; i++ {
		d *= 2
	}
	return min(d, p.BackoffMax)
}

// region is what one region of the group has.
type region struct {
	actives, standbys []Machine
}

// Decide plans one pass over a group.
func Decide(in Input) Plan {
	p := Plan{Backoff: maps.Clone(in.Group.Backoff), Pending: map[string]string{}, Started: maps.Clone(in.Group.Started)}
	if p.Backoff == nil {
		p.Backoff = map[string]Backoff{}
	}
	if p.Started == nil {
		p.Started = map[string]Run{}
	}
	ms := slices.Clone(in.Machines)
	slices.SortFunc(ms, func(a, b Machine) int { return cmp.Compare(a.ID, b.ID) })
	regions := map[string]*region{}
	at := func(r string) *region {
		if regions[r] == nil {
			regions[r] = &region{}
		}
		return regions[r]
	}
	for r := range in.Group.Regions {
		at(r)
	}
	for _, m := range ms {
		switch {
		case m.Host == HostDown:
			p.add(Action{Kind: MarkLost, Machine: m.ID, Region: m.Slot, Why: "lost with its host"})
			continue
		case m.Host == HostUp && m.State == "" && in.Now.Sub(m.Created) > in.Policy.LostAfter:
			p.add(Action{Kind: Destroy, Machine: m.ID, Region: m.Slot,
				Why: fmt.Sprintf("its host has not shown it for %s", in.Policy.LostAfter)})
			continue
		case m.State == machine.Destroyed:
			p.add(Action{Kind: Destroy, Machine: m.ID, Region: m.Slot, Why: "destroyed on its host"})
			continue
		}
		r := at(m.Slot)
		if m.Standby {
			r.standbys = append(r.standbys, m)
		} else {
			r.actives = append(r.actives, m)
		}
	}
	room := maps.Clone(in.Room)
	if room == nil {
		room = map[string]int{}
	}
	for _, name := range slices.Sorted(maps.Keys(regions)) {
		p.region(in, name, regions[name], room)
	}
	for r, b := range p.Backoff {
		if b.Failures == 0 {
			delete(p.Backoff, r)
		}
	}
	// The starts of machines the group no longer has are forgotten.
	for id := range p.Started {
		if !slices.ContainsFunc(in.Machines, func(m Machine) bool {
			return m.ID == id && m.Host != HostDown && m.State != machine.Destroyed
		}) {
			delete(p.Started, id)
		}
	}
	return p
}

func (p *Plan) add(a Action) { p.Actions = append(p.Actions, a) }

// worstFirst orders machines by how little they serve (failed, stopped, in
// flight, started), the newest first within a class.
func worstFirst(ms []Machine) {
	slices.SortStableFunc(ms, func(a, b Machine) int {
		if c := cmp.Compare(classOf(a), classOf(b)); c != 0 {
			return c
		}
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
}

func (p *Plan) region(in Input, name string, r *region, room map[string]int) {
	g := in.Group
	want := max(g.Regions[name], 0)
	b := p.Backoff[name]
	waiting := in.Now.Before(b.Until)
	// Too many: destroy the least useful.
	worstFirst(r.actives)
	for len(r.actives) > want {
		p.add(Action{Kind: Destroy, Machine: r.actives[0].ID, Region: name, Why: "extra"})
		r.actives = r.actives[1:]
	}
	// Keep them started; a failed machine is started once, then replaced.
	keep := r.actives[:0:0]
	for _, m := range r.actives {
		c := classOf(m)
		if st, ok := p.Started[m.ID]; ok && m.Host == HostUp {
			// Started lately: it must run for the window before its start
			// counts as good, and one that stops before failed.
			window := in.Policy.delay(max(b.Failures, 1))
			ran := in.Now.Sub(st.At)
			switch {
			case c == started && ran >= window:
				delete(p.Started, m.ID)
			case c == started:
				st.Seen = true
				p.Started[m.ID] = st
			case c == stopped && (st.Seen || ran >= window):
				delete(p.Started, m.ID)
				cause := fmt.Sprintf("machine %s stopped %s after it was started", m.ID, ran.Round(time.Millisecond))
				if !st.Seen {
					cause = fmt.Sprintf("machine %s did not stay started: %s after it was started, it is %s", m.ID, ran.Round(time.Millisecond), m.State)
				}
				if m.Exit != "" {
					cause += " (" + m.Exit + ")"
				}
				b = b.Failed(in.Now, m.ID, cause, in.Policy)
				waiting = true
				keep = append(keep, m)
				continue
			case c == stopped:
				// Not shown started yet: the start is left the window.
				keep = append(keep, m)
				continue
			}
		}
		switch {
		case c != stopped && c != failed, m.Host != HostUp, waiting:
			keep = append(keep, m)
		case c == stopped:
			p.add(Action{Kind: Start, Machine: m.ID, Region: name, Why: string(m.State)})
			p.Started[m.ID] = Run{At: in.Now}
			keep = append(keep, m)
		case m.ID == b.Machine:
			p.add(Action{Kind: Destroy, Machine: m.ID, Region: name, Why: "failed, its last failure already counted: replacing it"})
		default:
			b = b.Failed(in.Now, m.ID, fmt.Sprintf("machine %s failed", m.ID), in.Policy)
			p.add(Action{Kind: Start, Machine: m.ID, Region: name, Retry: true, Why: "failed: starting it again"})
			p.Started[m.ID] = Run{At: in.Now}
			keep = append(keep, m)
		}
	}
	r.actives = keep
	// Standbys: failed ones are of no use; ready ones fill the gap first.
	worstFirst(r.standbys)
	var ready []Machine
	for _, m := range r.standbys {
		if classOf(m) == failed && m.Host == HostUp {
			p.add(Action{Kind: Destroy, Machine: m.ID, Region: name, Why: "failed standby"})
			continue
		}
		ready = append(ready, m)
	}
	need := want - len(r.actives)
	slices.Reverse(ready) // best (started or ready, oldest) first
	for i := 0; i < len(ready) && need > 0 && !waiting; {
		m := ready[i]
		if m.Host != HostUp || classOf(m) != stopped {
			i++
			continue
		}
		p.add(Action{Kind: Promote, Machine: m.ID, Region: name, Why: "short of machines"})
		p.Started[m.ID] = Run{At: in.Now}
		ready = slices.Delete(ready, i, i+1)
		need--
	}
	var short []string
	placed := p.place(in, name, need, false, b, room)
	if placed < need {
		short = append(short, fmt.Sprintf("%d of %d machines", need-placed, want))
	}
	wantReady := 0
	if want > 0 {
		wantReady = g.Standbys
	}
	// Extra standbys: the newest go.
	slices.SortStableFunc(ready, func(a, b Machine) int { return b.Created.Compare(a.Created) })
	for len(ready) > wantReady {
		p.add(Action{Kind: Destroy, Machine: ready[0].ID, Region: name, Why: "extra standby"})
		ready = ready[1:]
	}
	if n := wantReady - len(ready); n > 0 && placed == need {
		if got := p.place(in, name, n, true, b, room); got < n {
			short = append(short, fmt.Sprintf("%d of %d standbys", n-got, wantReady))
		}
	}
	if len(short) > 0 {
		why := ""
		switch {
		case waiting:
			why = fmt.Sprintf("backing off after %d failures until %s: %s", b.Failures, b.Until.UTC().Format(time.RFC3339), b.LastError)
		case g.Spill:
			why = fmt.Sprintf("no room for %s machines in %s or any other region", g.Guest, name)
		default:
			why = fmt.Sprintf("no room for %s machines in %s (the group does not spill to other regions)", g.Guest, name)
		}
		p.Pending[name] = strings.Join(short, " and ") + " not placed: " + why
	}
	// Healthy for as long as the last wait: the failures are forgiven.
	if b.Failures > 0 && !waiting && !in.Now.Before(b.Until.Add(in.Policy.delay(b.Failures))) {
		healthy := len(r.actives) == want
		for _, m := range r.actives {
			healthy = healthy && classOf(m) == started
		}
		if healthy {
			b = Backoff{}
		}
	}
	p.Backoff[name] = b
}

// place plans up to n creates in region name, as many as there is room for,
// and returns how many it planned.
func (p *Plan) place(in Input, name string, n int, standby bool, b Backoff, room map[string]int) int {
	if in.Now.Before(b.Until) {
		return 0
	}
	regions := []string{name}
	if in.Group.Spill {
		regions = append(regions, "any")
	}
	why := "short of machines"
	if standby {
		why = "short of standbys"
	}
	done := 0
	for ; done < n; done++ {
		if !take(room, name, in.Group.Spill) {
			break
		}
		p.add(Action{Kind: Place, Region: name, Regions: regions, Standby: standby, Why: why})
	}
	return done
}

// take uses the room of one machine: in region name, else (when spill) in
// any other region.
func take(room map[string]int, name string, spill bool) bool {
	if room[name] > 0 {
		room[name]--
		return true
	}
	if !spill {
		return false
	}
	for _, r := range slices.Sorted(maps.Keys(room)) {
		if room[r] > 0 {
			room[r]--
			return true
		}
	}
	return false
}

// RegionStatus is what a region of a group has now.
type RegionStatus struct {
	// Started, Stopped and Failed count the group's machines by state;
	// Pending is how many declared machines are neither (not placed yet, or
	// being created or started); Standby counts the ready standbys.
	Started, Stopped, Failed, Pending, Standby int
	// Why says why machines are pending, when they are not just in flight.
	Why string
	// Failures, LastError and RetryAt are the region's backoff.
	Failures  int
	LastError string
	RetryAt   time.Time
}

// Status is what the group has in each region it declares or has machines
// in.
func Status(in Input) map[string]RegionStatus {
	out := map[string]RegionStatus{}
	for r := range in.Group.Regions {
		out[r] = RegionStatus{}
	}
	for _, m := range in.Machines {
		if m.Host == HostDown || m.State == machine.Destroyed {
			continue
		}
		s := out[m.Slot]
		switch {
		case m.Standby:
			if c := classOf(m); c == stopped || c == started {
				s.Standby++
			}
		case classOf(m) == started:
			s.Started++
		case classOf(m) == stopped:
			s.Stopped++
		case classOf(m) == failed:
			s.Failed++
		}
		out[m.Slot] = s
	}
	for r, s := range out {
		s.Pending = max(in.Group.Regions[r]-s.Started-s.Stopped-s.Failed, 0)
		s.Why = in.Group.Pending[r]
		if b, ok := in.Group.Backoff[r]; ok && b.Failures > 0 {
			s.Failures, s.LastError = b.Failures, b.LastError
			if in.Now.Before(b.Until) {
				s.RetryAt = b.Until
			}
		}
		out[r] = s
	}
	return out
}
