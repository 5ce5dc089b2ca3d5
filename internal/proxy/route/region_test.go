package route

import (
	"slices"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestWindow(t *testing.T) {
	step := RegionWindow / RegionBuckets
	type add struct {
		at     time.Duration
		failed bool
		n      int
	}
	tests := []struct {
		name       string
		adds       []add
		at         time.Duration
		att, fails int
	}{
		{"empty", nil, 0, 0, 0},
		{"one slice", []add{{0, true, 3}, {step / 2, false, 2}}, step - 1, 5, 3},
		{"across the window", []add{{0, true, 5}, {RegionWindow / 2, false, 5}}, RegionWindow - 1, 10, 5},
		{"the oldest slice drops out", []add{{0, true, 5}, {RegionWindow / 2, false, 5}}, RegionWindow, 5, 0},
		{"everything drops out", []add{{0, true, 5}, {RegionWindow / 2, false, 5}}, RegionWindow + RegionWindow/2, 0, 0},
		{"a bucket reused for a later slice starts empty", []add{{0, true, 5}, {RegionWindow, false, 1}}, RegionWindow, 1, 0},
		{"an attempt older than its bucket's slice is ignored", []add{{RegionWindow, false, 1}, {0, true, 5}}, RegionWindow, 1, 0},
		{"counts at a time before the adds see nothing later", []add{{RegionWindow, true, 2}}, 0, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var w Window
			for _, a := range tt.adds {
				for range a.n {
					w.Add(t0.Add(a.at), a.failed)
				}
			}
			if att, f := w.Counts(t0.Add(tt.at)); att != tt.att || f != tt.fails {
				t.Errorf("counts %d/%d, want %d/%d", f, att, tt.fails, tt.att)
			}
		})
	}
	// Before the epoch the slices are whole too.
	var w Window
	old := time.Unix(-5, 0)
	w.Add(old, true)
	if a, f := w.Counts(old.Add(step - 1)); a != 1 || f != 1 {
		t.Errorf("before the epoch: %d/%d", f, a)
	}
	w.Reset()
	if a, _ := w.Counts(old); a != 0 {
		t.Error("reset left attempts")
	}
}

func TestRegionBreaker(t *testing.T) {
	t.Run("below the minimum nothing trips it", func(t *testing.T) {
		var b RegionBreaker
		for range RegionMinAttempts - 1 {
			b.Record(t0, true)
		}
		if b.State(t0) != RegionClosed {
			t.Fatalf("%d failures tripped it", RegionMinAttempts-1)
		}
		b.Record(t0, true)
		if b.State(t0) != RegionOpen {
			t.Fatalf("%d failures in %d: %v", RegionMinAttempts, RegionMinAttempts, b.State(t0))
		}
	})
	t.Run("the rate decides", func(t *testing.T) {
		var below, at RegionBreaker
		for i := range 4 * RegionMinAttempts {
			below.Record(t0, i%5 < 2) // 40 %
			at.Record(t0, i%2 == 0)   // 50 %
		}
		if below.State(t0) != RegionClosed || at.State(t0) != RegionOpen {
			t.Errorf("40 %%: %v, 50 %%: %v", below.State(t0), at.State(t0))
		}
	})
	t.Run("old failures age out", func(t *testing.T) {
		var b RegionBreaker
		for range RegionMinAttempts - 1 {
			b.Record(t0, true)
		}
		b.Record(t0.Add(RegionWindow), true)
		if b.State(t0.Add(RegionWindow)) != RegionClosed {
			t.Error("failures older than the window counted")
		}
	})
	t.Run("open, half-open, closed", func(t *testing.T) {
		var b RegionBreaker
		for range RegionMinAttempts {
			b.Record(t0, true)
		}
		now := t0
		for r := range uint64(1000) {
			if !b.Shed(now, r) {
				t.Fatal("open, yet a request let through")
			}
		}
		b.Record(now, false) // a success while open decides nothing
		now = now.Add(RegionOpenBase)
		if b.State(now) != RegionHalfOpen {
			t.Fatalf("after the backoff: %v", b.State(now))
		}
		let := 0
		for r := range uint64(8000) {
			if !b.Shed(now, r*0x9e3779b97f4a7c15) {
				let++
			}
		}
		if let < 8000/RegionProbeEvery/2 || let > 8000/RegionProbeEvery*2 {
			t.Errorf("half-open let %d of 8000 through, want about 1 in %d", let, RegionProbeEvery)
		}
		b.Record(now, true) // a probe fails: open for twice as long
		if b.State(now.Add(2*RegionOpenBase-1)) != RegionOpen || b.State(now.Add(2*RegionOpenBase)) != RegionHalfOpen {
			t.Fatal("a failed probe did not double the backoff")
		}
		now = now.Add(2 * RegionOpenBase)
		for i := range RegionProbeSuccesses {
			if b.State(now) != RegionHalfOpen {
				t.Fatalf("closed after %d successes", i)
			}
			b.Record(now, false)
		}
		if b.State(now) != RegionClosed || b.Shed(now, 0) {
			t.Fatalf("after %d successes: %v", RegionProbeSuccesses, b.State(now))
		}
		// The window starts empty: one failure does not open it again.
		b.Record(now, true)
		if b.State(now) != RegionClosed {
			t.Error("reopened by one failure after closing")
		}
	})
	t.Run("the backoff is capped", func(t *testing.T) {
		var b RegionBreaker
		now := t0
		for range RegionMinAttempts {
			b.Record(now, true)
		}
		for range 20 {
			now = now.Add(RegionOpenMax)
			b.Record(now, true)
		}
		if b.State(now.Add(RegionOpenMax-1)) != RegionOpen || b.State(now.Add(RegionOpenMax)) != RegionHalfOpen {
			t.Error("backoff not capped at RegionOpenMax")
		}
	})
}

// shedding is a Load that sheds the regions and demotes the machines it names.
type shedding struct {
	demoting
	regions map[string]bool
}

func (s shedding) Shed(app, region string, _ uint64) bool { return app != "" && s.regions[region] }

// TestShedRegionGoesLast: a shed region's machines — the edge's own region
// included — come after every other region's, before demoted machines; a
// forced region that is shed is still served. Selection still allocates
// nothing.
func TestShedRegionGoesLast(t *testing.T) {
	ms := []Machine{mk("a", "ams-1"), mk("b", "ams-2"), mk("f", "fra-1"), mk("l", "lhr-1"), mk("i", "iad-1")}
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms})
	s := shedding{demoting: demoting{names: map[string]bool{"l": true}}, regions: map[string]bool{"ams": true}}
	got := ids(tab.Select("web", Query{Port: 80}, s, make([]*Target, 0, 8)))
	if want := []string{"f", "i", "a", "b", "l"}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	got = ids(tab.Select("web", Query{Port: 80, ForceRegion: "ams"}, s, make([]*Target, 0, 8)))
	if want := []string{"a", "b"}; !slices.Equal(got, want) {
		t.Errorf("forced into a shed region: got %v, want %v", got, want)
	}
	out := make([]*Target, 0, MaxCandidates)
	var load Load = s
	if allocs := testing.AllocsPerRun(100, func() { tab.Select("web", Query{Port: 80}, load, out) }); allocs != 0 {
		t.Errorf("%v allocations with a Shedder", allocs)
	}
}

// BenchmarkSelectShedding is BenchmarkSelect with a live load that also
// demotes machines and sheds a region, as the proxy's does.
//
//	go test ./internal/proxy/route -run '^$' -bench Shedding -benchmem -cpu 1
func BenchmarkSelectShedding(b *testing.B) {
	tab, queries := benchTable(100)
	out := make([]*Target, 0, MaxCandidates)
	var load Load = shedding{
		demoting: demoting{liveLoad: liveLoad{"web-0001": 3}, names: map[string]bool{"web-0002": true, "fra-1": true}},
		regions:  map[string]bool{"ams": true},
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		q := queries[i%len(queries)]
		q.Rand = uint64(i)
		out = tab.Select("app-7", q, load, out)
		i++
	}
}
