package netsim

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/internal/geo"
	"github.com/hashicorp/memberlist"
)

// testRegions spreads simulated hosts over the world.
var testRegions = []string{"ams", "iad", "syd", "sin", "gru", "fra", "lax", "nrt", "jnb", "ord"}

// geoLatency is the one-way latency between hosts named "<region>-<i>",
// from the geo model, divided by scale.
func geoLatency(scale int) func(from, to string) time.Duration {
	regionOf := func(name string) geo.Region {
		code, _, _ := strings.Cut(name, "-")
		r, _ := geo.Lookup(code)
		return r
	}
	return func(from, to string) time.Duration {
		return geo.RTT(regionOf(from), regionOf(to)) / 2 / time.Duration(scale)
	}
}

// logSink passes memberlist's warnings and errors to the test log until
// the test ends; its chatter is dropped.
type logSink struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done && (bytes.Contains(p, []byte("[ERR]")) || bytes.Contains(p, []byte("[WARN]"))) {
		s.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

func (s *logSink) stop() {
	s.mu.Lock()
	s.done = true
	s.mu.Unlock()
}

type cluster struct {
	n       *Network
	names   []string
	members map[string]*memberlist.Memberlist
	addrs   map[string]string
}

// startCluster starts one memberlist node per host; all join the first,
// several at a time.
func startCluster(t testing.TB, n *Network, size int, conf func() *memberlist.Config, logs io.Writer) *cluster {
	t.Helper()
	c := &cluster{n: n, members: map[string]*memberlist.Memberlist{}, addrs: map[string]string{}}
	for i := range size {
		name := fmt.Sprintf("%s-%d", testRegions[i%len(testRegions)], i)
		if _, err := n.AddHost(name); err != nil {
			t.Fatal(err)
		}
		tr, err := n.Transport(name, 7946)
		if err != nil {
			t.Fatal(err)
		}
		cfg := conf()
		cfg.Name = name
		cfg.Transport = tr
		cfg.Logger = log.New(logs, name+" ", 0)
		m, err := memberlist.Create(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Shutdown() })
		c.names = append(c.names, name)
		c.members[name] = m
		c.addrs[name] = tr.Addr()
	}
	seed := []string{c.addrs[c.names[0]]}
	joins := make(chan string)
	errs := make(chan error, size)
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for name := range joins {
				if _, err := c.members[name].Join(seed); err != nil {
					errs <- fmt.Errorf("%s joins: %w", name, err)
				}
			}
		})
	}
	for _, name := range c.names[1:] {
		joins <- name
	}
	close(joins)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	return c
}

// sees reports whether every node in group lists exactly the group's
// members as alive.
func (c *cluster) sees(group []string) bool {
	want := slices.Sorted(slices.Values(group))
	for _, name := range group {
		var got []string
		for _, m := range c.members[name].Members() {
			if m.State == memberlist.StateAlive {
				got = append(got, m.Name)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			return false
		}
	}
	return true
}

// minAlive is the fewest members any node sees alive.
func (c *cluster) minAlive() int {
	least := len(c.members)
	for _, m := range c.members {
		alive := 0
		for _, node := range m.Members() {
			if node.State == memberlist.StateAlive {
				alive++
			}
		}
		least = min(least, alive)
	}
	return least
}

// fastConfig shortens memberlist's timings for tests, leaving room for a
// loaded machine (and the race detector) to be late with its timers.
func fastConfig() *memberlist.Config {
	cfg := memberlist.DefaultLocalConfig()
	cfg.ProbeInterval = 250 * time.Millisecond
	cfg.ProbeTimeout = 150 * time.Millisecond
	cfg.GossipInterval = 50 * time.Millisecond
	cfg.SuspicionMult = 3
	cfg.SuspicionMaxTimeoutMult = 2
	cfg.PushPullInterval = time.Second
	cfg.TCPTimeout = time.Second
	cfg.GossipToTheDeadTime = time.Second
	return cfg
}

func TestMemberlistCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("a 20-node cluster")
	}
	// On a virtual clock: twenty members' probes need more CPU than a busy
	// machine gives them in real time, and a probe answered late because
	// of that would be a failure of the test's making.
	synctest.Test(t, func(t *testing.T) {
		// Registered first, run last: probes in flight when the members
		// shut down end on their own timers.
		t.Cleanup(func() { time.Sleep(time.Minute) })
		logs := &logSink{t: t}
		defer logs.stop()
		// World latencies at a tenth: Sydney–Amsterdam is 12.5 ms one way.
		n := newNet(t, Config{Seed: 1, Latency: geoLatency(10), Loss: 0.01})
		c := startCluster(t, n, 20, fastConfig, logs)
		waitFor(t, 20*time.Second, "the cluster to converge", func() bool { return c.sees(c.names) })

		// A killed node is declared dead by all the others.
		victim := c.names[7]
		n.Kill(victim)
		rest := slices.DeleteFunc(slices.Clone(c.names), func(s string) bool { return s == victim })
		waitFor(t, 20*time.Second, "the killed node to be declared dead", func() bool { return c.sees(rest) })
		c.members[victim].Shutdown()
		delete(c.members, victim)

		// A partition splits the cluster in two; after the heal, nodes that
		// rejoin (as the cluster layer does with its seeds) converge again.
		left, right := rest[:10], rest[10:]
		n.Partition(left, right)
		waitFor(t, 20*time.Second, "each side to drop the other", func() bool { return c.sees(left) && c.sees(right) })
		n.Heal()
		for _, name := range right {
			if _, err := c.members[name].Join([]string{c.addrs[left[0]]}); err != nil {
				t.Fatalf("%s rejoins: %v", name, err)
			}
		}
		waitFor(t, 20*time.Second, "the cluster to converge after the heal", func() bool { return c.sees(rest) })

		sent, recv, _, _ := n.Stats(rest[0])
		t.Logf("%s: %d bytes out, %d in", rest[0], sent, recv)
	})
}

// BenchmarkMemberlistCluster runs memberlist clusters with LAN timings and
// world latencies, with and without memberlist's compression, one second
// of steady state per iteration, and reports the CPU it costs. Sizes come
// from NETSIM_NODES (default 200):
//
//	NETSIM_NODES=200,500 go test -run '^$' -bench MemberlistCluster -benchtime 3x ./internal/netsim
func BenchmarkMemberlistCluster(b *testing.B) {
	sizes := []int{200}
	if env := os.Getenv("NETSIM_NODES"); env != "" {
		sizes = nil
		for f := range strings.SplitSeq(env, ",") {
			k, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || k < 2 {
				b.Fatalf("NETSIM_NODES: bad size %q", f)
			}
			sizes = append(sizes, k)
		}
	}
	for _, size := range sizes {
		for _, compress := range []bool{true, false} {
			b.Run(fmt.Sprintf("nodes=%d/compress=%v", size, compress), func(b *testing.B) {
				n := New(Config{Seed: 1, Latency: geoLatency(1)})
				defer n.Close()
				conf := func() *memberlist.Config {
					cfg := memberlist.DefaultLANConfig()
					cfg.ProbeTimeout = 800 * time.Millisecond // past the longest round trip
					cfg.EnableCompression = compress
					return cfg
				}
				c := startCluster(b, n, size, conf, io.Discard)
				waitFor(b, 5*time.Minute, "the cluster to converge", func() bool { return c.sees(c.names) })
				// Let the joins' broadcasts die down: the steady state is measured.
				time.Sleep(3 * time.Second)
				var sent, recvd uint64
				for _, name := range c.names {
					_, _, sp, rp := n.Stats(name)
					sent -= sp
					recvd -= rp
				}
				cpu0 := cpuTime(b)
				start := time.Now()
				b.ResetTimer()
				for range b.N {
					time.Sleep(time.Second)
				}
				b.StopTimer()
				wall := time.Since(start)
				cpu := cpuTime(b) - cpu0
				for _, name := range c.names {
					_, _, sp, rp := n.Stats(name)
					sent += sp
					recvd += rp
				}
				b.ReportMetric(float64(c.minAlive()), "min-alive")
				b.ReportMetric(cpu.Seconds()/wall.Seconds(), "cores")
				b.ReportMetric(float64(sent)/wall.Seconds(), "datagrams/s")
				b.ReportMetric(float64(recvd)/float64(sent), "delivered/sent")
				b.ReportMetric(0, "ns/op")
				for _, m := range c.members {
					m.Shutdown()
				}
			})
		}
	}
}

func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
