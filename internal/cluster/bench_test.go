package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"runtime/metrics"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/netsim"
)

// The benchmarks run whole clusters on the simulated network with the geo
// model's latencies between ten regions around the world (Sydney–Amsterdam
// 250 ms RTT; 1 ms within a region). Run one at a time, e.g.
//
//	go test ./internal/cluster -run '^$' -bench Propagation/hosts=100 -benchtime 30x
//
// FLAME_BENCH_LATENCY_SCALE divides every latency (1 by default).
// FLAME_BENCH_DILATION=k runs the simulation k times slower than real time:
// every latency and every timing of the protocol (Config.Dilation) is
// multiplied by k, and every duration measured is divided by k, so a
// cluster that needs more CPU than the machine has can still be measured.
// Each benchmark reports the cores the simulation used and the scheduling
// delays it saw: with cores to spare and small delays, the dilated run is
// the real-time run the machine could not afford.
// FLAME_BENCH_REGIONAL=0 runs every member without its regional failure
// detector (Config.NoRegionDetector), the cluster-wide memberlist alone.
// Bytes sent are counted per detector: the regional memberlist's datagrams
// and streams (those the mux tags with regionTag) apart from the rest.

var benchRegions = []string{"ams", "iad", "syd", "sin", "gru", "fra", "lax", "nrt", "jnb", "ord"}

func regionOf(name string) string { r, _, _ := strings.Cut(name, "-"); return r }

func benchDilation() time.Duration {
	k, _ := strconv.Atoi(os.Getenv("FLAME_BENCH_DILATION"))
	return time.Duration(max(k, 1))
}

// dilate stretches a real-time duration into the simulation's time;
// undilate turns a measurement back.
func dilate(d time.Duration) time.Duration   { return d * benchDilation() }
func undilate(d time.Duration) time.Duration { return d / benchDilation() }

func geoLatency() func(from, to string) time.Duration {
	scale, _ := strconv.Atoi(os.Getenv("FLAME_BENCH_LATENCY_SCALE"))
	scale = max(scale, 1)
	rtt := map[[2]string]time.Duration{}
	for _, a := range benchRegions {
		for _, b := range benchRegions {
			ra, _ := geo.Lookup(a)
			rb, _ := geo.Lookup(b)
			rtt[[2]string{a, b}] = dilate(geo.RTT(ra, rb) / 2 / time.Duration(scale))
		}
	}
	return func(from, to string) time.Duration { return rtt[[2]string{regionOf(from), regionOf(to)}] }
}

// benchTimings follows the package doc's rule for clusters spanning the
// world: the probe timeout above the worst round trip, the interval twice
// that. At the default timings that rule changes nothing below ~150 ms.
func benchTimings() (interval, timeout time.Duration) {
	scale, _ := strconv.Atoi(os.Getenv("FLAME_BENCH_LATENCY_SCALE"))
	scale = max(scale, 1)
	var worst time.Duration
	for _, a := range benchRegions {
		for _, b := range benchRegions {
			ra, _ := geo.Lookup(a)
			rb, _ := geo.Lookup(b)
			worst = max(worst, geo.RTT(ra, rb)/time.Duration(scale))
		}
	}
	if worst*5/4+20*time.Millisecond <= DefaultProbeTimeout {
		return 0, 0
	}
	timeout = worst*5/4 + 20*time.Millisecond
	return 2 * timeout, timeout
}

// keptSims are simulations of more than 100 hosts, by size. Go runs every
// benchmark once with b.N = 1 before the run it measures, and a thousand
// hosts take many minutes to set up: such a simulation is set up once,
// kept for the second run, and closed only when the process ends.
var (
	keptSims       = map[int]*simCluster{}
	keptIdle       = map[int]float64{} // their idle traffic, B/s a host
	keptRegionIdle = map[int]float64{} // the regional detectors' part of it
)

// benchSim starts n members and waits until every one sees all n alive.
// mod, when not nil, adjusts each member's configuration.
func benchSim(b *testing.B, n int, logs slog.Handler, mod func(*Config)) *simCluster {
	b.Helper()
	keep := n > 100 && mod == nil
	if sim := keptSims[n]; keep && sim != nil {
		return sim
	}
	netCfg := netsim.Config{Seed: 1, Latency: geoLatency()}
	var sim *simCluster
	closeAtEnd := b.Cleanup
	if keep {
		sim = openSim(b, netCfg)
		keptSims[n] = sim
		closeAtEnd = func(func()) {}
	} else {
		sim = newSim(b, netCfg)
	}
	logger := slog.New(logs)
	// FLAME_BENCH_SIGNED=1: every host enrolled and keyed, its records
	// signed and checked, its gossip encrypted (trust.go).
	var signedPKI *testPKI
	if os.Getenv("FLAME_BENCH_SIGNED") == "1" {
		signedPKI = newTestPKI(b)
	}
	setup := time.Now()
	var cs []*Cluster
	for i := range n {
		id := fmt.Sprintf("%s-%d", benchRegions[i%len(benchRegions)], i)
		if _, err := sim.net.AddHost(id); err != nil {
			b.Fatal(err)
		}
		tr, err := sim.net.Transport(id, 7946)
		if err != nil {
			b.Fatal(err)
		}
		interval, timeout := benchTimings()
		cfg := Config{HostID: id, Region: regionOf(id), Transport: countingTransport{tr, regionCounter(sim)}, Logger: logger,
			Capacity: Resources{CPUs: 16, MemoryMB: 65536}, ProbeInterval: interval, ProbeTimeout: timeout,
			Dilation: int(benchDilation()), NoRegionDetector: os.Getenv("FLAME_BENCH_REGIONAL") == "0"}
		if signedPKI != nil {
			cfg.GossipKeys, cfg.Trust = [][]byte{testGossipKey}, signedPKI.trust(id)
		}
		if mod != nil {
			mod(&cfg)
		}
		c, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		closeAtEnd(func() { c.Close() })
		sim.hosts[id] = c
		sim.ids = append(sim.ids, id)
		sim.addrs[id] = tr.Addr()
		cs = append(cs, c)
		if err := c.Publish(HostFacts{Machines: machines(strings.ReplaceAll(id, "-", "m"), "app"+strconv.Itoa(i%7), regionOf(id), 3)}); err != nil {
			b.Fatal(err)
		}
	}
	started := time.Since(setup)
	// b.Log is printed when the benchmark ends; a setup of many minutes
	// shows its progress as it goes.
	progress := func(format string, args ...any) {
		b.Logf(format, args...)
		if n > 100 {
			fmt.Fprintf(os.Stderr, format+"\n", args...)
		}
	}
	// Small clusters join all at once, each host to one of the first few.
	// Larger ones join in waves of 50 hosts a (simulated) second, each host
	// to a random one already in: how a fleet is brought up, and what keeps
	// the machine below saturation while a thousand hosts join.
	wave := n
	if n > 100 {
		wave = 50
	}
	rng := rand.New(rand.NewPCG(7, 8))
	for first := 1; first < n; first += wave {
		tick := time.Now()
		var wg sync.WaitGroup
		for i := first; i < min(first+wave, n); i++ {
			seed := sim.ids[i%min(4, i)]
			if wave < n {
				seed = sim.ids[rng.IntN(first)]
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := cs[i].Join([]string{sim.addrs[seed]}); err != nil {
					b.Error(err)
				}
			}()
		}
		wg.Wait()
		if wave < n {
			time.Sleep(time.Until(tick.Add(dilate(time.Second))))
			if first/wave%5 == 4 {
				progress("%d hosts: %d joined", n, min(first+wave, n))
			}
		}
	}
	joined := time.Since(setup) - started
	progress("%d hosts: started in %s, joined in %s", n, started.Round(time.Second), joined.Round(time.Second))
	// whole reports whether c sees every host alive with its facts.
	whole := func(c *Cluster) bool {
		s := c.Snapshot()
		if len(s.Hosts()) != n {
			return false
		}
		for _, h := range s.Hosts() {
			if h.Status != StatusAlive || h.Version == 0 {
				return false
			}
		}
		return true
	}
	defer func() {
		if b.Failed() {
			// A summary, and a few examples: a line per missing fact
			// would be a million lines at N=1000.
			count := map[string]int{}
			examples := 0
			for _, c := range cs {
				for _, h := range c.Snapshot().Hosts() {
					count[fmt.Sprintf("%s/v0=%v", h.Status, h.Version == 0)]++
					if h.Version == 0 && examples < 10 {
						examples++
						b.Logf("%s lacks %s: stats %+v; owner's own version %d", c.cfg.HostID, h.ID, c.Stats(), sim.hosts[h.ID].Snapshot().Host(h.ID).Version)
					}
				}
				count[fmt.Sprintf("hosts=%d", len(c.Snapshot().Hosts()))]++
			}
			b.Logf("views: %v", count)
		}
	}()
	// 90 s, or 0.2 s a host in larger clusters; progress every 30 s.
	wait := dilate(max(90*time.Second, time.Duration(n)*200*time.Millisecond))
	converging, next := time.Now(), time.Now().Add(30*time.Second)
	waitFor(b, wait, "the cluster to converge", func() bool {
		done := 0
		for _, c := range cs {
			if whole(c) {
				done++
			} else if time.Now().Before(next) {
				return false
			}
		}
		if time.Now().After(next) {
			count := map[string]int{}
			lacking := map[string]int{} // owner → hosts lacking its facts
			var st Stats
			for _, c := range cs {
				for _, h := range c.Snapshot().Hosts() {
					count[fmt.Sprintf("%s/v0=%v", h.Status, h.Version == 0)]++
					if h.Version == 0 {
						lacking[h.ID]++
					}
				}
				s := c.Stats()
				st.FullSent += s.FullSent
				st.SendsDropped += s.SendsDropped
				st.Dropped += s.Dropped
				st.Pulls += s.Pulls
			}
			spread := map[string]int{}
			for _, k := range lacking {
				spread[fmt.Sprintf("<=%d", int(math.Pow(10, math.Ceil(math.Log10(float64(k))))))]++
			}
			progress("%d hosts: %d see all alive with their facts after %s; views %v; owners by hosts lacking them %v; full facts sent %d, sends dropped %d, records dropped %d, pulls %d",
				n, done, time.Since(converging).Round(time.Second), count, spread, st.FullSent, st.SendsDropped, st.Dropped, st.Pulls)
			next = time.Now().Add(30 * time.Second)
		}
		return done == n
	})
	progress("%d hosts: converged in %s", n, time.Since(converging).Round(time.Second))
	return sim
}

func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	ds = slices.Clone(ds)
	slices.Sort(ds)
	return ds[min(len(ds)-1, int(float64(len(ds))*p))]
}

// ms is d in fractional milliseconds: a dilated run measures below 1 ms.
func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// regionSent counts, per simulation, the bytes its members' regional
// detectors sent.
var regionSent = map[*simCluster]*atomic.Uint64{}

func regionCounter(sim *simCluster) *atomic.Uint64 {
	if regionSent[sim] == nil {
		regionSent[sim] = new(atomic.Uint64)
	}
	return regionSent[sim]
}

// countingTransport counts what the regional memberlist sends: datagrams
// that start with regionTag, and streams whose first write is it.
type countingTransport struct {
	memberlist.NodeAwareTransport
	region *atomic.Uint64
}

func (t countingTransport) count(b []byte) {
	if len(b) > 0 && b[0] == regionTag {
		t.region.Add(uint64(len(b)))
	}
}

func (t countingTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	t.count(b)
	return t.NodeAwareTransport.WriteTo(b, addr)
}

func (t countingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	t.count(b)
	return t.NodeAwareTransport.WriteToAddress(b, a)
}

func (t countingTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	return t.DialAddressTimeout(memberlist.Address{Addr: addr}, timeout)
}

func (t countingTransport) DialAddressTimeout(a memberlist.Address, timeout time.Duration) (net.Conn, error) {
	c, err := t.NodeAwareTransport.DialAddressTimeout(a, timeout)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, region: t.region}, nil
}

// countingConn counts a dialed stream's writes once its first write shows
// it is the regional memberlist's.
type countingConn struct {
	net.Conn
	region  *atomic.Uint64
	decided bool
	counted bool
}

func (c *countingConn) Write(b []byte) (int, error) {
	if !c.decided && len(b) > 0 {
		c.decided, c.counted = true, b[0] == regionTag
	}
	n, err := c.Conn.Write(b)
	if c.counted {
		c.region.Add(uint64(n))
	}
	return n, err
}

func bytesSent(sim *simCluster) uint64 {
	var total uint64
	for _, id := range sim.ids {
		s, _, _, _ := sim.net.Stats(id)
		total += s
	}
	return total
}

// BenchmarkPropagation: one op is a check turning critical (or passing
// again) on a random host; it measures until every host of that host's
// region, and every host anywhere, sees it. Also reports gossip bytes per
// second per host, idle and under this churn.
func BenchmarkPropagation(b *testing.B) {
	for _, n := range []int{100, 1000} {
		b.Run(fmt.Sprintf("hosts=%d", n), func(b *testing.B) {
			sim := benchSim(b, n, slog.DiscardHandler, nil)
			cs := make([]*Cluster, len(sim.ids))
			for i, id := range sim.ids {
				cs[i] = sim.hosts[id]
			}
			// Idle traffic: probes, anti-entropy, membership push/pulls,
			// over one push/pull period (memberlist stretches it by
			// 1+⌈log2(n/32)⌉ past 32 hosts), so every host makes one.
			// A kept simulation measures it once, in the first run.
			idle, measured := keptIdle[n]
			regionIdle := keptRegionIdle[n]
			if !measured {
				window := DefaultPushPullInterval * time.Duration(1+max(0, int(math.Ceil(math.Log2(float64(n)/32)))))
				before, rbefore, start := bytesSent(sim), regionCounter(sim).Load(), time.Now()
				time.Sleep(dilate(window))
				secs := undilate(time.Since(start)).Seconds()
				idle = float64(bytesSent(sim)-before) / secs / float64(n)
				regionIdle = float64(regionCounter(sim).Load()-rbefore) / secs / float64(n)
				if keptSims[n] == sim {
					keptIdle[n] = idle
					keptRegionIdle[n] = regionIdle
				}
			}

			type target struct {
				machine, status string
				start           time.Time
			}
			var cur atomic.Pointer[target]
			seen := make([]atomic.Int64, n) // ns after start, per host; 0: not yet
			var wg sync.WaitGroup
			ctx, cancel := context.WithCancel(context.Background())
			for i, c := range cs {
				ch, unsub := c.Subscribe()
				wg.Add(1)
				go func() {
					defer wg.Done()
					defer unsub()
					for {
						select {
						case <-ctx.Done():
							return
						case <-ch:
						}
						t := cur.Load()
						if t == nil || seen[i].Load() != 0 {
							continue
						}
						if m := c.Snapshot().Machine(t.machine); m != nil && m.Checks[0].Status == t.status {
							seen[i].Store(int64(undilate(time.Since(t.start))))
						}
					}
				}()
			}
			rng := rand.New(rand.NewPCG(1, 2))
			var region, all []time.Duration
			before, rbefore, start := bytesSent(sim), regionCounter(sim).Load(), time.Now()
			load := startLoad()
			b.ResetTimer()
			for round := range b.N {
				h := rng.IntN(n)
				id := sim.ids[h]
				ms := machines(strings.ReplaceAll(id, "-", "m"), "app"+strconv.Itoa(h%7), regionOf(id), 3)
				// Flip the first check from what the host last published
				// (a kept simulation carries it over from the first run).
				status := CheckCritical
				if m := cs[h].Snapshot().Machine(ms[0].ID); m != nil && m.Checks[0].Status == CheckCritical {
					status = CheckPassing
				}
				for j := range ms {
					ms[j].Checks[0].Status = CheckPassing
				}
				ms[0].Checks[0].Status = status
				for i := range seen {
					seen[i].Store(0)
				}
				cur.Store(&target{machine: ms[0].ID, status: status, start: time.Now()})
				if err := cs[h].Publish(HostFacts{Machines: ms}); err != nil {
					b.Fatal(err)
				}
				deadline := time.Now().Add(dilate(10 * time.Second))
				for {
					done := true
					for i := range seen {
						if i != h && seen[i].Load() == 0 {
							done = false
							break
						}
					}
					if done || time.Now().After(deadline) {
						break
					}
					time.Sleep(time.Millisecond)
				}
				var rmax, amax time.Duration
				for i := range seen {
					if i == h {
						continue
					}
					d := time.Duration(seen[i].Load())
					if d == 0 {
						d = 10 * time.Second // never: counts as the deadline
						o := cs[i].Snapshot().Host(id)
						b.Logf("round %d: %s never saw %s's change: holds v%d of v%d (%s), stats %+v", round, sim.ids[i], id, o.Version, cs[h].Snapshot().Host(id).Version, o.Status, cs[i].Stats())
					}
					amax = max(amax, d)
					if regionOf(sim.ids[i]) == regionOf(id) {
						rmax = max(rmax, d)
					}
				}
				region = append(region, rmax)
				all = append(all, amax)
			}
			b.StopTimer()
			secs := undilate(time.Since(start)).Seconds()
			busy := float64(bytesSent(sim)-before) / secs / float64(n)
			regionBusy := float64(regionCounter(sim).Load()-rbefore) / secs / float64(n)
			load.report(b)
			cancel()
			wg.Wait()
			b.ReportMetric(ms(percentile(region, 0.5)), "region-p50-ms")
			b.ReportMetric(ms(percentile(region, 0.99)), "region-p99-ms")
			b.ReportMetric(ms(percentile(all, 0.5)), "all-p50-ms")
			b.ReportMetric(ms(percentile(all, 0.99)), "all-p99-ms")
			b.ReportMetric(idle, "idle-B/s/host")
			b.ReportMetric(busy, "busy-B/s/host")
			b.ReportMetric(regionIdle, "region-idle-B/s/host")
			b.ReportMetric(regionBusy, "region-busy-B/s/host")
		})
	}
}

// failCounter counts, from the logs of hosts never killed, what they
// concluded about hosts never killed (a cut-off host soon suspects
// everyone): memberlist's suspicions and deaths, by detector, the regional
// verdicts issued, and the hosts some live host showed dead.
type failCounter struct {
	*failCounts
	self   string // the host whose log this is
	region bool   // the regional detector's log
}

type failCounts struct {
	killed sync.Map
	// memberlist's own: suspicions after a failed probe, and deaths
	// declared, cluster-wide and within regions.
	suspects, deaths             atomic.Int64
	regionSuspects, regionDeaths atomic.Int64
	verdicts                     atomic.Int64 // dead verdicts issued
	withheld                     atomic.Int64 // deaths an unhealthy host kept to itself
	deadHosts                    sync.Map     // live hosts some live host showed dead
}

func (f failCounter) Enabled(context.Context, slog.Level) bool { return true }
func (f failCounter) WithGroup(string) slog.Handler            { return f }
func (f failCounter) WithAttrs(as []slog.Attr) slog.Handler {
	for _, a := range as {
		switch a.Key {
		case "host":
			f.self = a.Value.String()
		case "detector":
			f.region = a.Value.String() == "region"
		}
	}
	return f
}

func (f failCounter) Handle(_ context.Context, r slog.Record) error {
	if f.isKilled(f.self) {
		return nil
	}
	after := func(word string) string {
		i := strings.Index(r.Message, word)
		host, _, _ := strings.Cut(r.Message[i+len(word):], " ")
		return host
	}
	var id, status string
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "id":
			id = a.Value.String()
		case "status":
			status = a.Value.String()
		}
		return true
	})
	switch {
	case strings.Contains(r.Message, "memberlist: Suspect "):
		if !f.isKilled(after("Suspect ")) {
			if f.region {
				f.regionSuspects.Add(1)
			} else {
				f.suspects.Add(1)
			}
		}
	case strings.Contains(r.Message, "memberlist: Marking "):
		if !f.isKilled(after("Marking ")) {
			if f.region {
				f.regionDeaths.Add(1)
			} else {
				f.deaths.Add(1)
			}
		}
	case r.Message == "region: host dead":
		if !f.isKilled(id) {
			f.verdicts.Add(1)
		}
	case strings.HasPrefix(r.Message, "region: host dead, but"):
		f.withheld.Add(1)
	case r.Message == "host dead by its region's verdict" || r.Message == "host down" && status == string(StatusDead):
		if !f.isKilled(id) {
			f.deadHosts.Store(id, true)
		}
	}
	return nil
}

// reset starts the counts afresh (when loss starts, after the noisy join).
func (f *failCounts) reset() {
	for _, n := range []*atomic.Int64{&f.suspects, &f.deaths, &f.regionSuspects, &f.regionDeaths, &f.verdicts, &f.withheld} {
		n.Store(0)
	}
	f.deadHosts.Clear()
}

func (f failCounter) isKilled(id string) bool {
	_, ok := f.killed.Load(id)
	return ok
}

// BenchmarkFailureDetection: one op kills a random host (its network is cut)
// with 10% of datagrams lost, and measures until every other host sees it
// dead: with the regional detectors, and with the cluster-wide detector
// alone for comparison. Reports false suspicions and deaths of live hosts.
func BenchmarkFailureDetection(b *testing.B) {
	for _, n := range []int{100} {
		for _, detector := range []string{"region", "global"} {
			b.Run(fmt.Sprintf("hosts=%d/loss=10%%/detector=%s", n, detector), func(b *testing.B) {
				fc := failCounter{failCounts: &failCounts{}}
				sim := benchSim(b, n, fc, func(c *Config) { c.NoRegionDetector = detector == "global" })
				sim.net.SetLoss(0.10)
				fc.reset()
				start := time.Now()
				time.Sleep(dilate(2 * time.Second)) // let loss-induced noise show before the first kill
				load := startLoad()
				rng := rand.New(rand.NewPCG(3, 4))
				alive := slices.Clone(sim.ids)
				var took []time.Duration
				b.ResetTimer()
				for range b.N {
					if len(alive) < 3 {
						b.Fatal("too few hosts left: lower -benchtime")
					}
					k := rng.IntN(len(alive))
					victim := alive[k]
					alive = slices.Delete(alive, k, k+1)
					fc.killed.Store(victim, true)
					killed := time.Now()
					sim.net.Kill(victim)
					waitFor(b, dilate(60*time.Second), victim+" dead everywhere", func() bool { return deadOnAll(sim, alive, victim) })
					took = append(took, undilate(time.Since(killed)))
				}
				b.StopTimer()
				b.ReportMetric(ms(percentile(took, 0.5)), "dead-p50-ms")
				b.ReportMetric(ms(percentile(took, 0.99)), "dead-p99-ms")
				fc.report(b, start)
				load.report(b)
			})
		}
	}
}

// BenchmarkRegionLoss: one op cuts off every host of a random region at
// once, so no host of it is left to issue verdicts, and measures until
// every host elsewhere sees all of them dead: the cluster-wide detector's
// timings. Ten regions of ten hosts; run with -benchtime 3x or so.
func BenchmarkRegionLoss(b *testing.B) {
	fc := failCounter{failCounts: &failCounts{}}
	sim := benchSim(b, 100, fc, nil)
	sim.net.SetLoss(0.10)
	fc.reset()
	start := time.Now()
	time.Sleep(dilate(2 * time.Second))
	load := startLoad()
	rng := rand.New(rand.NewPCG(5, 6))
	regions := slices.Clone(benchRegions)
	alive := slices.Clone(sim.ids)
	var took []time.Duration
	b.ResetTimer()
	for range b.N {
		if len(regions) < 3 {
			b.Fatal("too few regions left: lower -benchtime")
		}
		k := rng.IntN(len(regions))
		region := regions[k]
		regions = slices.Delete(regions, k, k+1)
		var victims []string
		alive = slices.DeleteFunc(alive, func(id string) bool {
			if regionOf(id) == region {
				victims = append(victims, id)
				return true
			}
			return false
		})
		killed := time.Now()
		for _, v := range victims {
			fc.killed.Store(v, true)
			sim.net.Kill(v)
		}
		waitFor(b, dilate(120*time.Second), region+" dead everywhere", func() bool {
			for _, v := range victims {
				if !deadOnAll(sim, alive, v) {
					return false
				}
			}
			return true
		})
		took = append(took, undilate(time.Since(killed)))
	}
	b.StopTimer()
	b.ReportMetric(ms(percentile(took, 0.5)), "dead-p50-ms")
	b.ReportMetric(ms(slices.Max(took)), "dead-max-ms")
	fc.report(b, start)
	load.report(b)
}

// deadOnAll reports whether every host of ids sees victim dead.
func deadOnAll(sim *simCluster, ids []string, victim string) bool {
	for _, id := range ids {
		if h := sim.hosts[id].Snapshot().Host(victim); h == nil || h.Status != StatusDead {
			return false
		}
	}
	return true
}

func (f failCounter) report(b *testing.B, start time.Time) {
	b.ReportMetric(undilate(time.Since(start)).Seconds(), "seconds-under-loss")
	b.ReportMetric(float64(f.suspects.Load()), "false-suspicions")
	b.ReportMetric(float64(f.deaths.Load()), "false-dead-verdicts")
	b.ReportMetric(float64(f.regionSuspects.Load()), "region-false-suspicions")
	b.ReportMetric(float64(f.regionDeaths.Load()), "region-false-deaths")
	b.ReportMetric(float64(f.verdicts.Load()), "false-region-verdicts")
	b.ReportMetric(float64(f.withheld.Load()), "verdicts-withheld")
	hosts := 0
	f.deadHosts.Range(func(any, any) bool { hosts++; return true })
	b.ReportMetric(float64(hosts), "live-hosts-marked-dead")
}

// load measures what a benchmark's simulation took of the machine: the
// cores it kept busy, and how late the Go scheduler ran goroutines that
// were ready (p99, real time). Delays near the protocol's timeouts mean
// the machine, not the protocol, is being measured.
type load struct {
	start time.Time
	cpu   time.Duration
	sched *metrics.Float64Histogram
}

func startLoad() *load {
	return &load{start: time.Now(), cpu: cpuTime(), sched: schedLatencies()}
}

func (l *load) report(b *testing.B) {
	cores := float64(cpuTime()-l.cpu) / float64(time.Since(l.start))
	b.ReportMetric(cores, "cores-used")
	b.ReportMetric(histPercentile(l.sched, schedLatencies(), 0.99)*1000, "sched-p99-ms")
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func schedLatencies() *metrics.Float64Histogram {
	s := []metrics.Sample{{Name: "/sched/latencies:seconds"}}
	metrics.Read(s)
	if s[0].Value.Kind() != metrics.KindFloat64Histogram {
		return nil
	}
	return s[0].Value.Float64Histogram()
}

// histPercentile is the p-th percentile, in seconds, of what was added to
// a cumulative histogram between two readings: the upper bound of the
// bucket it falls in.
func histPercentile(before, after *metrics.Float64Histogram, p float64) float64 {
	if before == nil || after == nil || len(before.Counts) != len(after.Counts) {
		return 0
	}
	var total uint64
	for i := range after.Counts {
		total += after.Counts[i] - before.Counts[i]
	}
	if total == 0 {
		return 0
	}
	want := uint64(math.Ceil(float64(total) * p))
	var sum uint64
	for i := range after.Counts {
		sum += after.Counts[i] - before.Counts[i]
		if sum >= want {
			if math.IsInf(after.Buckets[i+1], 1) {
				return after.Buckets[i]
			}
			return after.Buckets[i+1]
		}
	}
	return 0
}

// BenchmarkLoadGossip: what publishing machines' load costs. Each host runs
// three machines; over one window every host publishes its facts unchanged
// every 200 ms (the host's load interval: nothing is sent), then over
// another each publish changes one machine's load (the worst case: every
// host's load changing all the time). Reports gossip bytes per second per
// host in both, and the load-change deltas each host sent.
func BenchmarkLoadGossip(b *testing.B) {
	const n = 100
	const interval = 200 * time.Millisecond
	window := 5 * time.Second
	sim := benchSim(b, n, slog.DiscardHandler, nil)
	run := func(change bool) float64 {
		before, start := bytesSent(sim), time.Now()
		var wg sync.WaitGroup
		for i, id := range sim.ids {
			c := sim.hosts[id]
			ms := machines(strings.ReplaceAll(id, "-", "m"), "app"+strconv.Itoa(i%7), regionOf(id), 3)
			wg.Add(1)
			go func() {
				defer wg.Done()
				t := time.NewTicker(dilate(interval))
				defer t.Stop()
				for k := 1; time.Since(start) < dilate(window); k++ {
					<-t.C
					if change {
						ms[k%len(ms)].Load = k % 50
					}
					if err := c.Publish(HostFacts{Machines: ms}); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		return float64(bytesSent(sim)-before) / undilate(time.Since(start)).Seconds() / n
	}
	b.ResetTimer()
	var steady, changing float64
	for range b.N {
		steady += run(false)
		changing += run(true)
	}
	b.ReportMetric(steady/float64(b.N), "steady-B/s/host")
	b.ReportMetric(changing/float64(b.N), "changing-B/s/host")
}
