package place_test

import (
	"cmp"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/place"
)

// geoRTT is the geo model's round trip; an unknown region is 300 ms from
// everywhere.
func geoRTT(from, to string) time.Duration {
	a, ok1 := geo.Lookup(from)
	b, ok2 := geo.Lookup(to)
	if !ok1 || !ok2 {
		return 300 * time.Millisecond
	}
	return geo.RTT(a, b)
}

func res(cpus, mem int) place.Resources { return place.Resources{CPUs: cpus, MemoryMB: mem} }

// host is a host with 8 CPUs and 16 GB, the given free CPUs (memory free in
// the same proportion) and health.
func host(id, region string, freeCPUs int, health float64) place.Host {
	return place.Host{
		ID: id, Region: region,
		Capacity: res(8, 16384),
		Free:     res(freeCPUs, freeCPUs*2048),
		Health:   health,
	}
}

func ids(cs []place.Candidate) []string {
	out := make([]string, len(cs))
	for i, c := range cs {
		out[i] = c.Host.ID
	}
	return out
}

func TestResources(t *testing.T) {
	a, b := res(2, 1024), res(1, 2048)
	if got := a.Add(b); got != res(3, 3072) {
		t.Errorf("Add = %v", got)
	}
	if got := a.Sub(b); got != res(1, -1024) {
		t.Errorf("Sub = %v", got)
	}
	for _, tc := range []struct {
		r, in place.Resources
		want  bool
	}{
		{res(1, 512), res(1, 512), true},
		{res(1, 512), res(2, 4096), true},
		{res(2, 512), res(1, 4096), false},
		{res(1, 8192), res(4, 4096), false},
		{res(0, 0), res(0, 0), true},
		{res(0, 0), res(-1, 0), false},
	} {
		if got := tc.r.Fits(tc.in); got != tc.want {
			t.Errorf("%v.Fits(%v) = %v, want %v", tc.r, tc.in, got, tc.want)
		}
	}
	if !res(0, 0).IsZero() || res(0, 1).IsZero() {
		t.Error("IsZero wrong")
	}
}

func TestFreeFraction(t *testing.T) {
	for _, tc := range []struct {
		name      string
		cap, free place.Resources
		want      float64
	}{
		{"empty host", res(8, 16384), res(8, 16384), 1},
		{"full host", res(8, 16384), res(0, 0), 0},
		{"cpu dominant", res(8, 16384), res(2, 8192), 0.25},
		{"memory dominant", res(8, 16384), res(6, 4096), 0.25},
		{"no cpu capacity: memory alone", res(0, 1000), res(0, 500), 0.5},
		{"no capacity at all", res(0, 0), res(0, 0), 0},
		{"overcommitted", res(4, 4096), res(-1, 1024), 0},
	} {
		h := place.Host{Capacity: tc.cap, Free: tc.free}
		if got := h.FreeFraction(); got != tc.want {
			t.Errorf("%s: FreeFraction = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestScore(t *testing.T) {
	w := place.Weights{Alpha: 100, Beta: 10, Gamma: 5, Spread: 2}
	h := host("h", "syd", 4, 0.8) // C = 0.5
	for _, tc := range []struct {
		name     string
		rtt      time.Duration
		machines int
		want     float64
	}{
		{"same region, floored at 1 ms", 500 * time.Microsecond, 0, 100 + 5 + 4},
		{"zero round trip", 0, 0, 100 + 5 + 4},
		{"10 ms", 10 * time.Millisecond, 0, 10 + 5 + 4},
		{"no latency preference", place.NoLatency, 0, 5 + 4},
		{"two machines of the app there", 10 * time.Millisecond, 2, 10 + 5 + 4 - 4},
	} {
		if got := place.Score(h, tc.rtt, tc.machines, w); math.Abs(got-tc.want) > 1e-9 {
			t.Errorf("%s: Score = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestDefaultWeightsLatencyDominates checks DefaultWeights' claim over every
// pair of real regions: seen from any region, a host in a region nearer by
// more than 2·L²/α beats one farther away however empty and healthy the far
// one is and however loaded and sick the near one.
func TestDefaultWeightsLatencyDominates(t *testing.T) {
	w := place.DefaultWeights()
	worst := place.Host{Capacity: res(8, 16384), Free: res(0, 0), Health: 0.001}
	best := place.Host{Capacity: res(8, 16384), Free: res(8, 16384), Health: 1}
	all := geo.All()
	checked := 0
	for _, from := range all {
		for _, a := range all {
			for _, b := range all {
				la, lb := geo.RTT(from, a), geo.RTT(from, b)
				lbms := float64(lb) / float64(time.Millisecond)
				if lbms < 1 || float64(lb-la)/float64(time.Millisecond) <= 2*lbms*lbms/w.Alpha {
					continue
				}
				checked++
				if near, far := place.Score(worst, la, 0, w), place.Score(best, lb, 0, w); near <= far {
					t.Fatalf("from %s: %s (%v, loaded) scores %v, %s (%v, empty) %v", from, a, la, near, b, lb, far)
				}
			}
		}
	}
	if checked < 10000 {
		t.Fatalf("only %d pairs checked", checked)
	}
	// Within a region, spread outweighs capacity and health together.
	if w.Spread <= w.Beta+w.Gamma {
		t.Errorf("spread %v does not outweigh capacity and health (%v)", w.Spread, w.Beta+w.Gamma)
	}
}

// cluster is a random cluster for property tests: a few real regions,
// scores that often tie (free capacity in whole CPUs, health from a short
// list), some dead and draining hosts.
func cluster(rng *rand.Rand, nHosts int) []place.Host {
	codes := []string{"syd", "sin", "nrt", "ams", "fra", "iad", "ord", "gru"}
	codes = codes[:2+rng.IntN(len(codes)-1)]
	healths := []float64{1, 1, 1, 0.5, 0, -1}
	hosts := make([]place.Host, nHosts)
	for i := range hosts {
		hosts[i] = host(fmt.Sprintf("h%03d", i), codes[rng.IntN(len(codes))], rng.IntN(9), healths[rng.IntN(len(healths))])
	}
	return hosts
}

// request is a random request against hosts.
func request(rng *rand.Rand, hosts []place.Host) place.Request {
	lists := [][]string{nil, {"syd"}, {"syd", "any"}, {"ams", "fra"}, {"any"}, {"xyz", "any"},
		{"iad", "xyz", "iad", "ord"}, {"any", "syd"}, {"nrt", "sin", "any"}}
	req := place.Request{
		Org: "o", App: "a",
		Regions:  lists[rng.IntN(len(lists))],
		Guest:    res(rng.IntN(4), rng.IntN(4)*2048),
		AppHosts: map[string]int{},
		Exclude:  map[string]bool{},
	}
	for range rng.IntN(6) {
		req.AppHosts[hosts[rng.IntN(len(hosts))].ID] += 1
	}
	for range rng.IntN(4) {
		req.Exclude[hosts[rng.IntN(len(hosts))].ID] = rng.IntN(4) != 0
	}
	req.AppHosts["no-such-host"] = 3
	return req
}

// tierOf is the position in regions of the entry a host of region r falls
// under, or -1: a test-side restatement of the preference rule.
func tierOf(regions []string, r string) int {
	if len(regions) == 0 {
		return 0
	}
	for i, e := range regions {
		if e == place.Any || e == r {
			return i
		}
	}
	return -1
}

// ranked is a candidate as the reference ranks it.
type ranked struct {
	tier  int
	score float64
}

// reference ranks by brute force: every host scored, everything sorted.
func reference(hosts []place.Host, req place.Request, w place.Weights, rtt place.RTT, n int) []ranked {
	ref := ""
	for _, e := range req.Regions {
		if e != place.Any {
			ref = e
			break
		}
	}
	seen := map[string]bool{}
	var all []ranked
	for i := len(hosts) - 1; i >= 0; i-- { // the last entry of an ID counts
		h := hosts[i]
		if seen[h.ID] {
			continue
		}
		seen[h.ID] = true
		tier := tierOf(req.Regions, h.Region)
		if tier < 0 || h.Health <= 0 || req.Exclude[h.ID] || !req.Guest.Fits(h.Free) {
			continue
		}
		var l time.Duration
		switch {
		case len(req.Regions) == 0 || req.Regions[tier] == place.Any && ref == "":
			l = place.NoLatency
		case rtt == nil:
			l = time.Millisecond
		case req.Regions[tier] == place.Any:
			l = rtt(ref, h.Region)
		default:
			l = rtt(req.Regions[tier], h.Region)
		}
		all = append(all, ranked{tier, place.Score(h, l, req.AppHosts[h.ID], w)})
	}
	slices.SortFunc(all, func(a, b ranked) int { return cmp.Or(cmp.Compare(a.tier, b.tier), cmp.Compare(b.score, a.score)) })
	return all[:min(n, len(all))]
}
