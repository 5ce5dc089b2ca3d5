package place_test

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/flamehq/flame/internal/place"
)

// TestMarket places requests one by one the way the control plane will: rank,
// ask the best candidate's host, on a refusal ask the next, rank again with
// the refusing hosts excluded when the list runs out. Hosts keep their own
// books and refuse at random; after each placement the index is updated
// (With) or rebuilt from the hosts' books. No host's free capacity may ever
// go negative, the index must always agree with the hosts, and "no capacity"
// must mean that no host that did not refuse had room.
func TestMarket(t *testing.T) {
	for seed := range uint64(20) {
		if msg := market(seed); msg != "" {
			t.Fatalf("seed %d: %s", seed, msg)
		}
	}
}

func market(seed uint64) string {
	rng := rand.New(rand.NewPCG(seed, 1234))
	regions := []string{"syd", "sin", "nrt", "ams", "fra", "iad"}
	books := map[string]place.Host{} // the hosts' own view: the truth
	var hosts []place.Host
	for i := range 40 {
		cpus := 4 + rng.IntN(13)
		h := place.Host{
			ID:       fmt.Sprintf("h%02d", i),
			Region:   regions[rng.IntN(len(regions))],
			Capacity: res(cpus, cpus*2048),
			Free:     res(cpus, cpus*2048),
			Health:   []float64{1, 1, 1, 0.7, 0}[rng.IntN(5)],
		}
		books[h.ID] = h
		hosts = append(hosts, h)
	}
	ix := place.NewIndex(hosts, geoRTT)
	w := place.DefaultWeights()
	var total place.Resources
	for _, h := range hosts {
		total = total.Add(h.Capacity)
	}
	fair := place.NewFair(total)
	appHosts := map[string]map[string]int{} // app → host → machines
	lists := [][]string{{"syd"}, {"syd", "any"}, {"ams", "fra"}, {"iad", "any"}, nil}

	placed, noCapacity, refusals := 0, 0, 0
	for i := range 200 {
		org := fmt.Sprintf("org%d", rng.IntN(10))
		app := fmt.Sprintf("%s-app%d", org, rng.IntN(3))
		if appHosts[app] == nil {
			appHosts[app] = map[string]int{}
		}
		req := place.Request{
			Org: org, App: app,
			Regions:  lists[rng.IntN(len(lists))],
			Guest:    res(1+rng.IntN(4), 512*(1+rng.IntN(8))),
			AppHosts: appHosts[app],
			Exclude:  map[string]bool{},
		}
		var got string
		for got == "" {
			cands := ix.Rank(req, w, rng, 3)
			if cands == nil {
				break
			}
			for _, c := range cands {
				if rng.IntN(4) == 0 { // busy, pulling, changed its mind
					req.Exclude[c.Host.ID] = true
					refusals++
					continue
				}
				h := books[c.Host.ID]
				if !req.Guest.Fits(h.Free) || h.Health <= 0 {
					return fmt.Sprintf("request %d: index offered %s, whose books say %+v", i, h.ID, h)
				}
				h.Free = h.Free.Sub(req.Guest)
				books[h.ID] = h
				got = h.ID
				break
			}
		}
		if got == "" {
			noCapacity++
			for _, h := range books {
				if h.Health > 0 && !req.Exclude[h.ID] && req.Guest.Fits(h.Free) && tierOf(req.Regions, h.Region) >= 0 {
					return fmt.Sprintf("request %d: no capacity, but %+v has room for %v", i, h, req.Guest)
				}
			}
		} else {
			placed++
			appHosts[app][got]++
			fair.Allocate(org, req.Guest)
			if i%10 == 0 {
				ix = place.NewIndex(slices.Collect(maps.Values(books)), geoRTT)
			} else {
				ix = ix.With(books[got])
			}
		}
		// Now and then a host starts draining, or comes back.
		if rng.IntN(20) == 0 {
			h := hosts[rng.IntN(len(hosts))]
			h = books[h.ID]
			h.Health = 1 - h.Health
			books[h.ID] = h
			ix = ix.With(h)
		}

		for _, h := range books {
			if h.Free.CPUs < 0 || h.Free.MemoryMB < 0 {
				return fmt.Sprintf("request %d: %s has free %v", i, h.ID, h.Free)
			}
			if seen, _ := ix.Host(h.ID); seen != h {
				return fmt.Sprintf("request %d: index has %+v, books %+v", i, seen, h)
			}
		}
	}

	var used place.Resources
	for _, h := range books {
		used = used.Add(h.Capacity.Sub(h.Free))
	}
	if used != fair.Used() {
		return fmt.Sprintf("hosts hold %v, fairness books %v", used, fair.Used())
	}
	if placed < 50 || noCapacity == 0 || refusals == 0 {
		return fmt.Sprintf("a dull market: %d placed, %d without capacity, %d refusals", placed, noCapacity, refusals)
	}
	return ""
}
