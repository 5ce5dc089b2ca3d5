package sandbox

import (
	"context"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/driver"
)

// bareConfig is a driver of the test's own with the layout of before
// orgs: one prefix for the host's machines, one bridge, no filter.
func bareConfig(t testing.TB) Config {
	cfg := testConfig(t)
	cfg.Network, cfg.Host = 0, 0
	cfg.HostPrefix = netip.MustParsePrefix("fdaa:" + randHex(4) + ":1::/64")
	return cfg
}

// BenchmarkMachineToMachine measures, between two machines on one host,
// one-byte TCP round trips (p50 and p99) and TCP throughput, with the
// org filter and on the bare bridge (a driver without it), side by side
// in one run, the two alternating round by round so that the machine's
// load falls on both alike.
func BenchmarkMachineToMachine(b *testing.B) {
	type side struct {
		name  string
		d     *Driver
		from  driver.Spec
		to    netip.Addr
		rtt50 []float64
		rtt99 []float64
		tput  []float64
	}
	var sides []*side
	for _, s := range []struct {
		name string
		cfg  Config
	}{{"filtered", testConfig(b)}, {"bare", bareConfig(b)}} {
		d := newDriver(b, s.cfg)
		from := testSpec(b, "busybox", "-c", "exec /bin/probe "+netProbeCommand+" serve")
		to := testSpec(b, "busybox", "-c", "exec /bin/probe "+netProbeCommand+" serve")
		start(b, d, from)
		start(b, d, to)
		waitLog(b, to.LogPath, "serving")
		addr, _ := d.PrivateIP(to)
		sides = append(sides, &side{name: s.name, d: d, from: from, to: addr})
	}
	run := func(s *side, args ...string) []float64 {
		res, err := s.d.Exec(context.Background(), s.from, append([]string{"/bin/probe", netProbeCommand}, args...), nil)
		if err != nil {
			b.Fatal(err)
		}
		var out []float64
		for _, f := range strings.Fields(string(res.Stdout)) {
			v, err := strconv.ParseFloat(f, 64)
			if err != nil {
				b.Fatalf("%s %v: %q", s.name, args, res.Stdout)
			}
			out = append(out, v)
		}
		return out
	}
	rounds := max(b.N, 3)
	for range rounds {
		for _, s := range sides {
			r := run(s, "rtt", s.to.String(), "8082", "2000")
			s.rtt50, s.rtt99 = append(s.rtt50, r[0]), append(s.rtt99, r[1])
			s.tput = append(s.tput, run(s, "tput", s.to.String(), "8082", "256")[0])
		}
	}
	med := func(v []float64) float64 { slices.Sort(v); return v[len(v)/2] }
	for _, s := range sides {
		b.ReportMetric(med(s.rtt50), s.name+"-rtt-p50-µs")
		b.ReportMetric(med(s.rtt99), s.name+"-rtt-p99-µs")
		b.ReportMetric(med(s.tput), s.name+"-MiB/s")
	}
	b.ReportMetric(0, "ns/op")
}

// BenchmarkFilterPort times what the filter adds to a start and a
// cleanup: a machine's chain and map entry installed, and removed.
func BenchmarkFilterPort(b *testing.B) {
	d := newDriver(b, testConfig(b))
	var add, del time.Duration
	for i := range b.N {
		addr, _ := d.place(driver.Spec{MachineID: "bench", Org: 1})
		a, _ := addr.Addr(uint64(i) + 2)
		port := port{index: 1<<30 + i, mac: machineMAC("bench"), addr: a, org: 1}
		t0 := time.Now()
		if err := d.filter.allow(port); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if err := d.filter.forget(port); err != nil {
			b.Fatal(err)
		}
		add, del = add+t1.Sub(t0), del+time.Since(t1)
	}
	b.ReportMetric(float64(add.Microseconds())/float64(b.N), "allow-µs")
	b.ReportMetric(float64(del.Microseconds())/float64(b.N), "forget-µs")
	b.ReportMetric(0, "ns/op")
}
