package route

import (
	"fmt"
	"testing"
	"time"
)

// benchTable is a cluster of 60 hosts in 12 regions and 50 apps of n
// machines each, spread over every region, with published load; and the
// queries a benchmark cycles through: plain, with each routing header.
//
//	go test ./internal/proxy/route -run '^$' -bench . -benchmem -cpu 1
func benchTable(n int) (*Table, []Query) {
	regions := []string{"ams", "fra", "lhr", "cdg", "iad", "ord", "sjc", "gru", "syd", "nrt", "sin", "jnb"}
	var hosts []Host
	for i, r := range regions {
		for j := range 5 {
			hosts = append(hosts, Host{ID: fmt.Sprintf("%s-%d", r, j), Region: r, Status: HostAlive, RTT: time.Duration(i*20+j+1) * time.Millisecond})
		}
	}
	hosts[0].RTT = 0
	var ms []Machine
	load := map[string]int{}
	for a := range 50 {
		for i := range n {
			h := hosts[(i*7+a)%len(hosts)]
			id := fmt.Sprintf("%s-%04d", map[bool]string{true: "web", false: fmt.Sprintf("a%02d", a)}[a == 7], i)
			ms = append(ms, Machine{
				ID: id, InstanceID: "i" + id, App: fmt.Sprintf("app-%d", a), Region: h.Region, Host: h.ID,
				PrivateIP: "fdaa::1", Started: true, Healthy: i%13 != 0,
				Services: []Service{{InternalPort: 8080, Ports: []PortRange{{Start: 80, End: 80}, {Start: 443, End: 443}}}},
			})
			load[id] = (i * 31) % 27
		}
	}
	t := Build(Facts{Self: "ams-0", Region: "ams", Hosts: hosts, Machines: ms, Load: load})
	queries := []Query{
		{Port: 80},
		{Port: 443, PreferRegion: "syd"},
		{Port: 80, ForceRegion: "iad"},
		{Port: 80, PreferInstance: "web-0003"},
		{Port: 80, ForceInstance: "iweb-0004"},
	}
	return t, queries
}

func BenchmarkSelect(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		tab, queries := benchTable(n)
		b.Run(fmt.Sprintf("machines=%d", n), func(b *testing.B) {
			out := make([]*Target, 0, MaxCandidates)
			live := liveLoad{"web-0001": 3}
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				q := queries[i%len(queries)]
				q.Rand = uint64(i)
				out = tab.Select("app-7", q, live, out)
				i++
			}
		})
	}
}
