package devcluster

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/host"
)

// tWriter routes logs to t.Log until the test ends; memberlist leaves a
// few goroutines of its own behind that may still log after that.
type tWriter struct {
	t    testing.TB
	over *atomic.Bool
}

func (w tWriter) Write(p []byte) (int, error) {
	if !w.over.Load() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func startDev(t *testing.T) *Cluster {
	t.Helper()
	ctx := context.Background()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) }) // runs after the cluster's cleanup
	c, err := Start(ctx, Config{
		Dir: t.TempDir(), Token: "t", Seed: 1,
		Logger: slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewDriver: func(string, int, string) (driver.Driver, error) {
			return exec.New(exec.Config{}, nil), nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.StopMachines(context.Background())
		c.Close()
	})
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func ptr[T any](v T) *T { return &v }

// demoConfig is a demo machine listening on port, served by the edges on
// port 80 once a TCP check every 100 ms passes.
func demoConfig(port int) *api.MachineConfig {
	return &api.MachineConfig{
		Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
		Services: []api.MachineService{{
			Protocol: "tcp", InternalPort: port,
			Ports:  []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
			Checks: []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
		}},
	}
}

func waitUntil(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(15 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func query(t *testing.T, server, name string, qtype uint16) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(mdns.Fqdn(name), qtype)
	r, _, err := new(mdns.Client).Exchange(m, server)
	if err != nil {
		t.Fatalf("dns %s: %v", name, err)
	}
	return r
}

// TestSixHostsThreeRegions brings the default dev cluster up, runs a machine
// on one host and finds it from a host on the other side of the world by
// DNS; then a host dies and its machine is shown unreachable.
func TestSixHostsThreeRegions(t *testing.T) {
	c := startDev(t)
	if len(c.Hosts) != 6 {
		t.Fatalf("%d hosts, want 6", len(c.Hosts))
	}
	regions := map[string]int{}
	for _, h := range c.Hosts {
		regions[h.Region]++
	}
	if regions["ams"] != 2 || regions["iad"] != 2 || regions["syd"] != 2 {
		t.Fatalf("hosts per region = %v", regions)
	}
	ctx := context.Background()
	iad := c.Hosts[2]
	if iad.Region != "iad" {
		t.Fatalf("host 2 is in %s", iad.Region)
	}
	m, err := c.HostClient(iad).Create(ctx, "web", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: "exec:/bin/sleep", Init: api.MachineInit{Cmd: []string{"60"}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	syd := c.Hosts[4]
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := query(t, syd.DNSAddr, "web.internal", mdns.TypeA)
		if len(r.Answer) == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("web.internal never resolved on %s: %v", syd.ID, r)
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := query(t, syd.DNSAddr, "vms.web.internal", mdns.TypeTXT)
	if len(r.Answer) != 1 || !strings.Contains(r.Answer[0].String(), m.ID+" iad") {
		t.Errorf("vms.web.internal = %v", r.Answer)
	}
	if r := query(t, syd.DNSAddr, "nothing.internal", mdns.TypeA); r.Rcode != mdns.RcodeNameError {
		t.Errorf("unknown app: rcode %d", r.Rcode)
	}

	// A check turning critical on iad is seen in syd.
	var healthy atomic.Bool
	healthy.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !healthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	port := srv.Listener.Addr().(*net.TCPAddr).Port
	checked, err := c.HostClient(iad).Create(ctx, "web", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: "exec:/bin/sleep", Init: api.MachineInit{Cmd: []string{"60"}},
		Checks: map[string]api.MachineCheck{"alive": {Type: ptr("http"), Port: &port, Interval: api.Dur(50 * time.Millisecond)}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	checkIn := func(h *Host) string {
		if m := h.Cluster.Snapshot().Machine(checked.ID); m != nil && len(m.Checks) == 1 {
			return m.Checks[0].Status
		}
		return ""
	}
	waitUntil(t, "check passing in syd", func() bool { return checkIn(syd) == "passing" })
	healthy.Store(false)
	waitUntil(t, "check critical in syd", func() bool { return checkIn(syd) == "critical" })

	// The iad host dies: the others keep its machine, marked unreachable.
	c.Net.Kill(iad.ID)
	deadline = time.Now().Add(15 * time.Second)
	for {
		snap := syd.Cluster.Snapshot()
		if h := snap.Host(iad.ID); h != nil && !h.Up() {
			if snap.Machine(m.ID) == nil {
				t.Fatal("dead host's machine forgotten")
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("dead host never declared dead")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if r := query(t, syd.DNSAddr, "web.internal", mdns.TypeA); len(r.Answer) != 0 {
		t.Errorf("a machine on a dead host still resolves: %v", r.Answer)
	}
}
