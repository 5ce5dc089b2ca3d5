package place_test

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/place"
)

// The benchmarks place against a cluster spread over geo's 35 regions, some
// regions three times the size of others, hosts of three shapes filled
// anywhere from empty to full, 3 % of them degraded and 2 % dead or
// draining; and 1,000 orgs with up to five apps each, every app at home in
// one region with machines on a few of its hosts.
//
// A decision asks for three candidates. The requests mix what the API sees:
// 60 % one region, 25 % a region then "any", 10 % two neighbouring regions,
// 5 % no preference at all (a scan of every region); one in ten excludes a
// host or two that refused.
//
//	go test ./internal/place -run '^$' -bench . -benchtime 20000x -cpu 1

type benchApp struct {
	org, name string
	home      string
	hosts     map[string]int
}

func benchCluster(nHosts int, rng *rand.Rand) ([]place.Host, []place.Request) {
	regions := geo.All()
	weights := make([]int, len(regions))
	sum := 0
	for i := range weights {
		weights[i] = 1 + rng.IntN(3)
		sum += weights[i]
	}
	shapes := []place.Resources{res(8, 32768), res(16, 65536), res(32, 131072)}
	var hosts []place.Host
	byRegion := map[string][]string{}
	for i := range nHosts {
		k := rng.IntN(sum)
		r := 0
		for k >= weights[r] {
			k -= weights[r]
			r++
		}
		shape := shapes[rng.IntN(len(shapes))]
		used := rng.Float64()
		h := place.Host{
			ID:       fmt.Sprintf("%s-%05d", regions[r].Code, i),
			Region:   regions[r].Code,
			Capacity: shape,
			Free:     res(shape.CPUs-int(used*float64(shape.CPUs)), shape.MemoryMB-int(used*float64(shape.MemoryMB))),
			Health:   1,
		}
		switch x := rng.IntN(100); {
		case x < 2:
			h.Health = 0
		case x < 5:
			h.Health = 0.5 + rng.Float64()*0.4
		}
		hosts = append(hosts, h)
		byRegion[h.Region] = append(byRegion[h.Region], h.ID)
	}

	var apps []benchApp
	for o := range 1000 {
		for a := range 1 + rng.IntN(5) {
			home := regions[rng.IntN(len(regions))].Code
			app := benchApp{org: fmt.Sprintf("org%04d", o), name: fmt.Sprintf("app%d", a), home: home, hosts: map[string]int{}}
			for range rng.IntN(9) {
				if ids := byRegion[home]; len(ids) > 0 {
					app.hosts[ids[rng.IntN(len(ids))]]++
				}
			}
			apps = append(apps, app)
		}
	}

	guests := []place.Resources{res(1, 256), res(1, 1024), res(2, 4096), res(4, 8192), res(8, 16384)}
	reqs := make([]place.Request, 4096)
	for i := range reqs {
		app := apps[rng.IntN(len(apps))]
		req := place.Request{Org: app.org, App: app.name, Guest: guests[rng.IntN(len(guests))], AppHosts: app.hosts}
		switch x := rng.IntN(100); {
		case x < 60:
			req.Regions = []string{app.home}
		case x < 85:
			req.Regions = []string{app.home, place.Any}
		case x < 95:
			home, _ := geo.Lookup(app.home)
			codes := make([]string, len(regions))
			for j, r := range regions {
				codes[j] = r.Code
			}
			req.Regions = geo.Nearest(home, codes)[:2]
		}
		if rng.IntN(10) == 0 {
			req.Exclude = map[string]bool{}
			for range 1 + rng.IntN(2) {
				if ids := byRegion[app.home]; len(ids) > 0 {
					req.Exclude[ids[rng.IntN(len(ids))]] = true
				}
			}
		}
		reqs[i] = req
	}
	return hosts, reqs
}

// BenchmarkRank runs the mix above, and then only requests with no
// preference at all (anywhere): every region's hosts may be scanned.
func BenchmarkRank(b *testing.B) {
	for _, n := range []int{5000, 10000} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) { benchRank(b, n, 0, false) })
	}
	for _, n := range []int{5000, 10000} {
		b.Run(fmt.Sprintf("hosts=%d/anywhere", n), func(b *testing.B) { benchRank(b, n, 0, true) })
	}
}

// BenchmarkRankSampled is the power of k choices, with what it loses: the
// best candidate's score against the full scan's (score-lost-%), and that
// loss as a share of the range capacity and health span within a region
// (local-lost-%, against β+γ).
func BenchmarkRankSampled(b *testing.B) {
	for _, n := range []int{5000, 10000} {
		for _, k := range []int{16, 64} {
			b.Run(fmt.Sprintf("hosts=%d/sample=%d", n, k), func(b *testing.B) { benchRank(b, n, k, false) })
		}
	}
}

func benchRank(b *testing.B, nHosts, sample int, anywhere bool) {
	rng := rand.New(rand.NewPCG(1, 2))
	hosts, reqs := benchCluster(nHosts, rng)
	if anywhere {
		for i := range reqs {
			reqs[i].Regions = nil
		}
	}
	ix := place.NewIndex(hosts, geoRTT)
	w := place.DefaultWeights()
	times := make([]time.Duration, 0, b.N)
	var lost, localLost float64
	compared := 0
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		req := reqs[i%len(reqs)]
		var got []place.Candidate
		start := time.Now()
		if sample == 0 {
			got = ix.Rank(req, w, rng, 3)
		} else {
			got = ix.RankSampled(req, w, rng, 3, sample)
		}
		times = append(times, time.Since(start))
		if sample > 0 {
			if full := ix.Rank(req, w, rng, 3); len(full) > 0 && full[0].Score > 0 {
				lost += (full[0].Score - got[0].Score) / full[0].Score
				localLost += (full[0].Score - got[0].Score) / (w.Beta + w.Gamma)
				compared++
			}
		}
	}
	b.StopTimer()
	var sum time.Duration
	for _, d := range times {
		sum += d
	}
	slices.Sort(times)
	b.ReportMetric(float64(len(times))/sum.Seconds(), "decisions/s")
	b.ReportMetric(float64(times[len(times)/2])/1e3, "p50-µs")
	b.ReportMetric(float64(times[len(times)*99/100])/1e3, "p99-µs")
	if sample > 0 && compared > 0 {
		b.ReportMetric(100*lost/float64(compared), "score-lost-%")
		b.ReportMetric(100*localLost/float64(compared), "local-lost-%")
	}
}

// BenchmarkIndexWith is the cost of the new view after one placement.
func BenchmarkIndexWith(b *testing.B) {
	for _, n := range []int{5000, 10000} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			rng := rand.New(rand.NewPCG(3, 4))
			hosts, _ := benchCluster(n, rng)
			ix := place.NewIndex(hosts, geoRTT)
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				h := hosts[i%len(hosts)]
				h.Free = h.Free.Sub(res(0, 1))
				ix = ix.With(h)
			}
		})
	}
}

// BenchmarkFairNext picks among one pending request from each of 1,000
// orgs.
func BenchmarkFairNext(b *testing.B) {
	rng := rand.New(rand.NewPCG(5, 6))
	f := place.NewFair(res(100000, 400000000))
	pending := make([]place.Pending, 1000)
	for i := range pending {
		org := fmt.Sprintf("org%04d", i)
		f.Allocate(org, res(rng.IntN(100), rng.IntN(400000)))
		pending[i] = place.Pending{Org: org, Demand: res(1, 1024), Seq: uint64(i)}
	}
	b.ResetTimer()
	for range b.N {
		f.Next(pending)
	}
}
