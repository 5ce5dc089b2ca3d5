package route

import (
	"slices"
	"testing"
)

// doubting is a Load that doubts the hosts it names.
type doubting struct {
	liveLoad
	hosts map[string]bool
}

func (d doubting) Doubted(host string) bool { return d.hosts[host] }

// TestDoubtedStayInRegion: a doubted host's machines rank after the other
// machines of their tier and region, less loaded or not, but before any
// other region's; a preferred instance on a doubted host loses its
// preference, not its region's place; and the selection still allocates
// nothing.
func TestDoubtedStayInRegion(t *testing.T) {
	ms := []Machine{mk("a1", "ams-1"), mk("a2", "ams-2"), mk("f", "fra-1"), mk("i", "iad-1")}
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms})
	for _, tc := range []struct {
		name  string
		q     Query
		hosts []string
		want  []string
	}{
		{"none doubted: the less loaded first", Query{Port: 80}, nil, []string{"a2", "a1", "f", "i"}},
		{"ams-2 doubted: after ams-1, before fra", Query{Port: 80}, []string{"ams-2"}, []string{"a1", "a2", "f", "i"}},
		{"every ams host doubted: ams still first", Query{Port: 80}, []string{"ams-1", "ams-2"}, []string{"a2", "a1", "f", "i"}},
		{"fra-1 doubted: alone in its region, its place kept", Query{Port: 80}, []string{"fra-1"}, []string{"a2", "a1", "f", "i"}},
		{"preferred instance doubted: no preference", Query{Port: 80, PreferInstance: "f"}, []string{"fra-1"}, []string{"a2", "a1", "f", "i"}},
		{"preferred instance trusted", Query{Port: 80, PreferInstance: "f"}, nil, []string{"f", "a2", "a1", "i"}},
		{"preferred region, a host of it doubted", Query{Port: 80, PreferRegion: "ams"}, []string{"ams-2"}, []string{"a1", "a2", "f", "i"}},
	} {
		d := doubting{liveLoad: liveLoad{"a1": 3}, hosts: map[string]bool{}}
		for _, h := range tc.hosts {
			d.hosts[h] = true
		}
		got := ids(tab.Select("web", tc.q, d, make([]*Target, 0, 8)))
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
		}
	}
	var load Load = doubting{hosts: map[string]bool{"ams-2": true}}
	out := make([]*Target, 0, MaxCandidates)
	if allocs := testing.AllocsPerRun(100, func() { tab.Select("web", Query{Port: 80}, load, out) }); allocs != 0 {
		t.Errorf("%v allocations with a Doubter", allocs)
	}
}
