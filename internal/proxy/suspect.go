package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Suspect hosts: this edge's doubt, sooner than its verdict.
//
// A host is found silent (breaker.go) when an attempt's whole budget runs
// out: 50 ms plus two round trips for an acknowledgement, 250 ms plus three
// for a connect. The budgets are generous because the verdict moves the
// requests already sent and opens the host's breaker; but until it comes,
// every new request the edge sends the host meets the same silence. So
// the edge suspects a host long before it condemns it: an attempt on
// another host that has heard nothing from it for the host's allowance
// (hostWords: a round trip plus a slack, or what the host's words taught)
// after its request was written or its connect began — a healthy host
// acknowledges at once (ack.go) — makes the host suspect, and so does a
// gap of an acknowledgement interval plus the allowance between two
// acknowledgements of one request, or an unanswered heartbeat
// (heartbeat.go). When an allowance runs out the edge looks once more
// before it suspects (recheckAfter): its own stall is not the host's
// silence.
//
// A suspect host is deprioritised, never refused: its machines rank after
// the other machines of their region (route.Doubter), still before any
// other region's — a doubt alone, which a busy machine raises now and then,
// never sends a request across the world — and after every other candidate
// only once every host of that region is suspect or found silent, all
// within one allowance of each other (regionLooksDead). A request still
// goes to a suspect host when nothing else is left, and the attempts
// already waiting on it keep their budgets — a slow host loses its place
// in the order for a moment, not a request. Any word from it clears the
// suspicion (an acknowledgement, an answer, a connect, a heartbeat's
// answer), and the proxy probes a suspect host off the request path
// (probe.go) as soon as no attempt waits on it (while one does, its word
// or its verdict will tell): the probe's answer clears the suspicion; a
// probe that hears nothing within the budgets of a request is the silent
// verdict, and the host's breaker opens. A suspicion outlives the verdict
// until the host is heard from: when it fell silent is what tells a
// region's death from a flicker.
//
// A host found silent does not make its region-mates suspect: when a whole
// region dies, each of its hosts the edge sends to is suspected on its own
// evidence within the same allowance, and on a busy machine a false
// verdict on one host would otherwise move a whole region's traffic.

// suspectSlack is what a healthy host's first word may take beyond the
// measured round trip: the far proxy acknowledges before doing anything
// else, so this is scheduling on both ends, which the measured round
// trip (taken by the same busy hosts) partly holds already.
const (
	suspectSlackMin = 10 * time.Millisecond
	suspectSlackDiv = 8 // and an eighth of the round trip
)

// suspectAfter is how long an attempt on a host with round trip rtt waits
// for the host's first word before the host is suspect; zero when the
// round trip is unknown (the host is then never suspected early).
func suspectAfter(rtt time.Duration) time.Duration {
	if rtt <= 0 {
		return 0
	}
	return rtt + suspectSlackMin + rtt/suspectSlackDiv
}

// suspectBetweenAcks is the longest gap between two acknowledgements of
// one request before its host is suspect, for a host whose first word is
// allowed allow (zero: never).
func suspectBetweenAcks(allow time.Duration) time.Duration {
	if allow <= 0 {
		return 0
	}
	return ackInterval + allow
}

// hostWords learns, per host, how long its first word takes: the round
// trip of a request's first acknowledgement or of a heartbeat's answer,
// both written at once by the far proxy. A host's allowance is the larger
// of suspectAfter its measured round trip and the learnt smoothed round
// trip plus four mean deviations plus the slack (RFC 6298's estimator), so
// a busy machine, whose words come late and unevenly, widens the
// allowance instead of having its hosts suspected again and again.
type hostWords struct {
	mu sync.Mutex
	m  map[string]*rttEstimate
}

// maxWordHosts bounds the hosts whose words are learnt.
const maxWordHosts = 1 << 12

// sample records a word from host that took d after what asked for it.
func (w *hostWords) sample(host string, d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string]*rttEstimate{}
	}
	e := w.m[host]
	if e == nil {
		if len(w.m) >= maxWordHosts {
			for k := range w.m { // forget one: the map stays bounded
				delete(w.m, k)
				break
			}
		}
		e = &rttEstimate{}
		w.m[host] = e
	}
	e.sample(d)
}

// allowance is how long host's first word may take before it is suspect,
// for a host with measured round trip rtt (zero: never suspected early).
func (w *hostWords) allowance(host string, rtt time.Duration) time.Duration {
	base := suspectAfter(rtt)
	if base == 0 {
		return 0
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if e := w.m[host]; e != nil {
		return max(base, e.allowance())
	}
	return base
}

// rttEstimate is a smoothed round trip and its mean deviation (RFC 6298).
type rttEstimate struct {
	srtt, rttvar time.Duration
}

func (e *rttEstimate) sample(r time.Duration) {
	if e.srtt == 0 {
		e.srtt, e.rttvar = r, r/2
		return
	}
	d := e.srtt - r
	if d < 0 {
		d = -d
	}
	e.rttvar = (3*e.rttvar + d) / 4
	e.srtt = (7*e.srtt + r) / 8
}

// allowance is the estimate's: zero before the first sample.
func (e *rttEstimate) allowance() time.Duration {
	if e.srtt == 0 {
		return 0
	}
	return e.srtt + 4*e.rttvar + suspectSlackMin
}

// maxSuspects bounds the hosts suspected at once.
const maxSuspects = 1 << 12

// suspects are the hosts this edge suspects.
type suspects struct {
	index atomic.Pointer[regionIndex]
	n     atomic.Int32 // hosts suspect: zero is the fast path
	mu    sync.Mutex
	m     map[string]*suspicion
}

// suspicion is one suspect host.
type suspicion struct {
	probing bool      // the proxy's probe of it is out
	since   time.Time // when it became suspect
}

// suspect makes host suspect and reports whether it was not already.
func (s *suspects) suspect(host string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]*suspicion{}
	}
	if s.m[host] != nil || len(s.m) >= maxSuspects {
		return false
	}
	s.m[host] = &suspicion{since: time.Now()}
	s.n.Add(1)
	return true
}

// heard clears a suspicion: the host was heard from.
func (s *suspects) heard(host string) {
	if s.n.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m[host] != nil {
		delete(s.m, host)
		s.n.Add(-1)
	}
}

// since reports when host became suspect (false: it is not).
func (s *suspects) since(host string) (time.Time, bool) {
	if s.n.Load() == 0 {
		return time.Time{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if sp := s.m[host]; sp != nil {
		return sp.since, true
	}
	return time.Time{}, false
}

// has reports whether host is suspect.
func (s *suspects) has(host string) bool {
	if s.n.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m[host] != nil
}

// dueProbes appends to out at most limit suspect hosts not probed yet (and
// not probed for a breaker: running) on which no attempt waits (its word
// or its verdict will tell), marking them probed.
func (s *suspects) dueProbes(limit int, running map[string]bool, waiting func(host string) bool, out []string) []string {
	if s.n.Load() == 0 {
		return out
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for host, sp := range s.m {
		if len(out) >= limit {
			break
		}
		if !sp.probing && !running[host] && !waiting(host) {
			sp.probing = true
			out = append(out, host)
		}
	}
	return out
}

// pending reports whether a suspect host waits for its probe.
func (s *suspects) pending() bool {
	if s.n.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range s.m {
		if !sp.probing {
			return true
		}
	}
	return false
}

// regionIndex lists the hosts of each region of one state.
type regionIndex struct {
	st *state
	by map[string][]string
}

// regionHosts returns the hosts of region in st (indexed once per state).
func (p *Proxy) regionHosts(st *state, region string) []string {
	if ix := p.suspicion.index.Load(); ix != nil && ix.st == st {
		return ix.by[region]
	}
	ix := &regionIndex{st: st, by: map[string][]string{}}
	for id, h := range st.hosts {
		ix.by[h.Region] = append(ix.by[h.Region], id)
	}
	p.suspicion.index.Store(ix)
	return ix.by[region]
}

// regionLooksDead reports whether every host of host's region that could
// take a request (not down, with a backhaul address) is suspect or has
// its breaker open, and all fell so within one allowance of each other:
// a region dies at once, while a host that died long ago and a flicker of
// its region-mates on a busy machine are no region's death. It takes two
// hosts at least: one host's silence alone is corroborated by nothing but
// its verdict (its breaker demotes it then). Never for the
// edge's own region, and never while the edge suspects a host of its own
// region too: a doubt that is everywhere is the doubter's (a busy machine,
// its own network), and moving traffic across the world would not cure it.
func (p *Proxy) regionLooksDead(host string) bool {
	st := p.state.Load()
	h, ok := st.hosts[host]
	if !ok || h.Region == p.cfg.Region {
		return false
	}
	for _, id := range p.regionHosts(st, p.cfg.Region) {
		if id != p.cfg.HostID && p.suspicion.has(id) {
			return false
		}
	}
	var first, last time.Time
	var window time.Duration
	hosts := 0
	for _, id := range p.regionHosts(st, h.Region) {
		m := st.hosts[id]
		if m.Status == route.HostDown || st.backhaul[id] == "" {
			continue
		}
		hosts++
		at, ok := p.suspicion.since(id)
		if !ok {
			if at, ok = p.strikes.hostOpenSince(id); !ok {
				return false
			}
		}
		if first.IsZero() || at.Before(first) {
			first = at
		}
		if at.After(last) {
			last = at
		}
		window = max(window, p.words.allowance(id, m.RTT))
	}
	return hosts >= 2 && last.Sub(first) <= window
}

// hostOpenSince reports since when host's breaker has been open (or
// waiting for its probe) without closing.
func (s *breakers) hostOpenSince(host string) (time.Time, bool) {
	if s.entries.Load() == 0 {
		return time.Time{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if b := s.host[host]; b != nil && b.trips > 0 {
		return b.opened, true
	}
	return time.Time{}, false
}

// hostOpen reports whether host's breaker is open (or waits for its probe).
func (s *breakers) hostOpen(host string) bool {
	_, open := s.hostOpenSince(host)
	return open
}

// suspectHost makes a host suspect, as an attempt on it found (why), and
// has the proxy probe it.
func (p *Proxy) suspectHost(host, why string) {
	if host == p.cfg.HostID {
		return
	}
	if p.suspicion.suspect(host) {
		p.log.Debug("host suspect", "host", host, "why", why)
		p.probes.kick()
	}
}

// foundSilent records the verdict on a host an attempt or a probe found
// silent: its breaker opens (once: true when it did now), and the attempts
// still waiting on it give up (silence.go).
func (p *Proxy) foundSilent(host string) bool {
	if !p.strikes.fail("", host, weightConnect) {
		return false
	}
	p.probes.kick()        // the host's probe is scheduled; its success clears a suspicion too
	p.waiters.silent(host) // the attempts still waiting on it give up
	return true
}

// A word may be waiting, unread, when the allowance runs out: on a busy
// machine the goroutine that would read it has not run, and a timer or a
// read deadline fires late. So when the allowance runs out, the edge looks
// once more, after the time it was late itself (at least recheckMin),
// before it suspects the host: the edge's own stall is not the host's
// silence.
const recheckMin = time.Millisecond

// recheckAfter is how long the edge looks again when an allowance due at
// due ran out, noticed at now.
func recheckAfter(due, now time.Time) time.Duration {
	return max(recheckMin, now.Sub(due))
}

// suspectClock makes a host suspect when its allowance runs out (and the
// recheck after it): a timer that Stop ends and Reset starts again.
type suspectClock struct {
	mu        sync.Mutex
	t         *time.Timer
	due       time.Time
	rechecked bool
	stopped   bool
	fire      func()
}

// suspectTimer makes host suspect when the allowance after runs out; nil
// when after is zero (never early). Stop it once the host was heard from.
func (p *Proxy) suspectTimer(host string, after time.Duration, why string) *suspectClock {
	if after <= 0 {
		return nil
	}
	c := &suspectClock{fire: func() { p.suspectHost(host, why) }}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.due = time.Now().Add(after)
	c.t = time.AfterFunc(after, c.expire)
	return c
}

func (c *suspectClock) expire() {
	c.mu.Lock()
	if c.stopped {
		c.mu.Unlock()
		return
	}
	if !c.rechecked {
		c.rechecked = true
		now := time.Now()
		d := recheckAfter(c.due, now)
		c.due = now.Add(d)
		c.t.Reset(d)
		c.mu.Unlock()
		return
	}
	c.stopped = true
	c.mu.Unlock()
	c.fire()
}

// Stop ends the clock: the host was heard from, or the attempt is over.
func (c *suspectClock) Stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopped = true
	c.t.Stop()
}

// Reset starts the clock again with a new allowance (after a word).
func (c *suspectClock) Reset(after time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopped {
		return
	}
	c.rechecked = false
	c.due = time.Now().Add(after)
	c.t.Reset(after)
}
