package route

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// The edge under test is host ams-1 in ams. ams-2 is its neighbour, ams-9 is
// dead; fra, iad and syd are ever farther away; lhr-1 is suspect.
var testHosts = []Host{
	{ID: "ams-1", Region: "ams", Status: HostAlive},
	{ID: "ams-2", Region: "ams", Status: HostAlive, RTT: time.Millisecond},
	{ID: "ams-9", Region: "ams", Status: HostDown, RTT: time.Millisecond},
	{ID: "fra-1", Region: "fra", Status: HostAlive, RTT: 8 * time.Millisecond},
	{ID: "iad-1", Region: "iad", Status: HostAlive, RTT: 80 * time.Millisecond},
	{ID: "syd-1", Region: "syd", Status: HostAlive, RTT: 250 * time.Millisecond},
	{ID: "syd-2", Region: "syd", Status: HostDown, RTT: 240 * time.Millisecond},
	{ID: "lhr-1", Region: "lhr", Status: HostSuspect, RTT: 6 * time.Millisecond},
}

// mk is a healthy started machine of app "web" with a service on port 80
// (internal 8080) and on 5000-5009 (internal 9000), default limits.
func mk(id, host string, opts ...func(*Machine)) Machine {
	region, _, _ := strings.Cut(host, "-")
	m := Machine{
		ID: id, InstanceID: "inst-" + id, App: "web", Region: region, Host: host,
		PrivateIP: "fdaa::" + id, Started: true, Healthy: true,
		Services: []Service{
			{InternalPort: 8080, Ports: []PortRange{{Start: 80, End: 80}, {Start: 443, End: 443}}},
			{InternalPort: 9000, Ports: []PortRange{{Start: 5000, End: 5009}}},
		},
	}
	for _, o := range opts {
		o(&m)
	}
	return m
}

func stopped(m *Machine)   { m.Started = false }
func cordoned(m *Machine)  { m.Cordoned = true }
func unhealthy(m *Machine) { m.Healthy = false }
func noAddr(m *Machine)    { m.PrivateIP = "" }
func limits(soft, hard int) func(*Machine) {
	return func(m *Machine) {
		for i := range m.Services {
			m.Services[i].SoftLimit, m.Services[i].HardLimit = soft, hard
		}
	}
}

type liveLoad map[string]int

func (l liveLoad) InFlight(id string) int { return l[id] }

// demoting is a Load that demotes the machines and hosts it names.
type demoting struct {
	liveLoad
	names map[string]bool
}

func (d demoting) Demoted(id, host string) bool { return d.names[id] || d.names[host] }

func ids(ts []*Target) []string {
	out := []string{}
	for _, t := range ts {
		out = append(out, t.MachineID)
	}
	return out
}

func TestSelect(t *testing.T) {
	tests := []struct {
		name     string
		machines []Machine
		load     map[string]int // published
		live     liveLoad
		q        Query
		want     []string
	}{
		{
			name:     "least loaded first in the edge's region, then the nearest regions",
			machines: []Machine{mk("a", "ams-1"), mk("b", "ams-2"), mk("f", "fra-1"), mk("i", "iad-1"), mk("s", "syd-1")},
			load:     map[string]int{"a": 3, "b": 1},
			want:     []string{"b", "a", "f", "i", "s"},
		},
		{
			name:     "equal load: closer by RTT first",
			machines: []Machine{mk("b", "ams-2"), mk("a", "ams-1")},
			want:     []string{"a", "b"},
		},
		{
			name:     "a local machine at its soft limit still beats leaving the region",
			machines: []Machine{mk("a", "ams-1"), mk("b", "ams-2"), mk("f", "fra-1")},
			load:     map[string]int{"a": 20, "b": 5},
			want:     []string{"b", "a", "f"},
		},
		{
			name:     "over the soft limit: only when every other is too",
			machines: []Machine{mk("a", "ams-1", limits(2, 10)), mk("b", "ams-2", limits(2, 10))},
			load:     map[string]int{"a": 2, "b": 9},
			live:     liveLoad{},
			want:     []string{"a", "b"},
		},
		{
			name:     "every local machine at its hard limit: spill to the nearest region",
			machines: []Machine{mk("a", "ams-1"), mk("b", "ams-2"), mk("i", "iad-1"), mk("f", "fra-1")},
			load:     map[string]int{"a": 25, "b": 30},
			want:     []string{"f", "i"},
		},
		{
			name: "every local machine unhealthy, cordoned, stopped, addressless or on a dead host: spill",
			machines: []Machine{
				mk("a", "ams-1", unhealthy), mk("b", "ams-2", cordoned), mk("c", "ams-1", stopped),
				mk("d", "ams-9"), mk("e", "ams-2", noAddr), mk("s", "syd-1"), mk("f", "fra-1"),
			},
			want: []string{"f", "s"},
		},
		{
			name:     "a machine on a dead host gets nothing, even far away",
			machines: []Machine{mk("s1", "syd-1"), mk("s2", "syd-2")},
			want:     []string{"s1"},
		},
		{
			name:     "away: the nearer region first even when busier",
			machines: []Machine{mk("i", "iad-1"), mk("f", "fra-1")},
			load:     map[string]int{"f": 15, "i": 0},
			want:     []string{"f", "i"},
		},
		{
			name:     "away: a region under its soft limit before a nearer one over it",
			machines: []Machine{mk("i", "iad-1"), mk("f", "fra-1")},
			load:     map[string]int{"f": 21},
			want:     []string{"i", "f"},
		},
		{
			name:     "machines on a suspect host come after every live one",
			machines: []Machine{mk("l", "lhr-1"), mk("s", "syd-1"), mk("a", "ams-1", unhealthy)},
			want:     []string{"s", "l"},
		},
		{
			name:     "live load counts when above what was published",
			machines: []Machine{mk("a", "ams-1"), mk("b", "ams-2")},
			load:     map[string]int{"a": 1, "b": 2},
			live:     liveLoad{"a": 5},
			want:     []string{"b", "a"},
		},
		{
			name:     "live load at the hard limit excludes",
			machines: []Machine{mk("a", "ams-1", limits(1, 2)), mk("f", "fra-1")},
			live:     liveLoad{"a": 2},
			want:     []string{"f"},
		},
		{
			name:     "fly-prefer-region: that region first, then the edge's own",
			machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1"), mk("s", "syd-1")},
			q:        Query{PreferRegion: "syd"},
			want:     []string{"s", "a", "f"},
		},
		{
			name:     "fly-prefer-region with nothing there: the usual order",
			machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1")},
			q:        Query{PreferRegion: "nrt"},
			want:     []string{"a", "f"},
		},
		{
			name:     "fly-force-region: only that region",
			machines: []Machine{mk("a", "ams-1"), mk("i", "iad-1"), mk("s", "syd-1")},
			q:        Query{ForceRegion: "iad"},
			want:     []string{"i"},
		},
		{
			name:     "fly-force-region with every machine there at its hard limit: nothing",
			machines: []Machine{mk("a", "ams-1"), mk("i", "iad-1", limits(1, 1))},
			load:     map[string]int{"i": 1},
			q:        Query{ForceRegion: "iad"},
			want:     []string{},
		},
		{
			name:     "fly-prefer-instance-id: that machine first, however far or busy",
			machines: []Machine{mk("a", "ams-1"), mk("s", "syd-1"), mk("f", "fra-1")},
			load:     map[string]int{"s": 19},
			q:        Query{PreferInstance: "s"},
			want:     []string{"s", "a", "f"},
		},
		{
			name:     "fly-prefer-instance-id by instance id",
			machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1")},
			q:        Query{PreferInstance: "inst-f"},
			want:     []string{"f", "a"},
		},
		{
			name:     "fly-prefer-instance-id at its hard limit: the usual order",
			machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1")},
			load:     map[string]int{"f": 25},
			q:        Query{PreferInstance: "f"},
			want:     []string{"a"},
		},
		{
			name:     "fly-force-instance-id: only that machine",
			machines: []Machine{mk("a", "ams-1"), mk("s", "syd-1")},
			q:        Query{ForceInstance: "inst-s"},
			want:     []string{"s"},
		},
		{
			name:     "fly-force-instance-id of a failing machine: nothing",
			machines: []Machine{mk("a", "ams-1"), mk("s", "syd-1", unhealthy)},
			q:        Query{ForceInstance: "s"},
			want:     []string{},
		},
		{
			name:     "a port range routes to the service that declares it",
			machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1")},
			q:        Query{Port: 5003},
			want:     []string{"a", "f"},
		},
		{
			name:     "no service on the port: nothing",
			machines: []Machine{mk("a", "ams-1")},
			q:        Query{Port: 81},
			want:     []string{},
		},
		{
			name:     "another app's machines are never candidates",
			machines: []Machine{mk("a", "ams-1", func(m *Machine) { m.App = "other" }), mk("f", "fra-1")},
			want:     []string{"f"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: tt.machines, Load: tt.load})
			q := tt.q
			if q.Port == 0 {
				q.Port = 80
			}
			var live Load
			if tt.live != nil {
				live = tt.live
			}
			// The order must not depend on the tie-breaking draw when
			// nothing ties.
			for r := range uint64(20) {
				q.Rand = r * 0x9e3779b97f4a7c15
				got := ids(tab.Select("web", q, live, make([]*Target, 0, MaxCandidates)))
				if !slices.Equal(got, tt.want) {
					t.Fatalf("rand %d: got %v, want %v", r, got, tt.want)
				}
			}
		})
	}
}

// TestRegionsRankedByMeasuredRTT: other regions are ranked by the RTT to
// their nearest live host, whatever their names; a region whose RTT is not
// measured yet, or whose hosts are all down, comes after every measured one.
func TestRegionsRankedByMeasuredRTT(t *testing.T) {
	hosts := []Host{
		{ID: "ams-1", Region: "ams", Status: HostAlive},
		{ID: "aaa-1", Region: "aaa", Status: HostAlive},                             // not measured yet
		{ID: "bbb-1", Region: "bbb", Status: HostDown, RTT: time.Millisecond},       // down: its RTT does not count
		{ID: "bbb-2", Region: "bbb", Status: HostAlive, RTT: 90 * time.Millisecond}, // bbb's nearest live host
		{ID: "zzz-1", Region: "zzz", Status: HostAlive, RTT: 40 * time.Millisecond},
		{ID: "zzz-2", Region: "zzz", Status: HostAlive, RTT: 60 * time.Millisecond},
	}
	ms := []Machine{mk("a", "aaa-1"), mk("b", "bbb-2"), mk("z2", "zzz-2"), mk("z1", "zzz-1")}
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: hosts, Machines: ms, Load: map[string]int{"z1": 3}})
	got := ids(tab.Select("web", Query{Port: 80}, nil, make([]*Target, 0, 8)))
	// Within zzz the less loaded machine goes first, though farther.
	if want := []string{"z2", "z1", "b", "a"}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
}

// TestDemotedGoLast: machines that failed recently, or on hosts that did,
// are tried after every other, suspect hosts included, in their usual order.
func TestDemotedGoLast(t *testing.T) {
	ms := []Machine{mk("a", "ams-1"), mk("b", "ams-2"), mk("f", "fra-1"), mk("l", "lhr-1"), mk("i", "iad-1")}
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms})
	d := demoting{names: map[string]bool{"a": true, "fra-1": true}}
	got := ids(tab.Select("web", Query{Port: 80}, d, make([]*Target, 0, 8)))
	if want := []string{"b", "i", "l", "a", "f"}; !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	out := make([]*Target, 0, MaxCandidates)
	var load Load = d
	if allocs := testing.AllocsPerRun(100, func() { tab.Select("web", Query{Port: 80}, load, out) }); allocs != 0 {
		t.Errorf("%v allocations with a Demoter", allocs)
	}
}

func TestSelectTarget(t *testing.T) {
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []Machine{mk("a", "ams-1"), mk("f", "fra-1")}})
	got := tab.Select("web", Query{Port: 443}, nil, make([]*Target, 0, 2))
	if len(got) != 2 {
		t.Fatalf("got %d candidates", len(got))
	}
	a, f := got[0], got[1]
	if a.Addr != "fdaa::a" || a.Port != 8080 || !a.OnSelf || a.Host != "ams-1" || a.Region != "ams" || a.InstanceID != "inst-a" {
		t.Errorf("local target %+v", *a)
	}
	if f.OnSelf || f.Host != "fra-1" {
		t.Errorf("remote target %+v", *f)
	}
	got = tab.Select("web", Query{Port: 5009}, nil, make([]*Target, 0, 1))
	if len(got) != 1 || got[0].Port != 9000 {
		t.Errorf("range target: %v", got)
	}
	if tg := tab.OnSelf("web", 80, "a"); tg == nil || tg.Port != 8080 {
		t.Errorf("OnSelf(a) = %v", tg)
	}
	if tg := tab.OnSelf("web", 5001, "a"); tg == nil || tg.Port != 9000 {
		t.Errorf("OnSelf(a, range) = %v", tg)
	}
	if tg := tab.OnSelf("web", 80, "f"); tg != nil {
		t.Errorf("OnSelf of a machine on another host = %+v", *tg)
	}
	if tg := tab.OnSelf("nope", 80, "a"); tg != nil {
		t.Errorf("OnSelf of an unknown app = %+v", *tg)
	}
}

func TestSelectBoundedByCapacity(t *testing.T) {
	var ms []Machine
	for i := range 30 {
		m := mk(fmt.Sprintf("m%02d", i), "ams-2")
		ms = append(ms, m)
	}
	load := map[string]int{}
	for i := range 30 {
		load[fmt.Sprintf("m%02d", i)] = 30 - i // m29 the least loaded
	}
	load["m00"] = 0
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms, Load: load})
	got := ids(tab.Select("web", Query{Port: 80}, nil, make([]*Target, 0, 3)))
	if want := []string{"m00", "m29", "m28"}; !slices.Equal(got, want) {
		t.Errorf("cap 3: got %v, want %v", got, want)
	}
	got = ids(tab.Select("web", Query{Port: 80}, nil, make([]*Target, 0, 100)))
	if len(got) != MaxCandidates || got[MaxCandidates-1] != "m23" {
		t.Errorf("cap 100: got %v, want the %d best", got, MaxCandidates)
	}
	if got := tab.Select("web", Query{Port: 80}, nil, nil); len(got) != 0 {
		t.Errorf("no room: got %v", ids(got))
	}
}

func TestTiesSpreadEvenly(t *testing.T) {
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []Machine{mk("a", "ams-2"), mk("b", "ams-2"), mk("c", "ams-2"), mk("d", "ams-2")}})
	first := map[string]int{}
	const n = 4000
	for r := range uint64(n) {
		got := tab.Select("web", Query{Port: 80, Rand: r}, nil, make([]*Target, 0, 4))
		if len(got) != 4 {
			t.Fatalf("got %d candidates", len(got))
		}
		first[got[0].MachineID]++
	}
	for _, id := range []string{"a", "b", "c", "d"} {
		// A fair split is 1000 each; the hash is deterministic, so this
		// bound either always holds or never does.
		if c := first[id]; c < 800 || c > 1200 {
			t.Errorf("%s first %d times of %d: %v", id, c, n, first)
		}
	}
}

func TestLimits(t *testing.T) {
	tests := []struct {
		soft, hard         int
		wantSoft, wantHard int
	}{
		{0, 0, DefaultSoftLimit, DefaultHardLimit},
		{5, 0, 5, DefaultHardLimit},
		{40, 0, 40, 40},
		{10, 4, 10, 10},
		{0, 100, DefaultSoftLimit, 100},
	}
	for _, tt := range tests {
		tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []Machine{mk("a", "ams-1", limits(tt.soft, tt.hard))}})
		tg := tab.Targets("web", 80)[0]
		if tg.SoftLimit != tt.wantSoft || tg.HardLimit != tt.wantHard {
			t.Errorf("soft %d hard %d: got %d/%d, want %d/%d", tt.soft, tt.hard, tg.SoftLimit, tg.HardLimit, tt.wantSoft, tt.wantHard)
		}
	}
}

func TestBuildIgnoresBadFacts(t *testing.T) {
	dup := mk("a", "fra-1")
	orphan := mk("o", "nowhere-1")
	badPort := mk("p", "ams-1", func(m *Machine) {
		m.Services = []Service{{InternalPort: 1, Ports: []PortRange{{Start: 0, End: 0}, {Start: 90, End: 80}}}}
	})
	twice := mk("t", "ams-2", func(m *Machine) {
		m.Services = []Service{{InternalPort: 1, Ports: []PortRange{{Start: 80, End: 80}}}, {InternalPort: 2, Ports: []PortRange{{Start: 80, End: 80}}}}
	})
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []Machine{mk("a", "ams-1"), dup, orphan, badPort, twice, {ID: "x"}}})
	got := tab.Targets("web", 80)
	if len(got) != 3 {
		t.Fatalf("targets on 80: %v", ids(got))
	}
	if got[0].Host != "ams-1" {
		t.Errorf("a duplicate id replaced the first: %+v", *got[0])
	}
	if got[1].Excluded != HostNotAlive {
		t.Errorf("a machine on an unknown host: %v", got[1].Excluded)
	}
	if got[2].MachineID != "t" || got[2].Port != 1 {
		t.Errorf("a port claimed twice by one machine: %+v", *got[2])
	}
	if tab.HasApp("") {
		t.Error("a machine without an app made an app")
	}
}

func TestExplain(t *testing.T) {
	ms := []Machine{
		mk("a", "ams-1", unhealthy), mk("b", "ams-2", unhealthy), mk("c", "ams-1", stopped),
		mk("d", "ams-9"), mk("e", "ams-2", cordoned), mk("f", "fra-1", limits(1, 1)),
	}
	tab := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms, Load: map[string]int{"f": 1}})
	tests := []struct {
		q    Query
		app  string
		want string
	}{
		{Query{Port: 80}, "web", `none of 6 machine(s) of app "web" can take the request: 1 not started, 1 cordoned, 2 failing checks, 1 host not alive, 1 at hard limit`},
		{Query{Port: 80}, "nope", `no machine of app "nope" is known`},
		{Query{Port: 81}, "web", `app "web" has 6 machine(s) but none with a service on port 81`},
		{Query{Port: 80, ForceRegion: "syd"}, "web", `app "web" has no machine in region "syd" (fly-force-region) with a service on port 80`},
		{Query{Port: 80, ForceRegion: "fra"}, "web", `none of 1 machine(s) in region "fra" (fly-force-region) of app "web" can take the request: 1 at hard limit`},
		{Query{Port: 80, ForceInstance: "zz"}, "web", `instance "zz" (fly-force-instance-id) is not a machine of app "web" with a service on port 80`},
		{Query{Port: 80, ForceInstance: "inst-e"}, "web", `none of 1 machine(s) matching instance "inst-e" (fly-force-instance-id) of app "web" can take the request: 1 cordoned`},
	}
	for _, tt := range tests {
		if got := tab.Select(tt.app, tt.q, nil, make([]*Target, 0, 8)); len(got) != 0 {
			t.Errorf("%+v: selected %v", tt.q, ids(got))
		}
		if got := tab.Explain(tt.app, tt.q, nil); got != tt.want {
			t.Errorf("%s %+v:\n got %s\nwant %s", tt.app, tt.q, got, tt.want)
		}
	}
}

// TestSelectAllocatesNothing: choosing a route costs no allocation, whatever
// the headers.
func TestSelectAllocatesNothing(t *testing.T) {
	tab, queries := benchTable(100)
	out := make([]*Target, 0, MaxCandidates)
	live := liveLoad{"web-0001": 3}
	for _, q := range queries {
		allocs := testing.AllocsPerRun(100, func() {
			if len(tab.Select("app-7", q, live, out)) == 0 {
				t.Fatalf("%+v: no candidate", q)
			}
		})
		if allocs != 0 {
			t.Errorf("%+v: %v allocations per selection", q, allocs)
		}
	}
}

// TestRawTCPPorts: ports served as raw TCP are listed with the apps that
// declare them (ranges port by port), and a selection takes only the
// targets served the way the query asks: raw for a TCP connection, HTTP for
// a request.
func TestRawTCPPorts(t *testing.T) {
	raw := func(app string, h Handler, ports ...PortRange) func(*Machine) {
		return func(m *Machine) {
			m.App = app
			for i := range ports {
				ports[i].Handler = h
			}
			m.Services = append(m.Services, Service{InternalPort: 7000, Ports: ports})
		}
	}
	tb := Build(Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []Machine{
		mk("a1", "ams-1", raw("db", HandlerTCP, PortRange{Start: 5432, End: 5432})),
		mk("a2", "ams-2", raw("db", HandlerProxyProto, PortRange{Start: 5432, End: 5432})),
		mk("b1", "ams-1", raw("games", HandlerTCP, PortRange{Start: 7000, End: 7002})),
		mk("c1", "fra-1", raw("rival", HandlerTCP, PortRange{Start: 7002, End: 7002})),
	}})
	want := map[int][]string{5432: {"db"}, 7000: {"games"}, 7001: {"games"}, 7002: {"games", "rival"}}
	got := tb.TCPPorts()
	if len(got) != len(want) {
		t.Fatalf("TCPPorts %v, want %v", got, want)
	}
	for port, apps := range want {
		if !slices.Equal(got[port], apps) {
			t.Errorf("port %d: %v, want %v", port, got[port], apps)
		}
	}
	var buf [MaxCandidates]*Target
	tcp := tb.Select("db", Query{Port: 5432, TCP: true}, nil, buf[:0])
	if len(tcp) != 2 || tcp[0].MachineID != "a1" || tcp[1].Handler != HandlerProxyProto {
		t.Errorf("raw TCP selection: %v", tcp)
	}
	if l := tb.Select("db", Query{Port: 5432}, nil, buf[:0]); len(l) != 0 {
		t.Errorf("an HTTP request was given raw TCP targets: %v", l)
	}
	if l := tb.Select("db", Query{Port: 80, TCP: true}, nil, buf[:0]); len(l) != 0 {
		t.Errorf("a raw TCP connection was given HTTP targets: %v", l)
	}
}
