package devcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/proxy/route"
)

// What the chaos runs found, each pinned by a test of its own.

// heldPrepare is a fake driver whose Prepare waits until released: a
// create that takes as long as a slow image pull.
type heldPrepare struct {
	*fake.Driver
	entered chan struct{}
	release chan struct{}
}

func (d *heldPrepare) Prepare(ctx context.Context, spec driver.Spec) (driver.Image, error) {
	select {
	case d.entered <- struct{}{}:
	default:
	}
	select {
	case <-d.release:
	case <-ctx.Done():
		return driver.Image{}, ctx.Err()
	}
	return d.Driver.Prepare(ctx, spec)
}

// TestKillControlPlaneMidCreate: a control plane killed while its
// reconciler waits on a host's create dies at once, as a crashed process
// does, and starts again — found by a chaos run (seed 101 of the first
// sweep), where KillControlPlane waited for the create, which waits out a
// silenced network for up to five minutes.
func TestKillControlPlaneMidCreate(t *testing.T) {
	d := &heldPrepare{Driver: fake.New(), entered: make(chan struct{}, 1), release: make(chan struct{})}
	c := startPlaneDev(t, []string{"ams"}, func(string) driver.Driver { return d })
	t.Cleanup(func() { close(d.release) }) // before the cluster closes
	cl := appClient(t, c)
	ctx := context.Background()
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "app", Regions: map[string]int{"ams": 1},
		Config: &api.MachineConfig{Image: "demo", Guest: smallGuest}}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.entered:
	case <-time.After(30 * time.Second):
		t.Fatal("the reconciler never asked the host for the group's machine")
	}
	killed := make(chan error, 1)
	go func() { killed <- c.KillControlPlane(ctx) }()
	// A kill takes what closing the plane's parts takes — its member's
	// leave (1 s), NATS — never the five minutes a create may wait.
	select {
	case err := <-killed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("KillControlPlane is still waiting for the reconciler's create, 30 s on")
	}
	if err := c.RestartControlPlane(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestRevivedEdgeServesAtOnce: the global entry hands a revived region's
// edge requests again only once that edge can route them — found by chaos
// runs (seeds 101 and 102 of the second sweep), where requests from the
// revived region's clients reached its edge before it had heard of the
// other regions' machines, and were answered 503 "no candidate".
func TestRevivedEdgeServesAtOnce(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1}, nil)
	for _, h := range c.Hosts {
		port := freePort(t)
		if _, err := api.NewClient(h.APIURL, "t").Create(ctx, "demo", api.LaunchMachineInput{Config: demoConfig(port)}); err != nil {
			t.Fatalf("create on %s: %v", h.ID, err)
		}
	}
	waitUntil(t, "both machines routable at both edges", func() bool {
		for _, h := range c.Hosts {
			n := 0
			for _, tg := range h.Proxy.Table().Targets("demo", 80) {
				if tg.Excluded == route.Included {
					n++
				}
			}
			if n != 2 {
				return false
			}
		}
		return true
	})
	tr := &http.Transport{MaxIdleConnsPerHost: 16}
	t.Cleanup(tr.CloseIdleConnections)
	load := LoadConfig{URL: "http://" + c.GlobalAddr, Header: map[string]string{ClientRegionHeader: "iad"},
		Client: &http.Client{Transport: tr, Timeout: 20 * time.Second}}
	if _, err := c.KillRegion(ctx, "iad"); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Revive(ctx, "iad"); err != nil {
		t.Fatal(err)
	}
	// Clients of iad at once, as anycast sends them to the revived edge
	// the moment it is announced.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	for range 8 {
		wg.Go(func() {
			for range 10 {
				if s := load.Send(); s.Failed() {
					mu.Lock()
					failed = append(failed, fmt.Sprintf("status %d: %s", s.Status, s.Err))
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	if len(failed) > 0 {
		t.Errorf("%d of 80 requests from iad failed after its revival; the first: %s", len(failed), failed[0])
	}
}

// TestReviveWhereItWas: a killed host's addresses stay its own until it is
// revived, whatever else on the machine tries to take them, at every
// moment — found by chaos runs, where a revive failed because a connection,
// then a listener, had been given the killed host's port while its
// sockets were closed and not yet held again.
func TestReviveWhereItWas(t *testing.T) {
	ctx := context.Background()
	// A host's close takes a while (its driver's here): the addresses are
	// tried all along it.
	const closing = 500 * time.Millisecond
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1,
		NewDriver: func(string, int, string) (driver.Driver, error) {
			return slowClose{exec.New(exec.Config{}, nil), closing}, nil
		}}, nil)
	old := c.host("iad-1")
	taken := func(when string) {
		t.Helper()
		// Another program wants the addresses the killed host listened on.
		for _, addr := range []string{apiAddr(old.APIURL), old.DNSAddr, old.EdgeAddr} {
			if ln, err := net.Listen("tcp", addr); err == nil {
				t.Cleanup(func() { ln.Close() })
				t.Errorf("%s: %s was free for others while its host was dead", when, addr)
			}
		}
		if pc, err := net.ListenPacket("udp", old.DNSAddr); err == nil {
			t.Cleanup(func() { pc.Close() })
			t.Errorf("%s: udp %s was free for others while its host was dead", when, old.DNSAddr)
		}
	}
	if err := c.KillHost(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	c.faults.mu.Lock()
	gone := c.faults.gone[old.ID]
	c.faults.mu.Unlock()
	for closed := false; !closed; {
		select {
		case <-gone:
			closed = true
		case <-time.After(20 * time.Millisecond):
		}
		taken("while its close runs")
	}
	taken("once closed")
	// A dead host refuses: a connection is closed at once, not left
	// hanging in a backlog.
	conn, err := net.DialTimeout("tcp", apiAddr(old.APIURL), 5*time.Second)
	if err == nil {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := conn.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("a connection to the dead host's API: read %d, %v; want it closed", n, err)
		}
		conn.Close()
	}
	if _, err := c.Revive(ctx, old.ID); err != nil {
		t.Fatal(err)
	}
	if h := c.host(old.ID); h.APIURL != old.APIURL || h.DNSAddr != old.DNSAddr || h.EdgeAddr != old.EdgeAddr {
		t.Errorf("revived at %s %s %s, was at %s %s %s", h.APIURL, h.DNSAddr, h.EdgeAddr, old.APIURL, old.DNSAddr, old.EdgeAddr)
	}
}

// slowClose is a driver whose Close takes d.
type slowClose struct {
	driver.Driver
	d time.Duration
}

func (s slowClose) Close() error {
	time.Sleep(s.d)
	if c, ok := s.Driver.(interface{ Close() error }); ok {
		return c.Close()
	}
	return nil
}
