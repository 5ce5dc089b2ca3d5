package host

import (
	"context"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/server"
)

// BenchmarkControlPlaneCreateToStarted times create→started of a small
// image with the sandbox driver through the control plane (token check,
// catalog, placement, one hop to the host) and, in the same run, straight
// through the host's own API, and reports both and the difference.
// It needs root.
func BenchmarkControlPlaneCreateToStarted(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("the sandbox driver needs root")
	}
	ctx := context.Background()
	regAddr, _, digest := sleepImage(b)
	d, _, err := NewDriver(DriverConfig{Kind: DriverSandbox, DataDir: b.TempDir(), Registry: regAddr, Index: 91})
	if err != nil {
		b.Fatalf("sandbox driver: %v", err) // as root it must work
	}
	nw := netsim.New(netsim.Config{Seed: 1})
	b.Cleanup(func() { nw.Close() })
	member := func(name string) memberlist.NodeAwareTransport {
		if _, err := nw.AddHost(name); err != nil {
			b.Fatal(err)
		}
		tr, err := nw.Transport(name, 7946)
		if err != nil {
			b.Fatal(err)
		}
		return tr
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	slot := pki.NewSlot(nil) // enrolled once the plane runs
	hostDir := b.TempDir()
	h, err := New(Config{DataDir: hostDir, Region: "ams", Listener: ln, Token: "agent", Driver: d, Identity: slot,
		Cluster: cluster.Config{HostID: "ams-1", Transport: member("ams-1")}})
	if err != nil {
		b.Fatal(err)
	}
	if err := h.Start(ctx); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		h.DestroyMachines(context.Background())
		h.Close()
		h.Teardown()
	})
	pln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{DataDir: b.TempDir(), Listener: pln,
		Cluster: cluster.Config{HostID: "control", Region: "ams", Transport: member("control")},
		Join:    []string{h.Cluster.GossipAddr()}, Server: server.Config{AgentToken: "agent"}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	jt, err := p.MintJoinToken(ctx, "ams-1", time.Minute)
	if err != nil {
		b.Fatal(err)
	}
	id, err := Enroll(ctx, Enrollment{DataDir: hostDir, PlaneURL: p.URL(), JoinToken: jt.Token, HostID: "ams-1", Region: "ams", APIAddr: h.Addr()})
	if err != nil {
		b.Fatal(err)
	}
	slot.Set(id)
	tok, err := p.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		b.Fatal(err)
	}
	viaPlane := api.NewClient(p.URL(), tok)
	direct := api.NewClient("https://"+h.Addr(), "")
	direct.HTTPClient = &http.Client{Transport: &http.Transport{TLSClientConfig: p.ControlTLS("ams-1")}}
	if _, err := viaPlane.CreateApp(ctx, api.CreateAppInput{AppName: "bench", OrgSlug: "personal"}); err != nil {
		b.Fatal(err)
	}
	for end := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if hh := p.Cluster.Snapshot().Host("ams-1"); hh != nil && hh.Up() && hh.Free.CPUs > 0 {
			break
		}
		if time.Now().After(end) {
			b.Fatal("the control plane never saw the host")
		}
	}
	cfg := &api.MachineConfig{Image: "bench/sleep@" + digest, StopConfig: &api.StopConfig{Signal: ptr("SIGKILL")}}
	if m, err := viaPlane.Create(ctx, "bench", api.LaunchMachineInput{Config: cfg}); err != nil || m.State != api.StateStarted {
		b.Fatalf("warm-up machine: %v %+v", err, m)
	}
	once := func(c *api.Client) time.Duration {
		t0 := time.Now()
		m, err := c.Create(ctx, "bench", api.LaunchMachineInput{Config: cfg})
		if err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(ctx, "bench", m.ID, api.WaitOptions{State: api.StateStarted, Timeout: 10 * time.Second}); err != nil {
			b.Fatal(err)
		}
		d := time.Since(t0)
		b.StopTimer()
		if err := c.Destroy(ctx, "bench", m.ID, true); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		return d
	}
	var plane, host []time.Duration
	for b.Loop() {
		plane = append(plane, once(viaPlane))
		host = append(host, once(direct))
	}
	pp50, pp99 := percentiles(plane)
	hp50, hp99 := percentiles(host)
	b.ReportMetric(pp50, "plane-p50-ms")
	b.ReportMetric(pp99, "plane-p99-ms")
	b.ReportMetric(hp50, "host-p50-ms")
	b.ReportMetric(hp99, "host-p99-ms")
	b.ReportMetric(pp50-hp50, "overhead-p50-ms")
	b.ReportMetric(0, "ns/op")
}
