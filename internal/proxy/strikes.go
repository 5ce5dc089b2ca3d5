package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// Demotion after failures to connect: the first failure demotes for
// strikeBase, each further one in a row twice as long, up to strikeMax. A
// demoted machine (or every machine of a demoted host) is tried only after
// every other candidate; once the demotion ends the next request tries it
// as usual, and its success clears the record (half-open, one probe).
const (
	strikeBase = 250 * time.Millisecond
	strikeMax  = 10 * time.Second
)

type strike struct {
	count int
	until time.Time
}

// strikes records recent connect failures of machines and hosts.
type strikes struct {
	now     func() time.Time
	entries atomic.Int32 // machines and hosts recorded: zero is the fast path
	mu      sync.RWMutex
	machine map[string]*strike
	host    map[string]*strike
}

func newStrikes(now func() time.Time) *strikes {
	return &strikes{now: now, machine: map[string]*strike{}, host: map[string]*strike{}}
}

// fail records a failure of a machine, or of a whole host when machine is
// "".
func (s *strikes) fail(machine, host string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, key := s.machine, machine
	if machine == "" {
		m, key = s.host, host
	}
	st := m[key]
	if st == nil {
		st = &strike{}
		m[key] = st
		s.entries.Add(1)
	}
	st.count++
	d := strikeBase << min(st.count-1, 10)
	st.until = s.now().Add(min(d, strikeMax))
}

// ok clears what is recorded of a machine and its host after a success.
func (s *strikes) ok(machine, host string) {
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

// demoted reports whether the machine or its host is demoted now.
func (s *strikes) demoted(machine, host string) bool {
	if s.entries.Load() == 0 {
		return false
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	now := s.now()
	if st := s.machine[machine]; st != nil && now.Before(st.until) {
		return true
	}
	if st := s.host[host]; st != nil && now.Before(st.until) {
		return true
	}
	return false
}

// routeInput is what a selection reads of the proxy's live state: requests
// in flight and demotions.
type routeInput struct{ p *Proxy }

var (
	_ route.Load    = routeInput{}
	_ route.Demoter = routeInput{}
)

func (r routeInput) InFlight(id string) int { return r.p.load.InFlight(id) }

func (r routeInput) Demoted(id, host string) bool { return r.p.strikes.demoted(id, host) }
