package autostop

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

const idle = time.Minute

// m is a running machine of app "web" on host <region>-1 with autostop
// stop and no load.
func m(id, region string, opts ...func(*Machine)) Machine {
	x := Machine{ID: id, App: "web", Region: region, Host: region + "-1", Running: true, Mode: Stop}
	for _, o := range opts {
		o(&x)
	}
	return x
}

func load(n int) func(*Machine)       { return func(x *Machine) { x.Load = n } }
func softLimit(n int) func(*Machine)  { return func(x *Machine) { x.SoftLimit = n } }
func minRunning(n int) func(*Machine) { return func(x *Machine) { x.MinRunning = n } }
func primary(r string) func(*Machine) { return func(x *Machine) { x.PrimaryRegion = r } }
func mode(md Mode) func(*Machine)     { return func(x *Machine) { x.Mode = md } }
func app(a string) func(*Machine)     { return func(x *Machine) { x.App = a } }
func host(h string) func(*Machine)    { return func(x *Machine) { x.Host = h } }
func active(ago time.Duration) func(*Machine) {
	return func(x *Machine) { x.LastActive = t0.Add(-ago) }
}
func notRunning(x *Machine) { x.Running = false }

func render(ds []Decision) string {
	var parts []string
	for _, d := range ds {
		s := d.App + "/" + d.Region + ":" + d.MachineID
		if d.Suspend {
			s += "(suspend)"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, " ")
}

func TestPlan(t *testing.T) {
	tests := []struct {
		name string
		ms   []Machine
		want string
	}{
		{"a lone idle machine stops", []Machine{m("a", "ams")}, "web/ams:a"},
		{"a lone machine with load stays", []Machine{m("a", "ams", load(1))}, ""},
		{"two idle: an excess of one, the lower id goes", []Machine{m("b", "ams"), m("a", "ams")}, "web/ams:a"},
		{"the least loaded goes", []Machine{m("a", "ams", load(3)), m("b", "ams", load(1))}, "web/ams:b"},
		{"two, one over its soft limit: no excess", []Machine{m("a", "ams", load(20)), m("b", "ams")}, ""},
		{"three, one over: an excess of one, never the busy one", []Machine{
			m("a", "ams", load(5), softLimit(5)), m("b", "ams", load(4), softLimit(5)), m("c", "ams", load(2), softLimit(5)),
		}, "web/ams:c"},
		{"all over their soft limit: no excess", []Machine{m("a", "ams", load(20)), m("b", "ams", load(25))}, ""},
		{"at most one per region per pass", []Machine{m("a", "ams"), m("b", "ams"), m("c", "ams"), m("d", "ams")}, "web/ams:a"},
		{"one per region and per app", []Machine{
			m("a", "ams"), m("b", "ams"), m("f", "fra"), m("x", "ams", app("api")),
		}, "api/ams:x web/ams:a web/fra:f"},
		{"autostop off: never chosen, but counted", []Machine{m("a", "ams", mode(Off)), m("b", "ams")}, "web/ams:b"},
		{"autostop off alone: stays", []Machine{m("a", "ams", mode(Off))}, ""},
		{"suspend", []Machine{m("a", "ams", mode(Suspend))}, "web/ams:a(suspend)"},
		{"stopped and cordoned machines do not count", []Machine{m("a", "ams"), m("b", "ams", notRunning), m("c", "ams", notRunning)}, "web/ams:a"},
		{"min 1 in the primary region keeps the last one", []Machine{m("a", "ams", minRunning(1))}, ""},
		{"min 1: one of two goes", []Machine{m("a", "ams", minRunning(1)), m("b", "ams", minRunning(1))}, "web/ams:a"},
		{"min 2 of 2: none goes", []Machine{m("a", "ams", minRunning(2)), m("b", "ams", minRunning(2))}, ""},
		{"min counts in the primary region only", []Machine{
			m("a", "ams", minRunning(1), primary("ams")), m("f", "fra", minRunning(1), primary("ams")),
		}, "web/fra:f"},
		{"the primary region is the machine's own without PRIMARY_REGION", []Machine{
			m("a", "ams", minRunning(1)), m("f", "fra", minRunning(1)),
		}, ""},
		{"a machine being stopped (not running) does not count toward min", []Machine{
			m("a", "ams", minRunning(1)), m("b", "ams", minRunning(1), notRunning),
		}, ""},
		{"min from any machine of the app", []Machine{m("a", "ams"), m("b", "ams", minRunning(2), mode(Off))}, ""},
		{"recently active: not chosen", []Machine{m("a", "ams", active(time.Second))}, ""},
		{"recently active: another goes", []Machine{m("a", "ams", active(time.Second)), m("b", "ams")}, "web/ams:b"},
		{"active long ago: chosen", []Machine{m("a", "ams", active(2*idle))}, "web/ams:a"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := render(Plan(tt.ms, t0, idle)); got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
}

// TestPlanOneStopPerExcessAcrossHosts: every host of a region computes the
// plan over the same machines, knowing only its own machines' activity,
// and acts on its own choices alone. Across random regions, the stops all
// hosts make together are never more than one per region, never take the
// region below min_machines_running, and never hit a busy machine.
func TestPlanOneStopPerExcessAcrossHosts(t *testing.T) {
	for seed := range uint64(500) {
		rng := rand.New(rand.NewPCG(seed, 7))
		hosts := []string{"ams-1", "ams-2", "ams-3"}
		min := rng.IntN(3)
		var truth []Machine
		for i := range 2 + rng.IntN(6) {
			x := m(fmt.Sprintf("m%d", i), "ams", host(hosts[rng.IntN(len(hosts))]), load(rng.IntN(3)), softLimit(2), minRunning(min))
			if rng.IntN(4) == 0 {
				x.Running = false
			}
			if rng.IntN(3) == 0 {
				x.LastActive = t0.Add(-time.Duration(rng.IntN(120)) * time.Second)
			}
			truth = append(truth, x)
		}
		stops := map[string]bool{}
		for _, h := range hosts {
			view := slices.Clone(truth)
			for i := range view {
				if view[i].Host != h {
					view[i].LastActive = time.Time{} // only the owner knows
				}
			}
			for _, d := range Plan(view, t0, idle) {
				if d.Host == h {
					stops[d.MachineID] = true
				}
			}
		}
		if len(stops) > 1 {
			t.Fatalf("seed %d: %d machines stopped in one region: %v", seed, len(stops), stops)
		}
		running := 0
		for _, x := range truth {
			if x.Running {
				running++
			}
			if stops[x.ID] && (!x.Running || x.Load >= 2 || !x.LastActive.IsZero() && t0.Sub(x.LastActive) < idle) {
				t.Fatalf("seed %d: stopped %+v", seed, x)
			}
		}
		if len(stops) > 0 && running-1 < min {
			t.Fatalf("seed %d: %d running, min %d, yet one stopped", seed, running, min)
		}
	}
}
