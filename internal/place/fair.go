package place

import (
	"cmp"
	"math"
	"slices"
)

// Fair tracks each org's allocation against the cluster's total and decides,
// under contention, whose pending request is served next and whose burst is
// reclaimed first. It is Dominant Resource Fairness with temporal
// elasticity: Allocate never refuses, so an org may use capacity beyond its
// fair share while nobody else wants it, and Reclaim names the orgs above
// their share when somebody below theirs is waiting.
//
// A Fair is a plain value with no locking; its owner serialises calls.
type Fair struct {
	total Resources
	used  Resources
	alloc map[string]Resources // only orgs with a non-zero allocation
}

// NewFair returns a Fair for a cluster with the given total capacity.
func NewFair(total Resources) *Fair {
	return &Fair{total: total, alloc: map[string]Resources{}}
}

// SetTotal changes the cluster's total capacity (hosts joined or left).
// Allocations are kept, even if they now exceed it.
func (f *Fair) SetTotal(total Resources) { f.total = total }

// Total returns the cluster's total capacity.
func (f *Fair) Total() Resources { return f.total }

// Used returns the sum of every org's allocation.
func (f *Fair) Used() Resources { return f.used }

// Free returns the capacity no org holds; negative when allocations exceed a
// total that shrank.
func (f *Fair) Free() Resources { return f.total.Sub(f.used) }

// Allocate records that org now holds r more. It never refuses: deciding
// whether r fits is placement's job, and running above one's fair share
// while capacity is idle is allowed. Negative amounts are ignored.
func (f *Fair) Allocate(org string, r Resources) {
	r = Resources{CPUs: max(0, r.CPUs), MemoryMB: max(0, r.MemoryMB)}
	if r.IsZero() {
		return
	}
	f.alloc[org] = f.alloc[org].Add(r)
	f.used = f.used.Add(r)
}

// Release records that org gave r back. An org never goes below zero: a
// release of more than it holds releases what it holds.
func (f *Fair) Release(org string, r Resources) {
	a, ok := f.alloc[org]
	if !ok {
		return
	}
	give := Resources{CPUs: min(a.CPUs, max(0, r.CPUs)), MemoryMB: min(a.MemoryMB, max(0, r.MemoryMB))}
	a = a.Sub(give)
	f.used = f.used.Sub(give)
	if a.IsZero() {
		delete(f.alloc, org)
		return
	}
	f.alloc[org] = a
}

// Allocated returns what org holds.
func (f *Fair) Allocated(org string) Resources { return f.alloc[org] }

// Orgs returns the orgs that hold anything, in order.
func (f *Fair) Orgs() []string {
	out := make([]string, 0, len(f.alloc))
	for org := range f.alloc {
		out = append(out, org)
	}
	slices.Sort(out)
	return out
}

// Share returns the dominant share of an amount: the larger of its fraction
// of all CPUs and of all memory. A resource the cluster has none of is left
// out.
func (f *Fair) Share(r Resources) float64 {
	s := 0.0
	if f.total.CPUs > 0 {
		s = max(s, float64(r.CPUs)/float64(f.total.CPUs))
	}
	if f.total.MemoryMB > 0 {
		s = max(s, float64(r.MemoryMB)/float64(f.total.MemoryMB))
	}
	return s
}

// DominantShare returns org's dominant share: the largest, over CPUs and
// memory, of its allocation divided by the cluster's total.
func (f *Fair) DominantShare(org string) float64 { return f.Share(f.alloc[org]) }

// FairShare returns the dominant share each active org is entitled to: one
// over the number of active orgs, those that hold anything or are named in
// active (orgs with a pending request). With no active org it is 1.
func (f *Fair) FairShare(active []string) float64 {
	n := len(f.alloc)
	for i, org := range active {
		if _, holds := f.alloc[org]; !holds && !slices.Contains(active[:i], org) {
			n++
		}
	}
	if n == 0 {
		return 1
	}
	return 1 / float64(n)
}

// Pending is a request waiting for capacity.
type Pending struct {
	Org    string
	Demand Resources
	Seq    uint64 // arrival order: breaks ties
}

// Next returns the index of the pending request to serve next: the one whose
// org has the lowest dominant share, the earliest (lowest Seq) among equals.
// It returns -1 when pending is empty.
//
// Starting from nothing allocated, serving requests in this order until the
// next one does not fit leaves the orgs still waiting within one task of each other: their dominant shares
// differ by at most the largest dominant share of a single request.
func (f *Fair) Next(pending []Pending) int {
	best, bestShare := -1, 0.0
	for i, p := range pending {
		s := f.DominantShare(p.Org)
		if best < 0 || s < bestShare || s == bestShare && p.Seq < pending[best].Seq {
			best, bestShare = i, s
		}
	}
	return best
}

// Claim asks an org to give back an amount of capacity.
type Claim struct {
	Org    string
	Amount Resources
}

// Reclaim says who should give back what so that p, a pending request that
// does not fit in the free capacity, can be served. active names the orgs
// with pending requests (p's org counts as active whether named or not);
// together with those holding anything they make the fair share.
//
// Only orgs above their fair share (bursting) are named, most over first
// (ties by org name). None is asked for more than it holds above its fair
// share of each resource (rounded down to whole units), so a reclaim never
// takes an org more than one unit below its share; and each claim is at most
// what is still missing, on each resource.
//
// Reclaim returns nil, and the request waits, when p already fits, when p's
// org is already at or above its fair share (it is bursting itself, or has
// its due), or when giving back everything above fair share would still
// leave too little room: nobody is asked to stop machines for nothing.
//
// The amounts are aggregates over the cluster; the caller chooses machines
// of each named org to stop that add up to at least the amount, preferring
// hosts where the freed room lets p's guest fit.
func (f *Fair) Reclaim(p Pending, active []string) []Claim {
	fair := f.FairShare(append(slices.Clip(active), p.Org))
	if f.DominantShare(p.Org) >= fair {
		return nil
	}
	free := f.Free()
	need := Resources{
		CPUs:     max(0, p.Demand.CPUs-max(0, free.CPUs)),
		MemoryMB: max(0, p.Demand.MemoryMB-max(0, free.MemoryMB)),
	}
	if need.IsZero() {
		return nil
	}
	// The most each org may keep: the fair share of each resource.
	keep := Resources{CPUs: floorShare(fair, f.total.CPUs), MemoryMB: floorShare(fair, f.total.MemoryMB)}

	type burst struct {
		org    string
		share  float64
		excess Resources
	}
	var over []burst
	for org, a := range f.alloc {
		if org == p.Org {
			continue
		}
		s := f.Share(a)
		if s <= fair {
			continue
		}
		var ex Resources
		if f.total.CPUs > 0 {
			ex.CPUs = max(0, a.CPUs-keep.CPUs)
		}
		if f.total.MemoryMB > 0 {
			ex.MemoryMB = max(0, a.MemoryMB-keep.MemoryMB)
		}
		over = append(over, burst{org: org, share: s, excess: ex})
	}
	slices.SortFunc(over, func(a, b burst) int {
		return cmp.Or(cmp.Compare(b.share, a.share), cmp.Compare(a.org, b.org))
	})

	var claims []Claim
	for _, b := range over {
		if need.IsZero() {
			break
		}
		take := Resources{CPUs: min(b.excess.CPUs, need.CPUs), MemoryMB: min(b.excess.MemoryMB, need.MemoryMB)}
		if take.IsZero() {
			continue
		}
		claims = append(claims, Claim{Org: b.org, Amount: take})
		need = need.Sub(take)
	}
	if !need.IsZero() {
		return nil
	}
	return claims
}

// floorShare is the whole number of units a share of total comes to,
// rounded down, forgiving the last bits of floating-point error so that
// 1/3 of 9 is 3.
func floorShare(share float64, total int) int {
	return int(math.Floor(share*float64(total) + 1e-9))
}
