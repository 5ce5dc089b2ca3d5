package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

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

var benchRegions = []string{"ams", "iad", "syd", "sin", "gru", "fra", "lax", "nrt", "jnb", "ord"}

func regionOf(name string) string { r, _, _ := strings.Cut(name, "-"); return r }

func geoLatency() func(from, to string) time.Duration {
	scale, _ := strconv.Atoi(os.Getenv("FLAME_BENCH_LATENCY_SCALE"))
	scale = max(scale, 1)
	rtt := map[[2]string]time.Duration{}
	for _, a := range benchRegions {
		for _, b := range benchRegions {
			ra, _ := geo.Lookup(a)
			rb, _ := geo.Lookup(b)
			rtt[[2]string{a, b}] = geo.RTT(ra, rb) / 2 / time.Duration(scale)
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

// benchSim starts n members and waits until every one sees all n alive.
func benchSim(b *testing.B, n int, logs slog.Handler) *simCluster {
	b.Helper()
	sim := newSim(b, netsim.Config{Seed: 1, Latency: geoLatency()})
	logger := slog.New(logs)
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
		c, err := New(Config{HostID: id, Region: regionOf(id), Transport: tr, Logger: logger,
			Capacity: Resources{CPUs: 16, MemoryMB: 65536}, ProbeInterval: interval, ProbeTimeout: timeout})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Start(context.Background()); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { c.Close() })
		sim.hosts[id] = c
		sim.ids = append(sim.ids, id)
		sim.addrs[id] = tr.Addr()
		cs = append(cs, c)
		if err := c.Publish(HostFacts{Machines: machines(strings.ReplaceAll(id, "-", "m"), "app"+strconv.Itoa(i%7), regionOf(id), 3)}); err != nil {
			b.Fatal(err)
		}
	}
	// Join in parallel, each to one of the first few.
	var wg sync.WaitGroup
	for i, c := range cs[1:] {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Join([]string{sim.addrs[sim.ids[i%min(4, i+1)]]}); err != nil {
				b.Error(err)
			}
		}()
	}
	wg.Wait()
	defer func() {
		if b.Failed() {
			count := map[string]int{}
			for _, c := range cs {
				for _, h := range c.Snapshot().Hosts() {
					count[fmt.Sprintf("%s/v0=%v", h.Status, h.Version == 0)]++
					if h.Version == 0 {
						b.Logf("%s lacks %s: stats %+v; owner's own version %d", c.cfg.HostID, h.ID, c.Stats(), sim.hosts[h.ID].Snapshot().Host(h.ID).Version)
					}
				}
				count[fmt.Sprintf("hosts=%d", len(c.Snapshot().Hosts()))]++
			}
			b.Logf("views: %v", count)
		}
	}()
	waitFor(b, 90*time.Second, "the cluster to converge", func() bool {
		for _, c := range cs {
			s := c.Snapshot()
			if len(s.Hosts()) != n {
				return false
			}
			for _, h := range s.Hosts() {
				if h.Status != StatusAlive || h.Version == 0 {
					return false
				}
			}
		}
		return true
	})
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
			sim := benchSim(b, n, slog.DiscardHandler)
			cs := make([]*Cluster, len(sim.ids))
			for i, id := range sim.ids {
				cs[i] = sim.hosts[id]
			}
			// Idle traffic: probes, anti-entropy.
			before, start := bytesSent(sim), time.Now()
			time.Sleep(3 * time.Second)
			idle := float64(bytesSent(sim)-before) / time.Since(start).Seconds() / float64(n)

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
							seen[i].Store(int64(time.Since(t.start)))
						}
					}
				}()
			}
			rng := rand.New(rand.NewPCG(1, 2))
			critical := make([]bool, n) // each host's first check, as last published
			var region, all []time.Duration
			before, start = bytesSent(sim), time.Now()
			b.ResetTimer()
			for round := range b.N {
				h := rng.IntN(n)
				id := sim.ids[h]
				ms := machines(strings.ReplaceAll(id, "-", "m"), "app"+strconv.Itoa(h%7), regionOf(id), 3)
				critical[h] = !critical[h]
				status := CheckPassing
				if critical[h] {
					status = CheckCritical
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
				deadline := time.Now().Add(10 * time.Second)
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
			busy := float64(bytesSent(sim)-before) / time.Since(start).Seconds() / float64(n)
			cancel()
			wg.Wait()
			b.ReportMetric(float64(percentile(region, 0.5).Milliseconds()), "region-p50-ms")
			b.ReportMetric(float64(percentile(region, 0.99).Milliseconds()), "region-p99-ms")
			b.ReportMetric(float64(percentile(all, 0.5).Milliseconds()), "all-p50-ms")
			b.ReportMetric(float64(percentile(all, 0.99).Milliseconds()), "all-p99-ms")
			b.ReportMetric(idle, "idle-B/s/host")
			b.ReportMetric(busy, "busy-B/s/host")
		})
	}
}

// failCounter counts memberlist's verdicts from its log: suspicions and
// deaths of hosts that were never killed, as seen by hosts never killed (a
// cut-off host soon suspects everyone).
type failCounter struct {
	*failCounts
	self string // the host whose log this is
}

type failCounts struct {
	killed           sync.Map
	suspects, deaths atomic.Int64
	deadHosts        sync.Map // live hosts some live member marked dead
}

func (f failCounter) Enabled(context.Context, slog.Level) bool { return true }
func (f failCounter) WithGroup(string) slog.Handler            { return f }
func (f failCounter) WithAttrs(as []slog.Attr) slog.Handler {
	for _, a := range as {
		if a.Key == "host" {
			f.self = a.Value.String()
		}
	}
	return f
}

func (f failCounter) Handle(_ context.Context, r slog.Record) error {
	if _, ok := f.killed.Load(f.self); ok {
		return nil
	}
	after := func(word string) string {
		i := strings.Index(r.Message, word)
		host, _, _ := strings.Cut(r.Message[i+len(word):], " ")
		return host
	}
	switch {
	case strings.Contains(r.Message, "memberlist: Suspect "):
		if _, ok := f.killed.Load(after("Suspect ")); !ok {
			f.suspects.Add(1)
		}
	case strings.Contains(r.Message, "memberlist: Marking "):
		host := after("Marking ")
		if _, ok := f.killed.Load(host); !ok {
			f.deaths.Add(1)
			f.deadHosts.Store(host, true)
		}
	}
	return nil
}

// BenchmarkFailureDetection: one op kills a random host (its network is cut)
// with 10% of datagrams lost, and measures until every other host sees it
// dead. Reports false suspicions and false deaths of live hosts.
func BenchmarkFailureDetection(b *testing.B) {
	for _, n := range []int{100} {
		b.Run(fmt.Sprintf("hosts=%d/loss=10%%", n), func(b *testing.B) {
			fc := failCounter{failCounts: &failCounts{}}
			sim := benchSim(b, n, fc)
			sim.net.SetLoss(0.10)
			start := time.Now()
			time.Sleep(2 * time.Second) // let loss-induced noise show before the first kill
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
				waitFor(b, 60*time.Second, victim+" dead everywhere", func() bool {
					for _, id := range alive {
						if h := sim.hosts[id].Snapshot().Host(victim); h == nil || h.Status != StatusDead {
							return false
						}
					}
					return true
				})
				took = append(took, time.Since(killed))
			}
			b.StopTimer()
			b.ReportMetric(float64(percentile(took, 0.5).Milliseconds()), "dead-p50-ms")
			b.ReportMetric(float64(percentile(took, 0.99).Milliseconds()), "dead-p99-ms")
			b.ReportMetric(float64(fc.suspects.Load()), "false-suspicions")
			b.ReportMetric(time.Since(start).Seconds(), "seconds-under-loss")
			b.ReportMetric(float64(fc.deaths.Load()), "false-dead-verdicts")
			hosts := 0
			fc.deadHosts.Range(func(any, any) bool { hosts++; return true })
			b.ReportMetric(float64(hosts), "live-hosts-marked-dead")
		})
	}
}
