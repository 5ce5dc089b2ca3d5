package place_test

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/flamehq/flame/internal/place"
)

func TestRankOrder(t *testing.T) {
	w := place.DefaultWeights()
	for _, tc := range []struct {
		name  string
		hosts []place.Host
		req   place.Request
		n     int
		want  []string
	}{
		{
			name: "latency dominates across regions: a loaded, sick host near beats an empty one far",
			hosts: []place.Host{
				host("ams-1", "ams", 8, 1),
				host("sin-1", "sin", 1, 0.3),
			},
			req:  place.Request{Regions: []string{"syd", "any"}, Guest: res(1, 1024)},
			n:    2,
			want: []string{"sin-1", "ams-1"},
		},
		{
			name: "latency from ams: fra before iad before syd",
			hosts: []place.Host{
				host("syd-1", "syd", 8, 1),
				host("iad-1", "iad", 8, 1),
				host("fra-1", "fra", 1, 0.2),
			},
			req:  place.Request{Regions: []string{"ams", "any"}, Guest: res(1, 1024)},
			n:    3,
			want: []string{"fra-1", "iad-1", "syd-1"},
		},
		{
			name: "within a region the emptier, healthier host wins",
			hosts: []place.Host{
				host("syd-1", "syd", 2, 1),
				host("syd-2", "syd", 6, 1),
				host("syd-3", "syd", 6, 0.5),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 1024)},
			n:    3,
			want: []string{"syd-2", "syd-3", "syd-1"},
		},
		{
			name: "spread: the app's second machine goes to another host though it has less room",
			hosts: []place.Host{
				host("syd-1", "syd", 8, 1),
				host("syd-2", "syd", 1, 0.6),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 1024), AppHosts: map[string]int{"syd-1": 1}},
			n:    2,
			want: []string{"syd-2", "syd-1"},
		},
		{
			name: "spread: the host with fewer of the app's machines first",
			hosts: []place.Host{
				host("syd-1", "syd", 8, 1),
				host("syd-2", "syd", 7, 1),
				host("syd-3", "syd", 1, 1),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 1024), AppHosts: map[string]int{"syd-1": 2, "syd-2": 1, "syd-3": 1}},
			n:    3,
			want: []string{"syd-2", "syd-3", "syd-1"},
		},
		{
			name: "spread: stacks when no other host has room",
			hosts: []place.Host{
				host("syd-1", "syd", 8, 1),
				host("syd-2", "syd", 0, 1),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 1024), AppHosts: map[string]int{"syd-1": 1}},
			n:    2,
			want: []string{"syd-1"},
		},
		{
			name: "syd then any: every syd host first, then the rest by latency from syd",
			hosts: []place.Host{
				host("ams-1", "ams", 8, 1),
				host("nrt-1", "nrt", 8, 1),
				host("syd-1", "syd", 1, 0.1),
				host("sin-1", "sin", 8, 1),
				host("syd-2", "syd", 2, 0.1),
			},
			req:  place.Request{Regions: []string{"syd", "any"}, Guest: res(1, 1024)},
			n:    10,
			want: []string{"syd-2", "syd-1", "sin-1", "nrt-1", "ams-1"},
		},
		{
			name: "syd then any, n within syd: nothing else",
			hosts: []place.Host{
				host("sin-1", "sin", 8, 1),
				host("syd-1", "syd", 1, 1),
			},
			req:  place.Request{Regions: []string{"syd", "any"}, Guest: res(1, 1024)},
			n:    1,
			want: []string{"syd-1"},
		},
		{
			name: "syd full: any falls back to the nearest",
			hosts: []place.Host{
				host("ams-1", "ams", 8, 1),
				host("sin-1", "sin", 8, 1),
				host("syd-1", "syd", 0, 1),
			},
			req:  place.Request{Regions: []string{"syd", "any"}, Guest: res(1, 1024)},
			n:    1,
			want: []string{"sin-1"},
		},
		{
			name: "syd alone, syd full: no capacity",
			hosts: []place.Host{
				host("sin-1", "sin", 8, 1),
				host("syd-1", "syd", 0, 1),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 1024)},
			n:    3,
			want: nil,
		},
		{
			name: "named regions only, in their order",
			hosts: []place.Host{
				host("ams-1", "ams", 8, 1),
				host("fra-1", "fra", 1, 1),
				host("syd-1", "syd", 8, 1),
			},
			req:  place.Request{Regions: []string{"fra", "ams"}, Guest: res(1, 1024)},
			n:    3,
			want: []string{"fra-1", "ams-1"},
		},
		{
			name: "no preference: capacity and health decide across regions",
			hosts: []place.Host{
				host("ams-1", "ams", 2, 1),
				host("syd-1", "syd", 8, 1),
				host("fra-1", "fra", 5, 1),
			},
			req:  place.Request{Guest: res(1, 1024)},
			n:    3,
			want: []string{"syd-1", "fra-1", "ams-1"},
		},
		{
			name: "dead, draining, full and excluded hosts are never candidates",
			hosts: []place.Host{
				host("dead", "syd", 8, 0),
				host("draining", "syd", 8, -1),
				host("full", "syd", 0, 1),
				host("small", "syd", 1, 1), // has 1 CPU and 2 GB; the guest wants 2 GB + 1 MB
				host("refused", "syd", 8, 1),
				host("ok", "syd", 3, 0.1),
			},
			req:  place.Request{Regions: []string{"syd"}, Guest: res(1, 2049), Exclude: map[string]bool{"refused": true, "ok": false}},
			n:    10,
			want: []string{"ok"},
		},
		{
			name:  "unknown region",
			hosts: []place.Host{host("syd-1", "syd", 8, 1)},
			req:   place.Request{Regions: []string{"xyz"}, Guest: res(1, 1024)},
			n:     3,
			want:  nil,
		},
		{
			name:  "n = 0",
			hosts: []place.Host{host("syd-1", "syd", 8, 1)},
			req:   place.Request{Regions: []string{"syd"}},
			n:     0,
			want:  nil,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ix := place.NewIndex(tc.hosts, geoRTT)
			got := ix.Rank(tc.req, w, rand.New(rand.NewPCG(1, 2)), tc.n)
			if !slices.Equal(ids(got), tc.want) {
				t.Errorf("Rank = %v, want %v", ids(got), tc.want)
			}
			if tc.want == nil && got != nil {
				t.Errorf("Rank = %#v, want nil", got)
			}
		})
	}
}

// TestRankAgainstReference compares Rank, on many random clusters and
// requests, with a brute-force ranking: the same tiers and scores in the
// same order, and only candidates that qualify.
func TestRankAgainstReference(t *testing.T) {
	for seed := range uint64(2000) {
		rng := rand.New(rand.NewPCG(seed, 7))
		w := place.DefaultWeights()
		if rng.IntN(5) == 0 { // any weights, negative ones too: no pruning then
			w = place.Weights{Alpha: rng.Float64()*200 - 50, Beta: rng.Float64()*4 - 1, Gamma: rng.Float64()*4 - 1, Spread: rng.Float64()*4 - 1}
		}
		hosts := cluster(rng, 1+rng.IntN(60))
		if rng.IntN(10) == 0 { // an ID given twice: the last entry counts
			dup := hosts[rng.IntN(len(hosts))]
			dup.Free = res(8, 16384)
			hosts = append(hosts, dup)
		}
		var rtt place.RTT = geoRTT
		if rng.IntN(10) == 0 {
			rtt = nil
		}
		ix := place.NewIndex(hosts, rtt)
		req := request(rng, hosts)
		n := 1 + rng.IntN(8)
		var got []place.Candidate
		if rng.IntN(2) == 0 {
			got = ix.Rank(req, w, rng, n)
		} else {
			got = ix.RankSampled(req, w, rng, n, 1<<20) // sample bigger than the cluster: a full scan
		}
		want := reference(hosts, req, w, rtt, n)
		if len(got) != len(want) {
			t.Fatalf("seed %d: %d candidates, want %d\nrequest %+v\ngot %v", seed, len(got), len(want), req, got)
		}
		if len(want) == 0 && got != nil {
			t.Fatalf("seed %d: empty ranking is not nil", seed)
		}
		seen := map[string]bool{}
		for i, c := range got {
			h, _ := ix.Host(c.Host.ID)
			switch {
			case seen[c.Host.ID]:
				t.Fatalf("seed %d: %s returned twice", seed, c.Host.ID)
			case h != c.Host:
				t.Fatalf("seed %d: returned %+v, index has %+v", seed, c.Host, h)
			case c.Host.Health <= 0, req.Exclude[c.Host.ID], !req.Guest.Fits(c.Host.Free):
				t.Fatalf("seed %d: %+v is no candidate for %+v", seed, c.Host, req)
			}
			seen[c.Host.ID] = true
			if tier := tierOf(req.Regions, c.Host.Region); tier != want[i].tier || c.Score != want[i].score {
				t.Fatalf("seed %d: candidate %d is %s in tier %d scoring %v, want tier %d scoring %v",
					seed, i, c.Host.ID, tier, c.Score, want[i].tier, want[i].score)
			}
		}
	}
}

// equalHosts is a region of n interchangeable hosts.
func equalHosts(n int) []place.Host {
	hosts := make([]place.Host, n)
	for i := range hosts {
		hosts[i] = host(string(rune('a'+i)), "syd", 4, 1)
	}
	return hosts
}

func TestRankDeterministicBySeed(t *testing.T) {
	ix := place.NewIndex(equalHosts(10), geoRTT)
	req := place.Request{Regions: []string{"syd"}, Guest: res(1, 1024)}
	w := place.DefaultWeights()
	orders := map[string]bool{}
	for seed := range uint64(20) {
		a := ids(ix.Rank(req, w, rand.New(rand.NewPCG(seed, 0)), 10))
		b := ids(ix.Rank(req, w, rand.New(rand.NewPCG(seed, 0)), 10))
		if !slices.Equal(a, b) {
			t.Fatalf("seed %d: %v then %v", seed, a, b)
		}
		orders[strings.Join(a, ",")] = true
	}
	if len(orders) < 15 {
		t.Errorf("20 seeds gave only %d orders of 10 equal hosts", len(orders))
	}
	// Without a random source, ties go to the earlier host ID.
	if got := ids(ix.Rank(req, w, nil, 3)); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("nil rng: %v", got)
	}
}

// TestRankTiesUniform checks that the first pick among equal hosts is
// uniform, not merely varied: neither the lazily drawn keys nor the skipping
// of regions may favour hosts by their place in the scan.
func TestRankTiesUniform(t *testing.T) {
	const hosts, trials = 8, 8000
	oneRegion := equalHosts(hosts)
	spread := equalHosts(hosts) // one host in each of 8 regions
	for i, code := range []string{"ams", "fra", "iad", "ord", "syd", "sin", "nrt", "gru"} {
		spread[i].Region = code
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, tc := range []struct {
		name  string
		hosts []place.Host
		req   place.Request
	}{
		{"one region", oneRegion, place.Request{Regions: []string{"syd"}, Guest: res(1, 1024)}},
		{"a region each, no preference", spread, place.Request{Guest: res(1, 1024)}},
	} {
		ix := place.NewIndex(tc.hosts, geoRTT)
		for _, n := range []int{1, 3} {
			first := map[string]int{}
			for range trials {
				first[ix.Rank(tc.req, place.DefaultWeights(), rng, n)[0].Host.ID]++
			}
			chi2 := 0.0
			for _, h := range tc.hosts {
				d := float64(first[h.ID]) - trials/hosts
				chi2 += d * d / (trials / hosts)
			}
			if chi2 > 24.3 { // p = 0.001 at 7 degrees of freedom
				t.Errorf("%s, n=%d: first picks %v, χ² = %.1f", tc.name, n, first, chi2)
			}
		}
	}
}

func TestWithMatchesNewIndex(t *testing.T) {
	w := place.DefaultWeights()
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 11))
		hosts := cluster(rng, 1+rng.IntN(40))
		ix := place.NewIndex(hosts, geoRTT)
		old := ix.Hosts()
		var changed []place.Host
		for range 1 + rng.IntN(4) {
			h := hosts[rng.IntN(len(hosts))]
			switch rng.IntN(5) {
			case 0:
				h.ID += "-new"
			case 1:
				h.Region = "gru"
			default:
				h.Free, h.Health = res(rng.IntN(9), rng.IntN(9)*2048), float64(rng.IntN(3))/2
			}
			changed = append(changed, h)
		}
		nx := ix.With(changed...)
		want := place.NewIndex(append(slices.Clone(hosts), changed...), geoRTT)
		if !slices.Equal(nx.Hosts(), want.Hosts()) {
			t.Fatalf("seed %d: With gave\n%v\nwant\n%v", seed, nx.Hosts(), want.Hosts())
		}
		if !slices.Equal(ix.Hosts(), old) {
			t.Fatalf("seed %d: With changed the index it was called on", seed)
		}
		req := request(rng, hosts)
		a := nx.Rank(req, w, rand.New(rand.NewPCG(seed, 0)), 5)
		b := want.Rank(req, w, rand.New(rand.NewPCG(seed, 0)), 5)
		if !slices.Equal(a, b) {
			t.Fatalf("seed %d: Rank after With %v, after NewIndex %v", seed, a, b)
		}
	}
}

func TestIndexAccessors(t *testing.T) {
	ix := place.NewIndex([]place.Host{host("b", "syd", 1, 1), host("a", "ams", 1, 1), host("c", "syd", 1, 1)}, nil)
	if ix.Len() != 3 {
		t.Errorf("Len = %d", ix.Len())
	}
	if got := ix.Regions(); !slices.Equal(got, []string{"ams", "syd"}) {
		t.Errorf("Regions = %v", got)
	}
	if got := ids(func() []place.Candidate {
		var cs []place.Candidate
		for _, h := range ix.Hosts() {
			cs = append(cs, place.Candidate{Host: h})
		}
		return cs
	}()); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Errorf("Hosts = %v", got)
	}
	if h, ok := ix.Host("c"); !ok || h.Region != "syd" {
		t.Errorf("Host(c) = %v, %v", h, ok)
	}
	if _, ok := ix.Host("d"); ok {
		t.Error("Host(d) found")
	}
	if got := place.NewIndex(nil, nil).Rank(place.Request{}, place.DefaultWeights(), nil, 5); got != nil {
		t.Errorf("empty index ranks %v", got)
	}
}

// TestRankSampledScoreLost measures what sampling gives up against the full
// scan on a cluster of 2,000 hosts, and that it never reports no capacity
// where there is some.
func TestRankSampledScoreLost(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	hosts := cluster(rng, 2000)
	ix := place.NewIndex(hosts, geoRTT)
	w := place.DefaultWeights()
	for _, sample := range []int{16, 64, 256} {
		var localLost float64
		decisions := 0
		for range 500 {
			req := request(rng, hosts)
			full := ix.Rank(req, w, rng, 3)
			got := ix.RankSampled(req, w, rng, 3, sample)
			if (full == nil) != (got == nil) {
				t.Fatalf("sample %d: Rank found %d, RankSampled %d", sample, len(full), len(got))
			}
			if full == nil {
				continue
			}
			if got[0].Score > full[0].Score {
				t.Fatalf("sample %d: sampled best %v beats full best %v", sample, got[0], full[0])
			}
			for i, c := range got {
				if c.Host.Health <= 0 || req.Exclude[c.Host.ID] || !req.Guest.Fits(c.Host.Free) {
					t.Fatalf("sample %d: %+v is no candidate", sample, c.Host)
				}
				if i > 0 && tierOf(req.Regions, c.Host.Region) < tierOf(req.Regions, got[i-1].Host.Region) {
					t.Fatalf("sample %d: tiers out of order: %v", sample, ids(got))
				}
			}
			decisions++
			// The loss against the range capacity and health span (β+γ):
			// the latency term alone would make any loss look negligible.
			localLost += (full[0].Score - got[0].Score) / (w.Beta + w.Gamma)
		}
		t.Logf("sample %d: best score lost %.2f%% of β+γ on average", sample, 100*localLost/float64(decisions))
		if localLost/float64(decisions) > 0.25 {
			t.Errorf("sample %d loses %.0f%% of the within-region range", sample, 100*localLost/float64(decisions))
		}
	}
}
