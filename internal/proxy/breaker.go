package proxy

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Circuit breakers of machines and hosts.
//
// A breaker is closed while what it guards answers. Failed attempts add up,
// weighted by how sure they are: at breakerTrip points in a row (no success
// between) it opens. A failure to connect — refused, timed out, or the
// machine's host saying the machine is not running there — weighs
// breakerTrip, so it opens at once: nothing reached the machine, nothing
// listens there now, and every request that tries again pays for it (a
// silent host costs its whole connect budget). A reset before the response
// started, or a machine that took a request and did not answer in time,
// weighs one point: one request can crash a handler, and a keep-alive
// connection the machine closed just as it was reused resets too, while the
// machine is fine — five in a row are not chance (Envoy ejects after five
// consecutive errors, gobreaker trips after five). A machine's answer, 5xx
// included, is a success: the breaker guards delivery, not the app's
// answers, which are passed on and never retried.
//
// An open breaker's machine (every machine of a host whose breaker is open)
// is skipped while any other candidate is left; when none is, it is tried
// anyway, as a last resort, rather than answering 502 or 503 for a breaker
// alone: an app whose only machine came back is served by the next request,
// not after the backoff. After breakerBase (doubling with each opening in a
// row, up to breakerMax) the breaker is half-open: exactly one request
// (the probe) tries the machine at its usual rank, the others still skip
// it; the probe's success closes the breaker, its failure opens it again
// for twice as long. A probe that never reports (its request vanished) is
// given back after its lease: the longest an attempt may take (the connect
// timeout twice over, and the response header timeout).
//
// A host's breaker is opened by silence alone (a connect to it that timed
// out, a request it did not acknowledge), and a request that probed a
// silent host would wait out the same budget. So no request probes it: when
// it would be half-open the proxy probes the host itself, in the
// background (probe.go), and until that probe succeeds, no request is
// admitted to the host's machines at their rank (a last resort still is).
// The probe's success closes the breaker; its failure opens it for twice as
// long. A machine's breaker keeps its request probes: it opens on what
// fails at once (a refused connect, a reset), so a probe that fails again
// costs its request next to nothing.
const (
	breakerTrip   = 5
	weightConnect = breakerTrip
	weightReset   = 1
	breakerBase   = 250 * time.Millisecond
	breakerMax    = 10 * time.Second
	// maxBreakers bounds the breakers kept: past it, those that are
	// neither open nor probing are forgotten.
	maxBreakers = 1 << 14
)

// breakerState is where a breaker is.
type breakerState uint8

const (
	stateClosed breakerState = iota
	stateOpen
	stateHalfOpen
)

func (s breakerState) String() string {
	return [...]string{"closed", "open", "half-open"}[s]
}

// breaker is one machine's or host's breaker: a state machine of the
// attempts' outcomes and the time, which is passed in.
type breaker struct {
	points  int       // weighted failures in a row while closed
	trips   int       // times opened in a row, zero while closed
	until   time.Time // open until, when trips > 0
	probeAt time.Time // when the half-open probe was handed out; zero: none is
	lease   time.Duration
	// synthetic: probed by the proxy, never by a request (a host's).
	synthetic bool
	// opened is when it first opened since it was last closed.
	opened time.Time
}

func (b *breaker) state(now time.Time) breakerState {
	switch {
	case b.trips == 0:
		return stateClosed
	case now.Before(b.until):
		return stateOpen
	}
	return stateHalfOpen
}

// probing reports whether a probe is out.
func (b *breaker) probing(now time.Time) bool {
	if b.synthetic {
		return !b.probeAt.IsZero() // the proxy's probe always reports
	}
	return !b.probeAt.IsZero() && now.Sub(b.probeAt) < b.lease
}

// fail records a failed attempt of weight points and reports whether the
// breaker opened. A failure while half-open (the probe's, or a last
// resort's) opens it again; one while open (a last resort) changes nothing.
func (b *breaker) fail(now time.Time, weight int) bool {
	switch b.state(now) {
	case stateClosed:
		b.points += weight
		if b.points < breakerTrip {
			return false
		}
	case stateOpen:
		return false
	}
	if b.trips == 0 {
		b.opened = time.Now() // wall time: regions compare it with suspicions (suspect.go)
	}
	b.trips++
	b.points = 0
	b.probeAt = time.Time{}
	b.until = now.Add(min(breakerBase<<min(b.trips-1, 16), breakerMax))
	return true
}

// admit reports whether a request may try what the breaker guards at its
// usual rank now, and whether it holds the probe for it.
func (b *breaker) admit(now time.Time) (ok, probe bool) {
	if b.synthetic {
		return b.trips == 0, false
	}
	switch b.state(now) {
	case stateClosed:
		return true, false
	case stateOpen:
		return false, false
	}
	if b.probing(now) {
		return false, false
	}
	b.probeAt = now
	return true, true
}

// demoted: a selection ranks it after every other candidate — open, or
// half-open with its probe out. A half-open breaker with no probe out is
// ranked as usual, so the next request probes it.
func (b *breaker) demoted(now time.Time) bool {
	if b.synthetic {
		return b.trips > 0
	}
	switch b.state(now) {
	case stateOpen:
		return true
	case stateHalfOpen:
		return b.probing(now)
	}
	return false
}

// keep: worth remembering when the table of breakers is full.
func (b *breaker) keep(now time.Time) bool {
	if b.synthetic {
		return b.trips > 0
	}
	st := b.state(now)
	return st == stateOpen || st == stateHalfOpen && b.probing(now)
}

// probeDue reports whether the proxy's own probe is due: a synthetic
// breaker past its open time with no probe out.
func (b *breaker) probeDue(now time.Time) bool {
	return b.synthetic && b.trips > 0 && !now.Before(b.until) && b.probeAt.IsZero()
}

// breakers are the breakers of machines and hosts that failed recently. A
// success forgets what it guards. (The proxy's field is still called
// strikes.)
type breakers struct {
	now     func() time.Time
	lease   time.Duration // of a probe
	entries atomic.Int32  // breakers kept: zero is the fast path
	mu      sync.Mutex
	machine map[string]*breaker
	host    map[string]*breaker
}

func newBreakers(now func() time.Time, lease time.Duration) *breakers {
	return &breakers{now: now, lease: lease, machine: map[string]*breaker{}, host: map[string]*breaker{}}
}

// fail records a failed attempt on a machine, or on a whole host when
// machine is "", and reports whether its breaker opened.
func (s *breakers) fail(machine, host string, weight int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, key := s.machine, machine
	if machine == "" {
		m, key = s.host, host
	}
	b := m[key]
	if b == nil {
		if int(s.entries.Load()) >= maxBreakers {
			s.prune()
		}
		b = &breaker{lease: s.lease, synthetic: machine == ""}
		m[key] = b
		s.entries.Add(1)
	}
	return b.fail(s.now(), weight)
}

// prune forgets the breakers that are neither open nor probing.
func (s *breakers) prune() {
	now := s.now()
	for _, m := range []map[string]*breaker{s.machine, s.host} {
		for k, b := range m {
			if !b.keep(now) {
				delete(m, k)
				s.entries.Add(-1)
			}
		}
	}
}

// reset closes the breakers of a machine and its host after a success.
// A delivery path calls Proxy.succeeded, which also counts the success for
// the region: a path that counted only failures there would shed healthy
// regions.
func (s *breakers) reset(machine, host string) {
	if s.entries.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, found := s.machine[machine]; found {
		delete(s.machine, machine)
		s.entries.Add(-1)
	}
	if _, found := s.host[host]; found {
		delete(s.host, host)
		s.entries.Add(-1)
	}
}

// admit reports whether a request may try a machine at its usual rank now
// (its breaker and its host's both let it), and whether it took a probe
// (then it must report a success, a failure, or release).
func (s *breakers) admit(machine, host string) (ok, probe bool) {
	if s.entries.Load() == 0 {
		return true, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	mb, hb := s.machine[machine], s.host[host]
	for _, b := range []*breaker{mb, hb} {
		if b != nil && b.demoted(now) {
			return false, false
		}
	}
	for _, b := range []*breaker{mb, hb} {
		if b != nil {
			_, p := b.admit(now)
			probe = probe || p
		}
	}
	return true, probe
}

// release gives back a probe whose request ended without telling (the
// client left).
func (s *breakers) release(machine, host string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range []*breaker{s.machine[machine], s.host[host]} {
		if b != nil {
			b.probeAt = time.Time{}
		}
	}
}

// demoted reports whether a selection ranks the machine last now.
func (s *breakers) demoted(machine, host string) bool {
	if s.entries.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if b := s.machine[machine]; b != nil && b.demoted(now) {
		return true
	}
	if b := s.host[host]; b != nil && b.demoted(now) {
		return true
	}
	return false
}

// states returns the state of the machine's breaker and of its host's.
func (s *breakers) states(machine, host string) (m, h breakerState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if b := s.machine[machine]; b != nil {
		m = b.state(now)
	}
	if b := s.host[host]; b != nil {
		h = b.state(now)
	}
	return m, h
}

// Recording the outcome of an attempt: what every delivery path calls —
// admit before an attempt (false: skip the target while another is left;
// a probe taken must end in succeeded, or strike then release, or
// release alone when the client left),
// succeeded or strike after it.

// admit reports whether an attempt on tg may be made at its rank now, and
// whether it holds a probe (see breakers.admit).
func (p *Proxy) admit(tg *route.Target) (ok, probe bool) {
	return p.strikes.admit(tg.MachineID, tg.Host)
}

// release gives back the probe an attempt took, once its outcome was
// recorded (or will not be: the client left).
func (p *Proxy) release(tg *route.Target, probe bool) {
	if probe {
		p.strikes.release(tg.MachineID, tg.Host)
	}
}

// succeeded records a delivered attempt: the breakers of its machine and
// host close, and its region counts a success.
func (p *Proxy) succeeded(tg *route.Target) {
	p.strikes.reset(tg.MachineID, tg.Host)
	p.suspicion.heard(tg.Host)
	p.regions.record(tg.App, tg.Region, false)
}

// strike records a failed attempt: a connect to another host that timed
// out, or a request it did not acknowledge (ack.go), counts against the
// host (it went silent), any other failure against the machine; its
// region counts a failure.
func (p *Proxy) strike(tg *route.Target, err error) {
	p.regions.record(tg.App, tg.Region, true)
	var ce *connectError
	var se *silentError
	switch {
	case !tg.OnSelf && errors.As(err, &ce) && errors.Is(err, context.DeadlineExceeded),
		!tg.OnSelf && errors.As(err, &se):
		p.foundSilent(tg.Host) // its breaker opens (suspect.go)
	case errors.As(err, &ce), errors.Is(err, errNotReached):
		p.strikes.fail(tg.MachineID, tg.Host, weightConnect)
	default:
		p.strikes.fail(tg.MachineID, tg.Host, weightReset)
	}
}

// errNotReached: the machine's host says the machine was not reached (it
// does not run there, or refused the connection).
var errNotReached = errors.New("machine not reached")

// routeInput is what a selection reads of the proxy's live state: requests
// in flight, open breakers and regions shed.
type routeInput struct{ p *Proxy }

var (
	_ route.Load    = routeInput{}
	_ route.Demoter = routeInput{}
	_ route.Shedder = routeInput{}
	_ route.Doubter = routeInput{}
)

func (r routeInput) InFlight(id string) int { return r.p.load.InFlight(id) }

// Demoted: an open breaker's machine or host ranks after every other
// candidate, and so does a suspect host (suspect.go) of a region every
// host of which this edge suspects or found silent: the region looks dead.
func (r routeInput) Demoted(id, host string) bool {
	return r.p.strikes.demoted(id, host) || r.p.suspicion.has(host) && r.p.regionLooksDead(host)
}

// Doubted: a suspect host's machines rank after their region's others.
func (r routeInput) Doubted(host string) bool { return r.p.suspicion.has(host) }

func (r routeInput) Shed(app, region string, rand uint64) bool {
	return r.p.regions.shed(app, region, rand)
}

// order walks a selection as every delivery takes it: each candidate its
// breakers admit, in rank order, then, as last resorts, those they kept
// out (a breaker alone never turns a request or connection away). The
// selection is passed to each call, not kept: a selection held in a
// struct would make the escape analysis move its buffer to the heap.
type order struct {
	p       *Proxy
	skipped [route.MaxCandidates]*route.Target
	ns, i   int
}

// next returns the next target of cands to try and whether the attempt is
// its breaker's half-open probe (a probe taken must end as admit says); ok
// is false when none is left.
func (o *order) next(cands []*route.Target) (tg *route.Target, probe, ok bool) {
	for o.i < len(cands) {
		tg = cands[o.i]
		o.i++
		admitted, probe := o.p.admit(tg)
		if admitted || o.ns == len(o.skipped) {
			return tg, probe, true
		}
		o.skipped[o.ns] = tg
		o.ns++
	}
	if j := o.i - len(cands); j < o.ns {
		o.i++
		return o.skipped[j], false, true
	}
	return nil, false, false
}

// more reports whether a target is left after the one next returned last.
func (o *order) more(cands []*route.Target) bool { return o.i < len(cands)+o.ns }
