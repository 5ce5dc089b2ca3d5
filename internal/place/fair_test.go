package place_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/flamehq/flame/internal/place"
)

func TestFairAccounting(t *testing.T) {
	f := place.NewFair(res(100, 1000))
	f.Allocate("a", res(10, 300))
	f.Allocate("a", res(10, 0))
	f.Allocate("b", res(50, 100))
	f.Allocate("c", res(0, 0))   // nothing: c holds nothing
	f.Allocate("d", res(-5, 10)) // a negative part is ignored
	for _, tc := range []struct {
		org   string
		alloc place.Resources
		share float64
	}{
		{"a", res(20, 300), 0.3}, // memory dominates
		{"b", res(50, 100), 0.5}, // CPUs dominate
		{"c", res(0, 0), 0},
		{"d", res(0, 10), 0.01},
	} {
		if got := f.Allocated(tc.org); got != tc.alloc {
			t.Errorf("Allocated(%s) = %v, want %v", tc.org, got, tc.alloc)
		}
		if got := f.DominantShare(tc.org); got != tc.share {
			t.Errorf("DominantShare(%s) = %v, want %v", tc.org, got, tc.share)
		}
	}
	if got := f.Orgs(); !slices.Equal(got, []string{"a", "b", "d"}) {
		t.Errorf("Orgs = %v", got)
	}
	if f.Used() != res(70, 410) || f.Free() != res(30, 590) || f.Total() != res(100, 1000) {
		t.Errorf("used %v, free %v, total %v", f.Used(), f.Free(), f.Total())
	}

	f.Release("a", res(20, 100))
	f.Release("b", res(80, 500)) // more than it holds: all of it
	f.Release("nobody", res(1, 1))
	if f.Allocated("a") != res(0, 200) || f.Allocated("b") != res(0, 0) || f.Used() != res(0, 210) {
		t.Errorf("after release: a %v, b %v, used %v", f.Allocated("a"), f.Allocated("b"), f.Used())
	}
	if got := f.Orgs(); !slices.Equal(got, []string{"a", "d"}) {
		t.Errorf("Orgs after release = %v", got)
	}

	f.SetTotal(res(0, 100)) // no CPUs at all: only memory counts
	if got := f.DominantShare("a"); got != 2 {
		t.Errorf("share after shrinking = %v", got)
	}
	if got := f.Free(); got != res(0, -110) {
		t.Errorf("free after shrinking = %v", got)
	}
}

func TestFairShare(t *testing.T) {
	f := place.NewFair(res(10, 10))
	if got := f.FairShare(nil); got != 1 {
		t.Errorf("nobody active: %v", got)
	}
	f.Allocate("a", res(1, 1))
	f.Allocate("b", res(1, 1))
	for _, tc := range []struct {
		active []string
		want   float64
	}{
		{nil, 0.5},
		{[]string{"a"}, 0.5},
		{[]string{"c"}, 1.0 / 3},
		{[]string{"c", "c", "d", "a"}, 0.25},
	} {
		if got := f.FairShare(tc.active); got != tc.want {
			t.Errorf("FairShare(%v) = %v, want %v", tc.active, got, tc.want)
		}
	}
}

func TestFairNext(t *testing.T) {
	f := place.NewFair(res(100, 1000))
	f.Allocate("big", res(50, 100))
	f.Allocate("mid", res(10, 200))
	f.Allocate("small", res(10, 100))
	for _, tc := range []struct {
		name    string
		pending []place.Pending
		want    int
	}{
		{"empty", nil, -1},
		{"lowest dominant share", []place.Pending{{Org: "big", Seq: 1}, {Org: "mid", Seq: 2}, {Org: "small", Seq: 3}}, 2},
		{"an org holding nothing first", []place.Pending{{Org: "small", Seq: 1}, {Org: "new", Seq: 9}}, 1},
		{"equal shares: earliest", []place.Pending{{Org: "small", Seq: 5}, {Org: "small", Seq: 4}, {Org: "x", Seq: 7}, {Org: "y", Seq: 6}}, 3},
	} {
		if got := f.Next(tc.pending); got != tc.want {
			t.Errorf("%s: Next = %d, want %d", tc.name, got, tc.want)
		}
	}
}

func TestFairReclaim(t *testing.T) {
	for _, tc := range []struct {
		name   string
		total  place.Resources
		alloc  map[string]place.Resources
		p      place.Pending
		active []string
		want   []place.Claim
	}{
		{
			name:  "one org burst into the idle cluster; a newcomer gets its room back",
			total: res(10, 10000),
			alloc: map[string]place.Resources{"a": res(10, 5000)},
			p:     place.Pending{Org: "b", Demand: res(2, 1000)},
			want:  []place.Claim{{"a", res(2, 0)}},
		},
		{
			name:  "most over share first, each up to its excess",
			total: res(30, 30000),
			alloc: map[string]place.Resources{"a": res(14, 1000), "b": res(16, 1000), "c": res(0, 1000)},
			// fair share 1/3: a keeps 10, b keeps 10
			p:    place.Pending{Org: "c", Demand: res(8, 1000)},
			want: []place.Claim{{"b", res(6, 0)}, {"a", res(2, 0)}},
		},
		{
			name:  "memory-heavy burst gives back memory",
			total: res(100, 1000),
			alloc: map[string]place.Resources{"a": res(10, 900), "b": res(10, 50)},
			p:     place.Pending{Org: "b", Demand: res(5, 200)},
			want:  []place.Claim{{"a", res(0, 150)}},
		},
		{
			name:  "the request fits: nothing to reclaim",
			total: res(10, 10000),
			alloc: map[string]place.Resources{"a": res(8, 1000)},
			p:     place.Pending{Org: "b", Demand: res(2, 1000)},
			want:  nil,
		},
		{
			name:   "orgs with pending requests count toward the fair share",
			total:  res(10, 10000),
			alloc:  map[string]place.Resources{"a": res(5, 1000), "b": res(5, 1000)},
			p:      place.Pending{Org: "c", Demand: res(2, 1000)},
			active: []string{"d"},
			// fair share 1/4; a and b hold 1/2 each and are over it
			want: []place.Claim{{"a", res(2, 0)}},
		},
		{
			name:  "the pending org is exactly at its share: it waits",
			total: res(10, 10000),
			alloc: map[string]place.Resources{"a": res(5, 1000), "b": res(5, 1000)},
			p:     place.Pending{Org: "b", Demand: res(1, 1000)},
			want:  nil,
		},
		{
			name:  "the pending org holds its share on its dominant resource: it waits",
			total: res(10, 10000),
			alloc: map[string]place.Resources{"a": res(6, 1000), "b": res(4, 5000)},
			p:     place.Pending{Org: "b", Demand: res(2, 1000)},
			want:  nil,
		},
		{
			name:  "all the burst would not make room: nobody is asked",
			total: res(10, 10000),
			alloc: map[string]place.Resources{"a": res(6, 1000), "b": res(4, 1000)},
			p:     place.Pending{Org: "b", Demand: res(4, 1000)},
			want:  nil,
		},
		{
			name:  "free room counts before anyone gives back",
			total: res(12, 10000),
			alloc: map[string]place.Resources{"a": res(9, 1000)},
			p:     place.Pending{Org: "b", Demand: res(5, 1000)},
			want:  []place.Claim{{"a", res(2, 0)}},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := place.NewFair(tc.total)
			for _, org := range slices.Sorted(maps.Keys(tc.alloc)) {
				f.Allocate(org, tc.alloc[org])
			}
			got := f.Reclaim(tc.p, tc.active)
			if !slices.Equal(got, tc.want) {
				t.Errorf("Reclaim = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestFairProperties runs many random contended clusters. Each org has a
// queue of tasks; pending requests are served in Next's order until the one
// chosen does not fit. Then the orgs still waiting must be within one task
// of each other in dominant share, and Reclaim, asked for each waiting
// request, must name only orgs above their fair share, never more than they
// hold above it, and enough to make room.
func TestFairProperties(t *testing.T) {
	for seed := range uint64(1000) {
		if msg := fairCase(seed); msg != "" {
			t.Fatalf("seed %d: %s", seed, msg)
		}
	}
}

func fairCase(seed uint64) string {
	rng := rand.New(rand.NewPCG(seed, 99))
	total := res(8+rng.IntN(200), 8192+rng.IntN(200)*1024)
	f := place.NewFair(total)

	// Each org's tasks: a shape of its own, with some variation.
	queues := map[string][]place.Resources{}
	var orgs []string
	maxTask := 0.0
	for i := range 2 + rng.IntN(9) {
		org := fmt.Sprintf("org%d", i)
		orgs = append(orgs, org)
		cpu, mem := 1+rng.IntN(8), 256*(1+rng.IntN(32))
		for range 1 + rng.IntN(60) {
			task := res(max(1, cpu+rng.IntN(3)-1), mem)
			queues[org] = append(queues[org], task)
			maxTask = max(maxTask, f.Share(task))
		}
	}
	// Some orgs burst first, while the cluster is idle.
	var seq uint64
	var pending []place.Pending
	for _, org := range orgs {
		seq++
		pending = append(pending, place.Pending{Org: org, Demand: queues[org][0], Seq: seq})
		queues[org] = queues[org][1:]
	}
	for {
		i := f.Next(pending)
		if i < 0 {
			break
		}
		p := pending[i]
		if !p.Demand.Fits(f.Free()) {
			break
		}
		f.Allocate(p.Org, p.Demand)
		if q := queues[p.Org]; len(q) > 0 {
			seq++
			pending[i] = place.Pending{Org: p.Org, Demand: q[0], Seq: seq}
			queues[p.Org] = q[1:]
		} else {
			pending = slices.Delete(pending, i, i+1)
		}
	}

	var waiting []string
	lo, hi := 2.0, -1.0
	for _, p := range pending {
		waiting = append(waiting, p.Org)
		s := f.DominantShare(p.Org)
		lo, hi = min(lo, s), max(hi, s)
	}
	if len(pending) > 1 && hi-lo > maxTask+1e-12 {
		return fmt.Sprintf("waiting orgs' shares span %v..%v, more than the largest task's %v", lo, hi, maxTask)
	}

	// Now some orgs leave, some take more (bursting into the room left),
	// and each waiting request asks what to reclaim.
	for _, org := range orgs {
		switch rng.IntN(4) {
		case 0:
			f.Release(org, f.Allocated(org))
		case 1:
			f.Allocate(org, res(rng.IntN(max(1, f.Free().CPUs+1)), 0))
		}
	}
	for _, p := range pending {
		if msg := checkReclaim(f, p, waiting); msg != "" {
			return msg
		}
	}
	return ""
}

func checkReclaim(f *place.Fair, p place.Pending, active []string) string {
	claims := f.Reclaim(p, active)
	fair := f.FairShare(append(slices.Clone(active), p.Org))
	room := f.Free()
	prev := 2.0
	for _, c := range claims {
		s := f.DominantShare(c.Org)
		switch {
		case s <= fair:
			return fmt.Sprintf("Reclaim(%v) names %s at share %v, fair share %v", p, c.Org, s, fair)
		case c.Org == p.Org:
			return fmt.Sprintf("Reclaim(%v) names the pending org", p)
		case s > prev:
			return fmt.Sprintf("Reclaim(%v) not most-over first: %v", p, claims)
		case c.Amount.IsZero() || c.Amount.CPUs < 0 || c.Amount.MemoryMB < 0:
			return fmt.Sprintf("Reclaim(%v) claims %v", p, c)
		}
		left := f.Allocated(c.Org).Sub(c.Amount)
		if f.Share(left) < fair-f.Share(res(1, 1)) {
			return fmt.Sprintf("Reclaim(%v) takes %s from %v down to %v, below fair share %v", p, c.Org, f.Allocated(c.Org), left, fair)
		}
		prev = s
		room = room.Add(c.Amount)
	}
	if claims != nil && !p.Demand.Fits(room) {
		return fmt.Sprintf("Reclaim(%v) = %v leaves room %v only", p, claims, room)
	}
	return ""
}
