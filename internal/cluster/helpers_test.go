package cluster

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/internal/netsim"
)

// testLogger routes logs to t.Log until the test ends.
func testLogger(t testing.TB, level slog.Level) *slog.Logger {
	w := &tlogWriter{t: t}
	t.Cleanup(w.stop)
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

type tlogWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimSpace(string(p)))
	}
	return len(p), nil
}

func (w *tlogWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// inBubble runs f in a synctest bubble: on a virtual clock that moves only
// when every goroutine of the simulation waits, so no load on the machine
// can make a host late with a probe or a timer, and a bound on how long
// the protocol takes is exact, not hoped for. The simulated network has no
// real sockets, so the whole cluster runs in the bubble.
func inBubble(t *testing.T, f func(t *testing.T)) {
	synctest.Test(t, func(t *testing.T) {
		// Registered first, run last: once every member is closed,
		// memberlist's probes and streams in flight end on their own
		// timers, which a virtual minute runs out.
		t.Cleanup(func() { time.Sleep(time.Minute) })
		f(t)
	})
}

// fastTimings shrink the failure detector for tests on a fast, lossless
// in-memory network.
func fastTimings(c *Config) {
	c.ProbeInterval = 100 * time.Millisecond
	c.ProbeTimeout = 50 * time.Millisecond
	c.GossipInterval = 20 * time.Millisecond
	c.PushPullInterval = 2 * time.Second
}

// simCluster is a set of members on one simulated network.
type simCluster struct {
	t     testing.TB
	net   *netsim.Network
	hosts map[string]*Cluster
	ids   []string
	addrs map[string]string
}

func newSim(t testing.TB, cfg netsim.Config) *simCluster {
	s := openSim(t, cfg)
	t.Cleanup(func() { s.net.Close() })
	return s
}

// openSim is newSim for a simulation that outlives the test: nothing
// closes it.
func openSim(t testing.TB, cfg netsim.Config) *simCluster {
	return &simCluster{t: t, net: netsim.New(cfg), hosts: map[string]*Cluster{}, addrs: map[string]string{}}
}

// add starts a member on a new simulated host and joins it to the first.
func (s *simCluster) add(id, region string, mod func(*Config)) *Cluster {
	s.t.Helper()
	if _, err := s.net.AddHost(id); err != nil {
		s.t.Fatal(err)
	}
	tr, err := s.net.Transport(id, 7946)
	if err != nil {
		s.t.Fatal(err)
	}
	cfg := Config{
		HostID: id, Region: region, Transport: tr,
		Addrs:    map[string]string{"api": id + ":4280", "proxy": id + ":443"},
		Capacity: Resources{CPUs: 8, MemoryMB: 16384},
		Logger:   testLogger(s.t, slog.LevelWarn),
	}
	if mod != nil {
		mod(&cfg)
	}
	c, err := New(cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		s.t.Fatal(err)
	}
	s.t.Cleanup(func() { c.Close() })
	if len(s.ids) > 0 {
		if _, err := c.Join([]string{s.addrs[s.ids[0]]}); err != nil {
			s.t.Fatalf("%s joins: %v", id, err)
		}
	}
	s.hosts[id] = c
	s.ids = append(s.ids, id)
	s.addrs[id] = tr.Addr()
	return c
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// machine returns a valid machine for tests.
func machine(id, app, region string) Machine {
	return Machine{
		ID: id, App: app, Org: "personal", Region: region, State: "started",
		InstanceID: "01J" + strings.ToUpper(id), PrivateIP: "fdaa:0:1::2", ProcessGroup: "app",
		Services: []Service{{
			Protocol: "tcp", InternalPort: 8080,
			Ports: []Port{
				{Port: 80, Handlers: []string{"http"}, ForceHTTPS: true},
				{Port: 443, Handlers: []string{"tls", "http"}},
				{Port: 10000, Handlers: []string{"proxy_proto"}, ProxyProto: "v2"},
			},
			Concurrency: Concurrency{Type: "requests", SoftLimit: 20, HardLimit: 25},
		}},
		Checks: []CheckStatus{{Name: "servicecheck-00-http-8080", Status: CheckPassing, Output: "200 OK"}},
	}
}

func machines(prefix, app, region string, n int) []Machine {
	ms := make([]Machine, n)
	for i := range ms {
		ms[i] = machine(fmt.Sprintf("%s%04d", prefix, i), app, region)
	}
	return ms
}

// view summarizes what one member holds of every owner: id → version and
// machine ids with states and check statuses.
func view(s *Snapshot) map[string]string {
	out := map[string]string{}
	for _, h := range s.Hosts() {
		var b strings.Builder
		fmt.Fprintf(&b, "v%d free=%v load=%v", h.Version, h.Free, h.Load)
		for _, m := range h.Machines {
			fmt.Fprintf(&b, " %s/%s", m.ID, m.State)
			for _, c := range m.Checks {
				fmt.Fprintf(&b, "/%s", c.Status)
			}
		}
		out[h.ID] = b.String()
	}
	return out
}

// converged reports whether every listed member holds the same view of
// every host, and sees every listed host with the given status.
func converged(cs []*Cluster, status HostStatus) bool {
	var want map[string]string
	for _, c := range cs {
		s := c.Snapshot()
		if len(s.Hosts()) != len(cs) {
			return false
		}
		for _, h := range s.Hosts() {
			if h.Status != status {
				return false
			}
		}
		v := view(s)
		if want == nil {
			want = v
			continue
		}
		if fmt.Sprint(v) != fmt.Sprint(want) {
			return false
		}
	}
	return true
}
