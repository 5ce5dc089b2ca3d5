package cluster

import (
	"context"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/hashicorp/memberlist"
)

func encodedVerdict(from, host string, dead bool, at time.Time) []byte {
	return encodeVerdict(&verdict{From: from, Host: host, Dead: dead, At: uint64(at.UnixNano())})
}

func statusOf(c *Cluster, id string) HostStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	if m := c.members[id]; m != nil {
		return m.status
	}
	return ""
}

// TestVerdictRules feeds verdicts to an idle member by hand: who may issue
// them, how many it takes, and what overrides them.
func TestVerdictRules(t *testing.T) {
	clock := time.Now()
	tick := func() time.Time { clock = clock.Add(time.Millisecond); return clock }
	c := idle(t, "r", func(cfg *Config) { cfg.Region = "fra"; cfg.Now = func() time.Time { return clock } })
	for _, id := range []string{"a1", "a2", "a3"} {
		know(c, id, "ams")
	}
	know(c, "f1", "fra")
	know(c, "p1", "par") // a region of two: p1 and p2
	know(c, "p2", "par")
	dropped := func() uint64 { return c.Stats().Dropped }
	step := func(what string, msg []byte, id string, want HostStatus) {
		t.Helper()
		c.receive(msg, false)
		if got := statusOf(c, id); got != want {
			t.Fatalf("%s: %s is %s, want %s", what, id, got, want)
		}
	}

	// Only hosts of a1's own region may declare it dead.
	before := dropped()
	step("from another region", encodedVerdict("f1", "a1", true, tick()), "a1", StatusAlive)
	step("from a third region", encodedVerdict("p1", "a1", true, tick()), "a1", StatusAlive)
	if dropped() != before+2 {
		t.Errorf("verdicts from outside the region: dropped %d, want 2", dropped()-before)
	}
	// Two hosts of the region must agree; a repeat is not a second host.
	at := tick()
	tick()
	step("one accuser", encodedVerdict("a2", "a1", true, at), "a1", StatusAlive)
	step("the same again", encodedVerdict("a2", "a1", true, at), "a1", StatusAlive)
	step("a second accuser", encodedVerdict("a3", "a1", true, at.Add(time.Millisecond)), "a1", StatusDead)
	if c.Stats().Verdicts != 1 {
		t.Errorf("verdicts counted: %d", c.Stats().Verdicts)
	}
	// An alive verdict newer than the accusations restores it; older ones
	// are history.
	step("alive verdict older than the accusations", encodedVerdict("a2", "a1", false, at.Add(-time.Second)), "a1", StatusDead)
	step("alive verdict", encodedVerdict("a2", "a1", false, tick()), "a1", StatusAlive)
	step("stale dead verdict", encodedVerdict("a3", "a1", true, at.Add(time.Millisecond)), "a1", StatusAlive)

	// A probe answered overrides the verdict.
	at = tick()
	c.receive(encodedVerdict("a2", "a1", true, at), false)
	step("dead again", encodedVerdict("a3", "a1", true, at), "a1", StatusDead)
	(&delegate{c}).NotifyPingComplete(&memberlist.Node{Name: "a1"}, 3*time.Millisecond, nil)
	if got := statusOf(c, "a1"); got != StatusAlive {
		t.Fatalf("after a probe answered: %s", got)
	}
	step("verdicts from before the answer", encodedVerdict("a2", "a1", true, at.Add(time.Millisecond)), "a1", StatusAlive)

	// In a region of two, the other host's word is enough.
	step("the only other host of the region", encodedVerdict("p1", "p2", true, tick()), "p2", StatusDead)
	// Memberlist's own verdict replaces the region's: an alive verdict
	// cannot revive what memberlist declared dead.
	(&delegate{c}).NotifyLeave(&memberlist.Node{Name: "p2"})
	step("alive verdict after memberlist's", encodedVerdict("p1", "p2", false, tick()), "p2", StatusDead)
	know(c, "p2", "par") // memberlist sees it alive again
	if got := statusOf(c, "p2"); got != StatusAlive {
		t.Fatalf("p2 back: %s", got)
	}

	// Verdicts about this host, from unknown or dead hosts, and about a
	// leaving host do nothing.
	step("about this host", encodedVerdict("f1", "r", true, tick()), "r", StatusAlive)
	step("from an unknown host", encodedVerdict("a9", "a1", true, tick()), "a1", StatusAlive)
	(&delegate{c}).NotifyLeave(&memberlist.Node{Name: "a3"})
	step("from a dead host", encodedVerdict("a3", "a1", true, tick()), "a1", StatusAlive) // a2's alone would do
	c.memberUp(&memberlist.Node{Name: "a2", Addr: []byte{10, 0, 0, 2}, Port: 7946,
		Meta: encodeMeta(&hostMeta{Region: "ams", Leaving: true})})
	know(c, "a3", "ams")
	c.receive(encodedVerdict("a1", "a2", true, tick()), false)
	step("about a leaving host", encodedVerdict("a3", "a2", true, tick()), "a2", StatusAlive)

	// Malformed and out-of-range verdicts are dropped.
	before = dropped()
	for _, msg := range [][]byte{
		encodedVerdict("a2", "a2", true, tick()),
		encodedVerdict("a2", "a1", true, clock.Add(48*time.Hour)),
		encodedVerdict("a2", "a1", true, clock.Add(-time.Hour)),
		encodedVerdict("a 2", "a1", true, tick()),
		encodedVerdict("a2", "a1", true, tick())[:8],
		append(encodedVerdict("a2", "a1", true, tick()), 0),
	} {
		step("malformed", msg, "a1", StatusAlive)
	}
	if got := dropped() - before; got != 6 {
		t.Errorf("malformed verdicts dropped: %d, want 6", got)
	}
}

// regionWorld is two regions far apart: ams (a1…a4) and syd (s1, s2),
// 150 ms one way between them and 1 ms within each. The cluster-wide
// detector is set too slow to declare anyone dead within these tests, so a
// host seen dead was declared so by its region.
func regionWorld(t *testing.T, seed int64, ids ...string) *simCluster {
	sim := newSim(t, netsim.Config{Seed: seed, Latency: func(from, to string) time.Duration {
		if from[0] == to[0] {
			return time.Millisecond
		}
		return 150 * time.Millisecond
	}})
	slow := func(c *Config) {
		c.ProbeInterval, c.ProbeTimeout = time.Second, 400*time.Millisecond
		c.SuspicionMult = 20
		c.GossipInterval = 20 * time.Millisecond
		c.PushPullInterval = 2 * time.Second
	}
	for _, id := range ids {
		sim.add(id, map[byte]string{'a': "ams", 's': "syd"}[id[0]], slow)
	}
	waitFor(t, 10*time.Second, "the cluster and its regions to form", func() bool {
		for _, id := range ids {
			c := sim.hosts[id]
			inRegion := 0
			for _, o := range ids {
				if o[0] == id[0] {
					inRegion++
				}
			}
			if len(c.Snapshot().Hosts()) != len(ids) || c.region.NumMembers() != inRegion {
				return false
			}
		}
		return true
	})
	return sim
}

// globalUp reports whether c's cluster-wide memberlist holds id up.
func globalUp(c *Cluster, id string) bool {
	return slices.ContainsFunc(c.ml.Members(), func(n *memberlist.Node) bool { return n.Name == id })
}

// TestRegionVerdict: a host killed in one region is declared dead, on a
// host of a far region, by its region's verdict while that host's own
// cluster-wide detector still holds it up; when it returns it is alive
// again everywhere, without the cluster-wide detector's help.
func TestRegionVerdict(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := regionWorld(t, 11, "a1", "a2", "a3", "a4", "s1", "s2")
		s1, s2 := sim.hosts["s1"], sim.hosts["s2"]
		sim.net.Kill("a4")
		waitFor(t, 10*time.Second, "a4 dead on s1 and s2", func() bool {
			return s1.Snapshot().Host("a4").Status == StatusDead && s2.Snapshot().Host("a4").Status == StatusDead
		})
		if !globalUp(s1, "a4") || !globalUp(s2, "a4") {
			t.Error("the cluster-wide detector declared a4 dead first")
		}
		if s1.Stats().Verdicts == 0 {
			t.Errorf("s1 counts no verdict: %+v", s1.Stats())
		}
		for _, id := range []string{"a1", "a2", "a3", "s1", "s2"} {
			for _, h := range sim.hosts[id].Snapshot().Hosts() {
				if h.ID != "a4" && h.Status != StatusAlive {
					t.Errorf("%s sees %s %s", id, h.ID, h.Status)
				}
			}
		}

		// Long enough cut off for a4's own regional memberlist to declare the
		// rest of its region dead, which it tells them on its return. (It
		// issues no verdicts: cut off, its own detector is unhealthy.)
		a4 := sim.hosts["a4"]
		waitFor(t, 10*time.Second, "a4's regional memberlist to hold a1 dead", func() bool { return !a4.regionHolds("a1") })
		sim.net.Revive("a4")
		waitFor(t, 15*time.Second, "a4 alive everywhere again, and its region whole", func() bool {
			for _, c := range sim.hosts {
				for _, h := range c.Snapshot().Hosts() {
					if h.Status != StatusAlive {
						return false
					}
				}
				if c.cfg.Region == "ams" && c.region.NumMembers() != 4 {
					return false
				}
			}
			return true
		})
		if !globalUp(s1, "a4") {
			t.Error("s1's cluster-wide detector declared a4 dead meanwhile")
		}
	})
}

// TestForgedVerdicts: a host of another region cannot declare a host dead;
// verdicts in the name of hosts of its region (nothing authenticates the
// sender) hold only until the host answers a ping.
func TestForgedVerdicts(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := regionWorld(t, 12, "a1", "a2", "a3", "s1", "s2")
		evil := sim.hosts["s2"]
		var mu sync.Mutex
		var deadOn []string
		stop := make(chan struct{})
		var wg sync.WaitGroup
		t.Cleanup(func() { close(stop); wg.Wait() })
		for _, id := range []string{"a2", "a3", "s1"} {
			c := sim.hosts[id]
			ch, cancel := c.Subscribe()
			wg.Go(func() {
				defer cancel()
				for {
					select {
					case <-stop:
						return
					case <-ch:
					}
					if h := c.Snapshot().Host("a1"); h != nil && h.Status == StatusDead {
						mu.Lock()
						deadOn = append(deadOn, id)
						mu.Unlock()
					}
				}
			})
		}
		before := map[string]uint64{}
		for id, c := range sim.hosts {
			before[id] = c.Stats().Dropped
		}
		for range 5 {
			evil.enqueueVerdict(encodedVerdict("s2", "a1", true, time.Now()))
		}
		waitFor(t, 10*time.Second, "the forged verdict to be dropped everywhere", func() bool {
			for _, id := range []string{"a2", "a3", "s1"} { // a1 ignores verdicts about itself
				if sim.hosts[id].Stats().Dropped == before[id] {
					return false
				}
			}
			return true
		})
		synctest.Wait() // the subscribers have looked at every change
		mu.Lock()
		if len(deadOn) > 0 {
			t.Errorf("a1 seen dead on %v", deadOn)
		}
		mu.Unlock()

		// Two forged accusers in the name of a1's own region: believed, until
		// a1 answers a ping.
		evil.enqueueVerdict(encodedVerdict("a2", "a1", true, time.Now()))
		evil.enqueueVerdict(encodedVerdict("a3", "a1", true, time.Now()))
		s1 := sim.hosts["s1"]
		waitFor(t, 10*time.Second, "s1 to take the forged verdicts", func() bool { return s1.Stats().Verdicts > 0 })
		waitFor(t, 10*time.Second, "a1 alive again on s1", func() bool {
			return s1.Snapshot().Host("a1").Status == StatusAlive
		})
	})
}

// TestNoFalseDeathsUnderLoss: with one datagram in ten lost, no host of a
// small two-region cluster is ever seen dead and no region issues a
// verdict, at the default timings (the regional probe timeout is 40 ms). On
// a virtual clock: a probe answered late because the machine running the
// simulation was busy would be a false death of the test's making.
func TestNoFalseDeathsUnderLoss(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 13, Latency: func(from, to string) time.Duration {
			if from[0] == to[0] {
				return time.Millisecond
			}
			return 10 * time.Millisecond
		}})
		ids := []string{"a1", "a2", "a3", "f1", "f2", "f3"}
		for _, id := range ids {
			sim.add(id, map[byte]string{'a': "ams", 'f': "fra"}[id[0]], func(c *Config) { c.PushPullInterval = 2 * time.Second })
		}
		var cs []*Cluster
		for _, id := range ids {
			cs = append(cs, sim.hosts[id])
		}
		waitFor(t, 10*time.Second, "the cluster to form", func() bool {
			return converged(cs, StatusAlive) && cs[0].region.NumMembers() == 3 && cs[5].region.NumMembers() == 3
		})
		sim.net.SetLoss(0.10)
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		var mu sync.Mutex
		var seen []string
		for _, c := range cs {
			ch, unsub := c.Subscribe()
			wg.Go(func() {
				defer unsub()
				for {
					select {
					case <-ctx.Done():
						return
					case <-ch:
					}
					for _, h := range c.Snapshot().Hosts() {
						if h.Status != StatusAlive {
							mu.Lock()
							seen = append(seen, c.cfg.HostID+" sees "+h.ID+" "+string(h.Status))
							mu.Unlock()
						}
					}
				}
			})
		}
		time.Sleep(8 * time.Second)
		cancel()
		wg.Wait()
		if len(seen) > 0 {
			t.Errorf("live hosts seen down: %v", seen)
		}
		for _, c := range cs {
			if s := c.Stats(); s.Issued > 0 || s.Verdicts > 0 {
				t.Errorf("%s: %d verdicts issued, %d taken", c.cfg.HostID, s.Issued, s.Verdicts)
			}
		}
	})
}

// TestRegionOff: with NoRegionDetector the cluster-wide detector alone
// declares a host dead.
func TestRegionOff(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 14, Latency: func(string, string) time.Duration { return time.Millisecond }})
		off := func(c *Config) { fastTimings(c); c.NoRegionDetector = true }
		a := sim.add("a1", "ams", off)
		sim.add("a2", "ams", off)
		sim.add("a3", "ams", off)
		waitFor(t, 10*time.Second, "three hosts", func() bool { return len(a.Snapshot().Hosts()) == 3 })
		if a.region != nil {
			t.Fatal("a regional detector runs")
		}
		sim.net.Kill("a3")
		waitFor(t, 10*time.Second, "a3 dead on a1", func() bool { return a.Snapshot().Host("a3").Status == StatusDead })
		if a.Stats().Verdicts != 0 {
			t.Error("a verdict without a regional detector")
		}
	})
}
