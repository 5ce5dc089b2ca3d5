package place

import (
	"cmp"
	"slices"
)

// Index is an immutable view of the hosts of one cluster snapshot, built for
// ranking: hosts grouped by region, each region's hosts ordered by ID, the
// parts of every host's score that do not depend on the request computed
// once, and the round trips between the index's regions measured once.
//
// An Index is never modified after it is built, so any number of decisions
// may read it at once; With returns a new Index that shares everything it
// did not change.
type Index struct {
	rtt     RTT
	regions []region       // ordered by name
	byName  map[string]int // region name → position in regions
	byID    map[string]loc // host ID → where it is
	lat     []float64      // lat[a*len(regions)+b]: L in ms between regions a and b
	size    int
}

// region is one region's hosts. Slot numbers (base+pos) are unique across
// the index and ordered like regions, so a request's per-host adjustments,
// sorted by slot, can be walked alongside a scan.
//
// Only ids holds pointers, and it never changes once built: With copies
// ents and nums, plain numbers, so an update costs a memmove and gives the
// garbage collector nothing to scan.
type region struct {
	name string
	base int32
	ids  []string   // ordered; shared by every index With derives
	ents []entry    // ents[i] describes host ids[i]
	nums []hostNums // the rest of host ids[i]
	// fitCPU and fitMem are the largest free CPUs and memory among the
	// region's live hosts: a guest bigger than either fits nowhere here.
	fitCPU, fitMem int
	// maxFree and maxHealth are the largest free fraction and health among
	// its live hosts: no host of the region scores above
	// α/L + β·maxFree + γ·maxHealth.
	maxFree, maxHealth float64
}

// entry is what a scan reads of a host: 32 bytes, so a scan walks memory in
// order and touches no strings.
type entry struct {
	cpu, mem int     // free
	free     float64 // Host.FreeFraction
	health   float64 // ≤ 0: never a candidate
}

// hostNums is what a scan does not read of a host.
type hostNums struct {
	capacity Resources
	health   float64 // as given
}

type loc struct{ r, pos int32 }

func (r *region) set(pos int, h Host) {
	r.ents[pos] = entry{cpu: h.Free.CPUs, mem: h.Free.MemoryMB, free: h.FreeFraction(), health: health(h.Health)}
	r.nums[pos] = hostNums{capacity: h.Capacity, health: h.Health}
}

// host returns the host at pos.
func (r *region) host(pos int) Host {
	e, n := &r.ents[pos], &r.nums[pos]
	return Host{
		ID:       r.ids[pos],
		Region:   r.name,
		Capacity: n.capacity,
		Free:     Resources{CPUs: e.cpu, MemoryMB: e.mem},
		Health:   n.health,
	}
}

// NewIndex builds an index of the given hosts; rtt gives the round trips
// between their regions (nil: every region is 1 ms from every other, so
// latency decides nothing). A host ID given twice keeps its last entry. The
// hosts slice is not retained.
func NewIndex(hosts []Host, rtt RTT) *Index {
	last := make(map[string]int, len(hosts))
	for i, h := range hosts {
		last[h.ID] = i
	}
	uniq := make([]Host, 0, len(last))
	for i, h := range hosts {
		if last[h.ID] == i {
			uniq = append(uniq, h)
		}
	}
	slices.SortFunc(uniq, func(a, b Host) int {
		return cmp.Or(cmp.Compare(a.Region, b.Region), cmp.Compare(a.ID, b.ID))
	})

	ix := &Index{
		rtt:    rtt,
		byName: map[string]int{},
		byID:   make(map[string]loc, len(uniq)),
		size:   len(uniq),
	}
	for start := 0; start < len(uniq); {
		end := start + 1
		for end < len(uniq) && uniq[end].Region == uniq[start].Region {
			end++
		}
		r := region{
			name: uniq[start].Region,
			base: int32(start),
			ids:  make([]string, end-start),
			ents: make([]entry, end-start),
			nums: make([]hostNums, end-start),
		}
		for i, h := range uniq[start:end] {
			r.ids[i] = h.ID
			r.set(i, h)
			ix.byID[h.ID] = loc{r: int32(len(ix.regions)), pos: int32(i)}
		}
		r.measure()
		ix.byName[r.name] = len(ix.regions)
		ix.regions = append(ix.regions, r)
		start = end
	}

	n := len(ix.regions)
	ix.lat = make([]float64, n*n)
	for a := range ix.regions {
		for b := range ix.regions {
			ix.lat[a*n+b] = ix.latency(ix.regions[a].name, ix.regions[b].name)
		}
	}
	return ix
}

// latency is L in ms between two regions by the index's RTT.
func (ix *Index) latency(from, to string) float64 {
	if ix.rtt == nil {
		return 1
	}
	return latencyMs(ix.rtt(from, to))
}

// measure sets the region's largest free resources, free fraction and
// health among live hosts.
func (r *region) measure() {
	r.fitCPU, r.fitMem = -1, -1
	r.maxFree, r.maxHealth = 0, 0
	for _, e := range r.ents {
		if e.health > 0 {
			r.fitCPU, r.fitMem = max(r.fitCPU, e.cpu), max(r.fitMem, e.mem)
			r.maxFree, r.maxHealth = max(r.maxFree, e.free), max(r.maxHealth, e.health)
		}
	}
}

// fits reports whether some live host of the region could have room for g.
func (r *region) fits(g Resources) bool { return g.CPUs <= r.fitCPU && g.MemoryMB <= r.fitMem }

// With returns an index in which the given hosts replace those with the same
// IDs: a host's new Free after a placement, its new Health. Only the regions
// of the changed hosts are copied, so an update costs a few hundred hosts,
// not the whole cluster. A host that is new, or that moved to another
// region, makes a whole new index. The receiver is not modified.
func (ix *Index) With(changed ...Host) *Index {
	for _, h := range changed {
		l, ok := ix.byID[h.ID]
		if !ok || ix.regions[l.r].name != h.Region {
			return NewIndex(append(ix.Hosts(), changed...), ix.rtt)
		}
	}
	nx := *ix
	nx.regions = slices.Clone(ix.regions)
	copied := map[int32]bool{}
	for _, h := range changed {
		l := ix.byID[h.ID]
		r := &nx.regions[l.r]
		if !copied[l.r] {
			r.ents = slices.Clone(r.ents)
			r.nums = slices.Clone(r.nums)
			copied[l.r] = true
		}
		r.set(int(l.pos), h)
	}
	for ri := range copied {
		nx.regions[ri].measure()
	}
	return &nx
}

// Len returns the number of hosts in the index.
func (ix *Index) Len() int { return ix.size }

// Host returns the host with the given ID as the index knows it.
func (ix *Index) Host(id string) (Host, bool) {
	l, ok := ix.byID[id]
	if !ok {
		return Host{}, false
	}
	return ix.regions[l.r].host(int(l.pos)), true
}

// Hosts returns every host, ordered by region and then ID. The slice is the
// caller's.
func (ix *Index) Hosts() []Host {
	out := make([]Host, 0, ix.size)
	for i := range ix.regions {
		r := &ix.regions[i]
		for pos := range r.ids {
			out = append(out, r.host(pos))
		}
	}
	return out
}

// Regions returns the names of the regions that have hosts, in order.
func (ix *Index) Regions() []string {
	out := make([]string, len(ix.regions))
	for i, r := range ix.regions {
		out[i] = r.name
	}
	return out
}
