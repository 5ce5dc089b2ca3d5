package route

import (
	"slices"
	"testing"
)

func parked(m *Machine) {
	m.Started, m.Stopped = false, true
	for i := range m.Services {
		m.Services[i].Autostart = true
	}
}

func noAutostart(m *Machine) {
	for i := range m.Services {
		m.Services[i].Autostart = false
	}
}

// TestStartable: the machines an edge may start for a request, in the
// candidates' region order, nearest first.
func TestStartable(t *testing.T) {
	tests := []struct {
		name     string
		machines []Machine
		q        Query
		want     []string
	}{
		{"nothing stopped", []Machine{mk("a", "ams-1")}, Query{Port: 80}, []string{}},
		{"home region first, then by rank", []Machine{
			mk("s", "syd-1", parked), mk("f", "fra-1", parked), mk("i", "iad-1", parked), mk("b", "ams-2", parked),
		}, Query{Port: 80}, []string{"b", "f", "i", "s"}},
		{"in a region, the closer host, then by id", []Machine{
			mk("z", "ams-2", parked), mk("y", "ams-1", parked), mk("x", "ams-1", parked),
		}, Query{Port: 80}, []string{"x", "y", "z"}},
		{"not a started, cordoned, autostart-less or created machine, nor one on a dead host", []Machine{
			mk("started", "ams-1"), mk("cord", "ams-1", parked, cordoned), mk("off", "ams-1", parked, noAutostart),
			mk("created", "ams-1", stopped), mk("dead", "ams-9", parked), mk("ok", "fra-1", parked),
		}, Query{Port: 80}, []string{"ok"}},
		{"regions by rank, a suspect one's too", []Machine{
			mk("l", "lhr-1", parked), mk("f", "fra-1", parked),
		}, Query{Port: 80}, []string{"l", "f"}}, // lhr is nearer: its rank comes first
		{"fly-prefer-region moves home", []Machine{
			mk("a", "ams-1", parked), mk("i", "iad-1", parked),
		}, Query{Port: 80, PreferRegion: "iad"}, []string{"i", "a"}},
		{"fly-force-region keeps one region", []Machine{
			mk("a", "ams-1", parked), mk("i", "iad-1", parked),
		}, Query{Port: 80, ForceRegion: "iad"}, []string{"i"}},
		{"fly-force-instance-id keeps one machine", []Machine{
			mk("a", "ams-1", parked), mk("i", "iad-1", parked),
		}, Query{Port: 80, ForceInstance: "inst-i"}, []string{"i"}},
		{"a draining machine, autostart or not; not a cordoned one", []Machine{
			mk("d", "ams-1", noAutostart, cordoned, func(m *Machine) { m.Draining = true }), mk("c", "ams-1", cordoned),
		}, Query{Port: 80}, []string{"d"}},
		{"port ranges", []Machine{mk("a", "ams-1", parked)}, Query{Port: 5003}, []string{"a"}},
		{"another port", []Machine{mk("a", "ams-1", parked)}, Query{Port: 81}, []string{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tb := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: tt.machines})
			var buf [MaxCandidates]*Target
			got := ids(tb.Startable("web", tt.q, buf[:0]))
			if !slices.Equal(got, tt.want) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
			// Stopped machines never become candidates.
			if c := tb.Select("web", tt.q, nil, buf[:0]); len(c) > 0 {
				for _, tg := range c {
					if tg.Startable() {
						t.Errorf("startable %s is a candidate", tg.MachineID)
					}
				}
			}
		})
	}
}

func TestStartableBoundedAndAllocationFree(t *testing.T) {
	var ms []Machine
	for _, h := range []string{"syd-1", "iad-1", "fra-1", "ams-2", "ams-1"} {
		for _, id := range []string{"1", "2", "3"} {
			ms = append(ms, mk(h+"/"+id, h, parked))
		}
	}
	tb := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms})
	var buf [3]*Target
	if got := ids(tb.Startable("web", Query{Port: 80}, buf[:0])); !slices.Equal(got, []string{"ams-1/1", "ams-1/2", "ams-1/3"}) {
		t.Errorf("got %v", got)
	}
	var big [MaxCandidates]*Target
	if n := testing.AllocsPerRun(100, func() { tb.Startable("web", Query{Port: 80}, big[:0]) }); n != 0 {
		t.Errorf("%v allocations per call", n)
	}
}
