package cluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
)

// TestJoinLeave runs three members over memberlist's real UDP/TCP transport
// on loopback: they join, publish, see each other's facts, and one leaves.
func TestJoinLeave(t *testing.T) {
	var cs []*Cluster
	for i, region := range []string{"ams", "ams", "syd"} {
		c, err := New(Config{
			HostID: []string{"h1", "h2", "h3"}[i], Region: region,
			BindAddr: "127.0.0.1", BindPort: 0,
			Addrs:    map[string]string{"api": "127.0.0.1:4280"},
			Capacity: Resources{CPUs: 4, MemoryMB: 8192},
			Logger:   testLogger(t, slog.LevelWarn),
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if i > 0 {
			if n, err := c.Join([]string{cs[0].GossipAddr()}); err != nil || n != 1 {
				t.Fatalf("join: %d, %v", n, err)
			}
		}
		cs = append(cs, c)
	}
	for i, c := range cs {
		err := c.Publish(HostFacts{
			Machines: []Machine{machine("m"+string(rune('a'+i)), "web", c.cfg.Region)},
			Free:     Resources{CPUs: 3, MemoryMB: 4096}, Load: 0.25,
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 10*time.Second, "three members to agree", func() bool { return converged(cs, StatusAlive) })
	// The regional detectors share memberlist's transport: h1 and h2 find
	// each other through it, h3 is alone in its region.
	waitFor(t, 10*time.Second, "the regional detectors to form", func() bool {
		return cs[0].region.NumMembers() == 2 && cs[1].region.NumMembers() == 2 && cs[2].region.NumMembers() == 1
	})

	s := cs[2].Snapshot()
	h1 := s.Host("h1")
	if h1.Region != "ams" || h1.Capacity.CPUs != 4 || h1.Free.MemoryMB != 4096 || h1.Addrs["api"] != "127.0.0.1:4280" || h1.Addrs["gossip"] == "" {
		t.Errorf("h1 as seen by h3: %+v", h1)
	}
	if got := len(s.AppMachines("web")); got != 3 {
		t.Errorf("web machines: %d, want 3", got)
	}
	if got := s.HostsInRegion("ams"); len(got) != 2 {
		t.Errorf("hosts in ams: %d", len(got))
	}

	if err := cs[1].Leave(time.Second); err != nil {
		t.Fatal(err)
	}
	cs[1].Close()
	waitFor(t, 10*time.Second, "h2 to be seen as left", func() bool {
		for _, c := range []*Cluster{cs[0], cs[2]} {
			if h := c.Snapshot().Host("h2"); h == nil || h.Status != StatusLeft {
				return false
			}
		}
		return true
	})
	if n := cs[0].Stats().Issued; n != 0 {
		t.Errorf("h1's region took h2's leave for a death: %d verdicts", n)
	}
	// Its facts stay, for its machines to be shown as unreachable.
	if m := cs[0].Snapshot().Machine("mb"); m == nil || m.Host != "h2" {
		t.Errorf("h2's machine after it left: %+v", m)
	}
	if err := cs[0].Remove("h1"); !errors.Is(err, ErrHostUp) {
		t.Errorf("removing itself: %v", err)
	}
	if err := cs[0].Remove("h2"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "h2 to be forgotten", func() bool {
		s := cs[0].Snapshot()
		return s.Host("h2") == nil && s.Machine("mb") == nil
	})
}

// TestPartitionHeals: two sides change their facts while cut apart, and the
// whole cluster agrees again after the partition heals.
func TestPartitionHeals(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 1, Latency: func(string, string) time.Duration { return time.Millisecond }})
		var cs []*Cluster
		ids := []string{"a1", "a2", "a3", "b1", "b2", "b3"}
		for _, id := range ids {
			cs = append(cs, sim.add(id, id[:1]+"rg", fastTimings))
		}
		for _, c := range cs {
			if err := c.Publish(HostFacts{Machines: machines(c.cfg.HostID+"x", "app", c.cfg.Region, 3)}); err != nil {
				t.Fatal(err)
			}
		}
		waitFor(t, 10*time.Second, "the cluster to converge", func() bool { return converged(cs, StatusAlive) })

		sim.net.Partition(ids[:3], ids[3:])
		waitFor(t, 15*time.Second, "each side to see the other dead", func() bool {
			for i, c := range cs {
				for j, id := range ids {
					h := c.Snapshot().Host(id)
					if h == nil || (i < 3) != (j < 3) && h.Status != StatusDead {
						return false
					}
				}
			}
			return true
		})
		// Both sides change while apart.
		for i, c := range cs {
			ms := machines(c.cfg.HostID+"x", "app", c.cfg.Region, 3)
			ms[0].State = "stopped"
			ms = append(ms[:1], ms[2:]...)
			ms = append(ms, machine(c.cfg.HostID+"y", "db", c.cfg.Region))
			if err := c.Publish(HostFacts{Machines: ms, Load: float64(i)}); err != nil {
				t.Fatal(err)
			}
		}
		sim.net.Heal()
		defer func() {
			if t.Failed() {
				for _, c := range cs {
					for _, h := range c.Snapshot().Hosts() {
						t.Logf("%s sees %s %s %s", c.cfg.HostID, h.ID, h.Status, view(c.Snapshot())[h.ID])
					}
				}
			}
		}()
		waitFor(t, 20*time.Second, "the cluster to converge after the heal", func() bool { return converged(cs, StatusAlive) })
		for _, c := range cs {
			if got := len(c.Snapshot().AppMachines("db")); got != 6 {
				t.Fatalf("%s sees %d db machines, want 6", c.cfg.HostID, got)
			}
		}
	})
}

// TestDeadHostKeepsFacts: a host that dies is marked dead, its machines stay
// visible, and it comes back alive when its network returns.
func TestDeadHostKeepsFacts(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 2, Latency: func(string, string) time.Duration { return time.Millisecond }})
		a := sim.add("a", "ams", fastTimings)
		b := sim.add("b", "ams", fastTimings)
		c := sim.add("c", "fra", fastTimings)
		if err := c.Publish(HostFacts{Machines: machines("c", "web", "fra", 2)}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "c's machines everywhere", func() bool {
			return len(a.Snapshot().AppMachines("web")) == 2 && len(b.Snapshot().AppMachines("web")) == 2
		})
		sim.net.Kill("c")
		waitFor(t, 10*time.Second, "c dead on a and b", func() bool {
			return a.Snapshot().Host("c").Status == StatusDead && b.Snapshot().Host("c").Status == StatusDead
		})
		s := a.Snapshot()
		if ms := s.AppMachines("web"); len(ms) != 2 || s.HostOf(ms[0]).Up() {
			t.Fatalf("dead host's machines: %d, host up %v", len(ms), s.HostOf(ms[0]).Up())
		}
		sim.net.Revive("c")
		waitFor(t, 15*time.Second, "c alive again", func() bool {
			return a.Snapshot().Host("c").Status == StatusAlive && b.Snapshot().Host("c").Status == StatusAlive
		})
	})
}

// TestSubscribe: a subscriber hears of a change, and notifications coalesce.
func TestSubscribe(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 3})
		a := sim.add("a", "ams", fastTimings)
		b := sim.add("b", "ams", fastTimings)
		waitFor(t, 5*time.Second, "b to see a", func() bool { return b.Snapshot().Host("a") != nil })
		ch, cancel := b.Subscribe()
		defer cancel()
		drain := func() {
			for {
				select {
				case <-ch:
				case <-time.After(50 * time.Millisecond):
					return
				}
			}
		}
		drain()
		for i := range 20 {
			ms := machines("a", "web", "ams", 1)
			ms[0].Checks[0].Status = []string{CheckPassing, CheckCritical}[i%2]
			if err := a.Publish(HostFacts{Machines: ms}); err != nil {
				t.Fatal(err)
			}
		}
		deadline := time.After(5 * time.Second)
		for {
			select {
			case <-ch:
			case <-deadline:
				t.Fatal("no notification")
			}
			if m := b.Snapshot().Machine("a0000"); m != nil && m.Checks[0].Status == CheckCritical {
				break
			}
		}
		cancel()
		select { // one notification may have been sent before the cancel
		case <-ch:
		default:
		}
		if err := a.Publish(HostFacts{}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, "a's machines gone on b", func() bool { return b.Snapshot().Machine("a0000") == nil })
		select {
		case <-ch:
			t.Error("notified after cancel")
		default:
		}
	})
}

// TestManyMachines: a host with more machines than fit a packet publishes
// them in chained deltas; a later small change still spreads by gossip.
func TestManyMachines(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 4, Latency: func(string, string) time.Duration { return time.Millisecond }})
		var cs []*Cluster
		for _, id := range []string{"a", "b", "c", "d"} {
			cs = append(cs, sim.add(id, map[string]string{"a": "ams", "b": "ams", "c": "syd", "d": "syd"}[id], fastTimings))
		}
		ms := machines("m", "big", "ams", 400)
		if err := cs[0].Publish(HostFacts{Machines: ms}); err != nil {
			t.Fatal(err)
		}
		// Publish returns before the snapshots change: wait for the machines
		// themselves, then for every view to agree.
		waitFor(t, 10*time.Second, "400 machines everywhere", func() bool {
			for _, c := range cs {
				if len(c.Snapshot().AppMachines("big")) != 400 {
					return false
				}
			}
			return converged(cs, StatusAlive)
		})
		ms[123].State = "stopped"
		ms = ms[:300]
		if err := cs[0].Publish(HostFacts{Machines: ms}); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the change everywhere", func() bool {
			m := cs[3].Snapshot().Machine("m0123")
			return m != nil && m.State == "stopped" && len(cs[3].Snapshot().AppMachines("big")) == 300 && converged(cs, StatusAlive)
		})
	})
}

// TestRTT: probes give every host its distance to the others.
func TestRTT(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		sim := newSim(t, netsim.Config{Seed: 5, Latency: func(from, to string) time.Duration {
			if from[0] == to[0] {
				return time.Millisecond
			}
			return 15 * time.Millisecond
		}})
		a := sim.add("a1", "ams", fastTimings)
		sim.add("a2", "ams", fastTimings)
		sim.add("s1", "syd", fastTimings)
		waitFor(t, 10*time.Second, "RTTs on a1", func() bool {
			s := a.Snapshot()
			return s.RTT("a2") > 0 && s.RTT("s1") > 0
		})
		s := a.Snapshot()
		// In virtual time a round trip is what the links make it, exactly.
		if near, far := s.RTT("a2"), s.RTT("s1"); near != 2*time.Millisecond || far != 30*time.Millisecond {
			t.Errorf("RTT to a2 %s (want 2ms), to s1 %s (want 30ms)", near, far)
		}
	})
}

func TestConfigValidate(t *testing.T) {
	ok := Config{HostID: "h1", Region: "ams"}
	for _, tc := range []struct {
		name string
		mod  func(*Config)
	}{
		{"bad host id", func(c *Config) { c.HostID = "-x" }},
		{"no region", func(c *Config) { c.Region = "" }},
		{"probe timeout", func(c *Config) { c.ProbeTimeout = time.Second }},
		{"meta too big", func(c *Config) {
			c.Addrs = map[string]string{}
			for _, k := range []string{"a", "b", "c", "d", "e"} {
				c.Addrs[k] = string(slices.Repeat([]byte("x"), 120))
			}
		}},
		{"bad addr name", func(c *Config) { c.Addrs = map[string]string{"a b": "x"} }},
		{"negative dilation", func(c *Config) { c.Dilation = -1 }},
	} {
		c := ok
		tc.mod(&c)
		if _, err := New(c); err == nil {
			t.Errorf("%s: accepted", tc.name)
		}
	}
	if _, err := New(ok); err != nil {
		t.Fatal(err)
	}
}

// TestDilation: every timing, set or default, and the package's own, is
// stretched by the factor.
func TestDilation(t *testing.T) {
	c := Config{HostID: "h1", Region: "ams", ProbeInterval: 400 * time.Millisecond, Dilation: 3}
	c.setDefaults()
	for name, got := range map[string][2]time.Duration{
		"probe interval (set)":          {c.ProbeInterval, 1200 * time.Millisecond},
		"probe timeout":                 {c.ProbeTimeout, 3 * DefaultProbeTimeout},
		"region probe interval":         {c.RegionProbeInterval, 3 * DefaultRegionProbeInterval},
		"anti-entropy interval":         {c.AntiEntropyInterval, 3 * DefaultAntiEntropyInterval},
		"gossip interval":               {c.GossipInterval, 3 * DefaultGossipInterval},
		"package's own (exchangeEvery)": {c.stretch(exchangeEvery), 3 * exchangeEvery},
		"memberlist's TCP timeout":      {c.memberlistConfig().TCPTimeout, 15 * time.Second},
	} {
		if got[0] != got[1] {
			t.Errorf("%s: %s, want %s", name, got[0], got[1])
		}
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
}

// TestManyJoinAtOnce: a hundred hosts in ten regions that all join at
// once, each to one of the first four, see one another alive with their
// facts within seconds. Memberlist's gossip of the newcomers dies out
// before reaching everyone, and its periodic push/pull is minutes away
// here: it is the membership swaps each host makes after joining
// (settleAfter) that bring them together (without them, not within 8 s;
// in 1.9-2.7 s with them). A hundred hosts need more CPU than a busy
// machine has to run them in real time: the cluster runs on a virtual
// clock, so the bound is on the protocol's time, not on the machine's.
func TestManyJoinAtOnce(t *testing.T) {
	inBubble(t, func(t *testing.T) {
		const n = 100
		sim := newSim(t, netsim.Config{Seed: 7, Latency: func(a, b string) time.Duration {
			if a[len(a)-1] == b[len(b)-1] {
				return time.Millisecond / 2
			}
			return 80 * time.Millisecond
		}})
		first := sim.add("h0", "r0", func(c *Config) { c.PushPullInterval = time.Minute })
		if err := first.Publish(HostFacts{Machines: machines("h0x", "app", "r0", 3)}); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		cs := []*Cluster{first}
		for i := 1; i < n; i++ {
			id := fmt.Sprintf("h%d", i)
			if _, err := sim.net.AddHost(id); err != nil {
				t.Fatal(err)
			}
			tr, err := sim.net.Transport(id, 7946)
			if err != nil {
				t.Fatal(err)
			}
			c, err := New(Config{HostID: id, Region: "r" + id[len(id)-1:], Transport: tr, PushPullInterval: time.Minute,
				Logger: testLogger(t, slog.LevelWarn)})
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			if err := c.Publish(HostFacts{Machines: machines(id+"x", "app", c.cfg.Region, 3)}); err != nil {
				t.Fatal(err)
			}
			cs = append(cs, c)
		}
		// All at once, each to one of the first four.
		for i, c := range cs[1:] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if _, err := c.Join([]string{cs[i%4].GossipAddr()}); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		start := time.Now()
		defer func() {
			if !t.Failed() {
				return
			}
			for _, c := range cs {
				hs := c.Snapshot().Hosts()
				bad := []string{}
				for _, h := range hs {
					if h.Status != StatusAlive || h.Version == 0 {
						bad = append(bad, fmt.Sprintf("%s:%v:v%d", h.ID, h.Status, h.Version))
					}
				}
				if len(hs) != n || len(bad) > 0 {
					t.Logf("%s sees %d members=%d bad=%v", c.cfg.HostID, len(hs), c.ml.NumMembers(), bad)
				}
			}
		}()
		waitFor(t, 8*time.Second, "every host to see every other with its facts", func() bool {
			for _, c := range cs {
				hs := c.Snapshot().Hosts()
				if len(hs) != n {
					return false
				}
				for _, h := range hs {
					if h.Status != StatusAlive || h.Version == 0 {
						return false
					}
				}
			}
			return true
		})
		t.Logf("all %d hosts see one another %s after the joins", n, time.Since(start).Round(time.Millisecond))
	})
}
