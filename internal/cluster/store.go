package cluster

import (
	"slices"
	"strings"
)

// store holds every owner's facts as this host last learned them. It does no
// I/O and keeps no clock: callers pass the time and serialize access.
//
// An owner's facts are always exactly that owner's facts at some version:
// a full record replaces them when newer, and a delta applies only to the
// version it was made from (its base), or to anything older when its base
// is zero (a delta from nothing is a full record in pieces). A delta that
// arrives ahead of its base waits in a small buffer until the gap fills or
// a full record overtakes it. So duplicates and reordering are harmless,
// and two hosts holding the same version of an owner hold the same facts.
//
// The store is bounded in all, not only per owner, so a sender that makes
// up owners cannot grow it without end: at most maxOwners owners and
// maxTotal machines across them (zero: no bound). At either bound, facts
// of an owner that is a member of the cluster take the place of owners
// that are not (gossiped ahead of their member, or made up); facts of an
// owner that is not a member are refused.
type store struct {
	self      string
	limit     int // machines per owner
	owners    map[string]*owner
	waiting   map[string]*owner // owners with deltas waiting for their base
	maxWait   int               // pending deltas kept per owner
	maxOwners int
	maxTotal  int
	total     int                  // machines held, across owners
	member    func(id string) bool // nil: every owner is one
}

type owner struct {
	id       string
	version  uint64
	free     Resources
	load     float64
	machines map[string]*Machine
	sorted   []*Machine        // cached, sorted by id; nil when stale
	stateSig []byte            // the owner's signature of its facts at version (trust.go)
	pending  map[uint64]*delta // waiting deltas by base version
	gapSince int64             // unix nanoseconds the oldest wait began
}

// applyResult says what a record did.
type applyResult int

const (
	resultStale   applyResult = iota // already known or older: dropped
	resultApplied                    // changed the owner's facts
	resultPending                    // ahead of its base: waiting
	resultSelf                       // about this host: never applied
	resultInvalid                    // would break a limit: dropped
)

func newStore(self string, limit int) *store {
	return &store{self: self, limit: limit, owners: map[string]*owner{}, waiting: map[string]*owner{}, maxWait: 64}
}

// bound sets the store's bounds in all (see store) and how it tells a
// member from an owner that is not one.
func (s *store) bound(maxOwners, maxTotal int, member func(string) bool) {
	s.maxOwners, s.maxTotal, s.member = maxOwners, maxTotal, member
}

// isMember reports whether id is a member (or the store cannot tell).
func (s *store) isMember(id string) bool { return s.member == nil || id == s.self || s.member(id) }

// room makes room for owner id (new when it has no entry) to hold n
// machines in place of the cur it holds, evicting owners that are not
// members when id is one; false when there is no room.
func (s *store) room(id string, isNew bool, cur, n int) bool {
	fits := func() bool {
		return (!isNew || s.maxOwners == 0 || len(s.owners) < s.maxOwners) &&
			(s.maxTotal == 0 || s.total-cur+n <= s.maxTotal)
	}
	if fits() {
		return true
	}
	if !s.isMember(id) {
		return false
	}
	for oid := range s.owners {
		if oid != id && !s.isMember(oid) {
			s.remove(oid)
			if fits() {
				return true
			}
		}
	}
	return false
}

func (s *store) get(id string) *owner { return s.owners[id] }

func (s *store) version(id string) uint64 {
	if o := s.owners[id]; o != nil {
		return o.version
	}
	return 0
}

func (s *store) ensure(id string) *owner {
	o := s.owners[id]
	if o == nil {
		o = &owner{id: id, machines: map[string]*Machine{}}
		s.owners[id] = o
	}
	return o
}

// applyFull applies an owner's full facts received from the network.
func (s *store) applyFull(f *fullFacts) applyResult {
	if f.Owner == s.self {
		return resultSelf
	}
	o := s.owners[f.Owner]
	if o != nil && f.Version <= o.version {
		return resultStale
	}
	cur := 0
	if o != nil {
		cur = len(o.machines)
	}
	if !s.room(f.Owner, o == nil, cur, len(f.Machines)) {
		return resultInvalid
	}
	o = s.ensure(f.Owner)
	s.replace(o, f.Owner, f.Version, f.Free, f.Load, f.Machines)
	o.stateSig = f.StateSig
	s.drain(o, s.limit)
	return resultApplied
}

// applyDelta applies a delta received from the network; now is in unix
// nanoseconds.
func (s *store) applyDelta(d *delta, now int64) applyResult {
	if d.Owner == s.self {
		return resultSelf
	}
	o := s.owners[d.Owner]
	if o != nil && d.Version <= o.version {
		return resultStale
	}
	if o != nil && d.Base != 0 && d.Base < o.version {
		// Made from a version this host has passed: an owner's deltas
		// chain one version to the next, so this is not one of them.
		return resultStale
	}
	cur := 0
	if o != nil {
		cur = len(o.machines)
	}
	if o == nil && !s.room(d.Owner, true, 0, 0) {
		return resultInvalid
	}
	o = s.ensure(d.Owner)
	if d.Base != 0 && d.Base != o.version {
		return s.wait(o, d, now)
	}
	if !o.fits(d, s.limit) || !s.room(d.Owner, false, cur, o.count(d)) {
		return resultInvalid
	}
	s.apply(o, d)
	s.drain(o, s.limit)
	return resultApplied
}

// stale reports whether applyDelta would drop d unread as known or older.
func (s *store) stale(d *delta) bool {
	o := s.owners[d.Owner]
	return o != nil && (d.Version <= o.version || (d.Base != 0 && d.Base < o.version))
}

// fits reports whether applying d keeps the owner within limit machines.
func (o *owner) fits(d *delta, limit int) bool { return o.count(d) <= limit }

// count is how many machines the owner would hold with d applied (at most:
// removes are not subtracted).
func (o *owner) count(d *delta) int {
	if d.Base == 0 {
		return len(d.Upserts)
	}
	n := len(o.machines)
	for i := range d.Upserts {
		if o.machines[d.Upserts[i].ID] == nil {
			n++
		}
	}
	return n
}

func (s *store) wait(o *owner, d *delta, now int64) applyResult {
	if o.pending == nil {
		o.pending = map[uint64]*delta{}
	}
	if p, ok := o.pending[d.Base]; ok && p.Version >= d.Version {
		return resultStale
	}
	if len(o.pending) >= s.maxWait {
		// Drop the wait furthest ahead; the gap repair fetches a full
		// record anyway.
		far := uint64(0)
		for b := range o.pending {
			far = max(far, b)
		}
		if d.Base > far {
			return resultStale
		}
		delete(o.pending, far)
	}
	d.received = now
	o.pending[d.Base] = d
	if o.gapSince == 0 {
		o.gapSince = now
		s.waiting[o.id] = o
	}
	return resultPending
}

// drain applies waiting deltas that now follow on, and drops those passed.
func (s *store) drain(o *owner, limit int) {
	for len(o.pending) > 0 {
		if d, ok := o.pending[o.version]; ok {
			delete(o.pending, o.version)
			if d.Version > o.version && o.fits(d, limit) && s.room(o.id, false, len(o.machines), o.count(d)) {
				s.apply(o, d)
			}
			continue
		}
		for b, d := range o.pending {
			if d.Version <= o.version || b < o.version {
				delete(o.pending, b)
			}
		}
		break
	}
	if len(o.pending) == 0 {
		o.pending = nil
		o.gapSince = 0
		delete(s.waiting, o.id)
	}
}

// applyLocal applies this host's own published delta.
func (s *store) applyLocal(d *delta) {
	o := s.ensure(s.self)
	s.apply(o, d)
}

// remove forgets an owner.
func (s *store) remove(id string) {
	if o := s.owners[id]; o != nil {
		s.total -= len(o.machines)
	}
	delete(s.owners, id)
	delete(s.waiting, id)
}

// replace and apply change an owner's facts, keeping the store's count.
func (s *store) replace(o *owner, id string, version uint64, free Resources, load float64, ms []Machine) {
	s.total -= len(o.machines)
	o.replace(id, version, free, load, ms)
	s.total += len(o.machines)
}

func (s *store) apply(o *owner, d *delta) {
	s.total -= len(o.machines)
	o.apply(d)
	s.total += len(o.machines)
}

// gaps lists owners whose deltas have waited since before the given time.
func (s *store) gaps(before int64) []string {
	var ids []string
	for id, o := range s.waiting {
		if o.gapSince <= before {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	return ids
}

// full returns an owner's full facts, nil when unknown.
func (s *store) full(id string) *fullFacts {
	o := s.owners[id]
	if o == nil || o.version == 0 {
		return nil
	}
	f := &fullFacts{Owner: id, Version: o.version, Free: o.free, Load: o.load,
		Machines: make([]Machine, 0, len(o.machines)), StateSig: o.stateSig}
	for _, m := range o.list() {
		mm := *m
		mm.Host = ""
		f.Machines = append(f.Machines, mm)
	}
	return f
}

func (o *owner) replace(id string, version uint64, free Resources, load float64, ms []Machine) {
	o.version, o.free, o.load = version, free, load
	o.machines = make(map[string]*Machine, len(ms))
	for i := range ms {
		m := ms[i]
		m.Host = id
		o.machines[m.ID] = &m
	}
	o.sorted = nil
}

func (o *owner) apply(d *delta) {
	o.stateSig = d.StateSig
	if d.Base == 0 {
		o.replace(d.Owner, d.Version, d.Free, d.Load, d.Upserts)
		return
	}
	o.version, o.free, o.load = d.Version, d.Free, d.Load
	for i := range d.Upserts {
		m := d.Upserts[i]
		m.Host = d.Owner
		o.machines[m.ID] = &m
	}
	for _, id := range d.Removes {
		delete(o.machines, id)
	}
	o.sorted = nil
}

// list returns the owner's machines sorted by id; the slice and machines
// are shared and must not be modified.
func (o *owner) list() []*Machine {
	if o.sorted == nil {
		o.sorted = make([]*Machine, 0, len(o.machines))
		for _, m := range o.machines {
			o.sorted = append(o.sorted, m)
		}
		slices.SortFunc(o.sorted, func(a, b *Machine) int { return strings.Compare(a.ID, b.ID) })
	}
	return o.sorted
}
