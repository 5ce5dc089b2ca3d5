package place

import (
	"cmp"
	"math/bits"
	"slices"
)

// Rank returns up to n candidates for req, best first, or nil when no host
// fits (the caller's "no capacity").
//
// Hosts of an earlier entry of req.Regions come strictly before those of a
// later one; within an entry, higher scores come first and equal scores are
// ordered by rng (nil: by region and host ID). Hosts that are dead or
// draining (Health ≤ 0), excluded, or without room for req.Guest are never
// returned.
//
// A decision reads only the regions the request may use and stops at the
// first entries that yield n candidates: ["syd", "any"] never looks outside
// syd when syd has room. Within "any" it visits regions best first by the
// most a host there could score, and stops at a region whose best possible
// host could not enter the top n: from syd, Europe is never scanned while
// Asia has room. That bound assumes weights and AppHosts counts that are not
// negative; with any negative, every region of the entry is scanned.
func (ix *Index) Rank(req Request, w Weights, rng Rand, n int) []Candidate {
	return ix.rank(req, w, rng, n, 0)
}

// RankSampled is Rank by the power of k choices: within each region it
// scores `sample` hosts chosen at random rather than all of them, and ranks
// those, still visiting regions best first. An entry of req.Regions whose
// sample yields fewer candidates than are still wanted is scanned whole, so
// RankSampled finds no capacity only where Rank finds none. With sample ≤ 0,
// or a nil rng, it is Rank.
func (ix *Index) RankSampled(req Request, w Weights, rng Rand, n, sample int) []Candidate {
	if rng == nil || sample <= 0 {
		sample = 0
	}
	return ix.rank(req, w, rng, n, sample)
}

func (ix *Index) rank(req Request, w Weights, rng Rand, n, sample int) []Candidate {
	if n <= 0 || ix.size == 0 {
		return nil
	}
	s := scan{
		ix:    ix,
		w:     w,
		guest: req.Guest,
		adj:   ix.adjustments(req),
		top:   topN{rng: rng, items: make([]cand, 0, min(n, ix.size))},
		prune: w.Alpha >= 0 && w.Beta >= 0 && w.Gamma >= 0 && w.Spread >= 0,
	}
	for _, a := range s.adj {
		if a.machines < 0 {
			s.prune = false
		}
	}
	entries := req.Regions
	if len(entries) == 0 {
		entries = []string{Any}
	}
	// ref is the region "any" measures latency from: the first named one.
	ref, hasRef := "", false
	for _, e := range entries {
		if e != Any {
			ref, hasRef = e, true
			break
		}
	}

	var out []Candidate
	claimed := make([]bool, len(ix.regions))
	var buf [64]visit
	for _, e := range entries {
		if len(out) >= n {
			break
		}
		tier := buf[:0]
		if e == Any {
			s.setRef(ref, hasRef)
			for r := range ix.regions {
				if !claimed[r] {
					claimed[r] = true
					tier = s.appendVisit(tier, int32(r))
				}
			}
		} else if r, ok := ix.byName[e]; ok && !claimed[r] {
			claimed[r] = true
			s.setRef(e, true)
			tier = s.appendVisit(tier, int32(r))
		}
		if len(tier) == 0 {
			continue
		}
		slices.SortFunc(tier, func(a, b visit) int { return cmp.Or(cmp.Compare(b.bound, a.bound), cmp.Compare(a.r, b.r)) })
		s.top.reset(n - len(out))
		if sample == 0 || !s.tier(tier, sample) {
			// Scan the whole tier (again, if a sample fell short).
			s.top.reset(n - len(out))
			s.tier(tier, 0)
		}
		out = s.top.appendTo(out, ix)
	}
	return out
}

// visit is a region to scan, with its latency term and the most a host
// there could score.
type visit struct {
	r     int32
	lat   float64
	bound float64
}

// appendVisit appends region r to a tier if the guest fits there at all.
func (s *scan) appendVisit(tier []visit, r int32) []visit {
	reg := &s.ix.regions[r]
	if !reg.fits(s.guest) {
		return tier
	}
	lat := s.latTerm(r)
	return append(tier, visit{r: r, lat: lat, bound: score(lat, reg.maxFree, reg.maxHealth, 0, s.w)})
}

// tier offers the candidates of a tier's regions, best bound first, to the
// top-n: every host of each region (sample 0), or `sample` hosts of each
// region larger than that. It stops at a region that cannot beat the worst
// of a full top-n. With a sample, it reports whether the top-n filled.
func (s *scan) tier(tier []visit, sample int) bool {
	for _, v := range tier {
		if s.prune && len(s.top.items) == s.top.n && v.bound < s.top.items[0].score {
			break
		}
		if sample == 0 || len(s.ix.regions[v.r].ents) <= sample {
			s.region(v.r, v.lat)
		} else {
			s.sampleRegion(v.r, v.lat, sample)
		}
	}
	return len(s.top.items) == s.top.n
}

// adj is a request's adjustment to one host: excluded, or running some of
// the app's machines.
type adj struct {
	slot     int32
	excluded bool
	machines int
}

// adjustments resolves the request's host IDs to slots, sorted, so that a
// scan compares one integer per host instead of looking up maps.
func (ix *Index) adjustments(req Request) []adj {
	if len(req.Exclude) == 0 && len(req.AppHosts) == 0 {
		return nil
	}
	out := make([]adj, 0, len(req.Exclude)+len(req.AppHosts))
	for id, ex := range req.Exclude {
		if l, ok := ix.byID[id]; ok && ex {
			out = append(out, adj{slot: ix.regions[l.r].base + l.pos, excluded: true})
		}
	}
	for id, k := range req.AppHosts {
		if l, ok := ix.byID[id]; ok && k != 0 {
			out = append(out, adj{slot: ix.regions[l.r].base + l.pos, machines: k})
		}
	}
	slices.SortFunc(out, func(a, b adj) int { return cmp.Compare(a.slot, b.slot) })
	// Merge the entries of a host named in both maps.
	merged := out[:0]
	for _, a := range out {
		if m := len(merged); m > 0 && merged[m-1].slot == a.slot {
			merged[m-1].excluded = merged[m-1].excluded || a.excluded
			merged[m-1].machines += a.machines
			continue
		}
		merged = append(merged, a)
	}
	return merged
}

func bySlot(a adj, slot int32) int { return cmp.Compare(a.slot, slot) }

// scan holds one decision's state.
type scan struct {
	ix    *Index
	w     Weights
	guest Resources
	adj   []adj
	top   topN

	ref    string
	refIdx int // ref's position in the index, or -1
	hasRef bool
	// prune allows skipping regions whose best possible score cannot enter
	// the top-n: the bound holds only when no term can add to a score.
	prune bool
}

func (s *scan) setRef(ref string, hasRef bool) {
	s.ref, s.hasRef = ref, hasRef
	s.refIdx = -1
	if r, ok := s.ix.byName[ref]; ok {
		s.refIdx = r
	}
}

// latTerm is α/L for hosts of region r, or 0 without a reference region.
func (s *scan) latTerm(r int32) float64 {
	if !s.hasRef {
		return 0
	}
	if s.refIdx >= 0 {
		return s.w.Alpha / s.ix.lat[s.refIdx*len(s.ix.regions)+int(r)]
	}
	return s.w.Alpha / s.ix.latency(s.ref, s.ix.regions[r].name)
}

// region offers every candidate of region r to the top-n; lat is the
// region's latency term.
func (s *scan) region(r int32, lat float64) {
	reg := &s.ix.regions[r]
	g := s.guest
	adjs := s.adj
	k, _ := slices.BinarySearchFunc(adjs, reg.base, bySlot)
	for pos := range reg.ents {
		e := &reg.ents[pos]
		if e.health <= 0 || e.cpu < g.CPUs || e.mem < g.MemoryMB {
			continue
		}
		machines := 0
		if k < len(adjs) {
			slot := reg.base + int32(pos)
			for k < len(adjs) && adjs[k].slot < slot {
				k++
			}
			if k < len(adjs) && adjs[k].slot == slot {
				if adjs[k].excluded {
					continue
				}
				machines = adjs[k].machines
			}
		}
		s.top.offer(score(lat, e.free, e.health, machines, s.w), r, int32(pos), reg.base)
	}
}

// sampleRegion offers `sample` distinct hosts of region r, chosen at
// random, to the top-n; the region has more hosts than that. It walks the
// region from a random start with a random stride coprime to its size, so
// the hosts are distinct and no two decisions need visit them in the same
// order.
func (s *scan) sampleRegion(r int32, lat float64, sample int) {
	reg := &s.ix.regions[r]
	m := len(reg.ents)
	p := randN(s.top.rng, m)
	stride := 1 + randN(s.top.rng, m-1)
	for gcd(stride, m) != 1 {
		stride = 1 + randN(s.top.rng, m-1)
	}
	for range sample {
		s.offerOne(reg, r, p, lat)
		p += stride
		if p >= m {
			p -= m
		}
	}
}

// offerOne offers the host at pos in region r, if it is a candidate.
func (s *scan) offerOne(reg *region, r int32, pos int, lat float64) {
	e := &reg.ents[pos]
	if e.health <= 0 || e.cpu < s.guest.CPUs || e.mem < s.guest.MemoryMB {
		return
	}
	slot := reg.base + int32(pos)
	machines := 0
	if k, ok := slices.BinarySearchFunc(s.adj, slot, bySlot); ok {
		if s.adj[k].excluded {
			return
		}
		machines = s.adj[k].machines
	}
	s.top.offer(score(lat, e.free, e.health, machines, s.w), r, int32(pos), reg.base)
}

// randN returns a number in [0, n) from rng (n > 0), by Lemire's
// multiply-shift; the bias is below 2⁻³² for any cluster size.
func randN(rng Rand, n int) int {
	hi, _ := bits.Mul64(rng.Uint64(), uint64(n))
	return int(hi)
}

func gcd(a, b int) int {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// cand is a host held by the top-n.
type cand struct {
	score  float64
	key    uint64 // breaks equal scores: higher is better
	r, pos int32
}

// worse orders candidates: a ranks below b.
func worse(a, b *cand) bool {
	return a.score < b.score || a.score == b.score && a.key < b.key
}

// topN keeps the n best candidates offered, in a min-heap whose root is the
// worst kept. A candidate draws its random tie-breaking key only when it
// enters the heap or ties with the root, so a scan of thousands of hosts
// calls the random source a handful of times; the outcome is still that of
// giving every host a random key: a host turned away without one scored
// strictly lower than n others.
type topN struct {
	rng   Rand
	n     int
	items []cand
}

func (t *topN) reset(n int) {
	t.n = n
	t.items = t.items[:0]
}

func (t *topN) key(base, pos int32) uint64 {
	if t.rng == nil {
		return ^uint64(base + pos) // earlier slots win
	}
	return t.rng.Uint64()
}

func (t *topN) offer(score float64, r, pos, base int32) {
	if len(t.items) < t.n {
		t.items = append(t.items, cand{score: score, key: t.key(base, pos), r: r, pos: pos})
		t.up(len(t.items) - 1)
		return
	}
	root := &t.items[0]
	if score < root.score {
		return
	}
	c := cand{score: score, key: t.key(base, pos), r: r, pos: pos}
	if worse(&c, root) {
		return
	}
	*root = c
	t.down(0)
}

func (t *topN) up(i int) {
	h := t.items
	for i > 0 {
		p := (i - 1) / 2
		if !worse(&h[i], &h[p]) {
			break
		}
		h[i], h[p] = h[p], h[i]
		i = p
	}
}

func (t *topN) down(i int) {
	h := t.items
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		m := l
		if r := l + 1; r < len(h) && worse(&h[r], &h[l]) {
			m = r
		}
		if !worse(&h[m], &h[i]) {
			return
		}
		h[i], h[m] = h[m], h[i]
		i = m
	}
}

// appendTo appends the kept candidates to out, best first.
func (t *topN) appendTo(out []Candidate, ix *Index) []Candidate {
	slices.SortFunc(t.items, func(a, b cand) int {
		if worse(&b, &a) {
			return -1
		}
		if worse(&a, &b) {
			return 1
		}
		return 0
	})
	for _, c := range t.items {
		out = append(out, Candidate{Host: ix.regions[c.r].host(int(c.pos)), Score: c.score})
	}
	return out
}
