package devcluster

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/geo"
)

// recorder is a fake driver that records when workloads start and when the
// first stop began, and slows starts down a little, as real ones are.
type recorder struct {
	*fake.Driver
	mu        sync.Mutex
	starts    []time.Time
	firstStop *time.Time
	procs     []*fake.Proc
}

func (r *recorder) Start(ctx context.Context, spec driver.Spec) (driver.Process, error) {
	r.mu.Lock()
	r.starts = append(r.starts, time.Now())
	r.mu.Unlock()
	time.Sleep(20 * time.Millisecond)
	p, err := r.Driver.Start(ctx, spec)
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.procs = append(r.procs, r.Driver.Process(spec.MachineID))
	r.mu.Unlock()
	return stopRecorder{p, r}, nil
}

type stopRecorder struct {
	driver.Process
	r *recorder
}

func (s stopRecorder) Stop(ctx context.Context, sig syscall.Signal, timeout time.Duration) (driver.Exit, error) {
	s.r.mu.Lock()
	if s.r.firstStop == nil {
		now := time.Now()
		s.r.firstStop = &now
	}
	s.r.mu.Unlock()
	return s.Process.Stop(ctx, sig, timeout)
}

func startPlaneDev(t *testing.T, regions []string, drivers func(id string) driver.Driver) *Cluster {
	t.Helper()
	return startPlaneDevSpecs(t, regions, func(h HostSpec) driver.Driver { return drivers(h.ID) })
}

func startPlaneDevSpecs(t *testing.T, regions []string, drivers func(HostSpec) driver.Driver) *Cluster {
	t.Helper()
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	c, err := Start(context.Background(), Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: regions, HostsPerRegion: 1,
		Logger:        slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})),
		NewHostDriver: func(h HostSpec) (driver.Driver, error) { return drivers(h), nil },
		Cluster:       cluster.Config{Capacity: cluster.Resources{CPUs: 256, MemoryMB: 256 * 1024}},
		ControlPlane:  true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	wctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func appClient(t *testing.T, c *Cluster) *api.Client {
	t.Helper()
	ctx := context.Background()
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(c.Plane.URL(), tok)
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "shop", OrgSlug: "personal"}); err != nil {
		t.Fatal(err)
	}
	return cl
}

var smallGuest = &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}

// TestPlaneCallsCrossTheNetwork checks that the control plane (in ams)
// reaches a host in syd over the simulated network: a call forwarded there
// takes at least the one-way latency between the two; and that the host in
// syd reaches the registry (the control plane's) over it too.
func TestPlaneCallsCrossTheNetwork(t *testing.T) {
	var mu sync.Mutex
	specs := map[string]HostSpec{}
	c := startPlaneDevSpecs(t, []string{"ams", "syd"}, func(h HostSpec) driver.Driver {
		mu.Lock()
		specs[h.ID] = h
		mu.Unlock()
		return fake.New()
	})
	cl := appClient(t, c)
	ctx := context.Background()
	m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Region: "syd", Config: &api.MachineConfig{Image: "demo", Guest: smallGuest}})
	if err != nil {
		t.Fatal(err)
	}
	ams, _ := geo.Lookup("ams")
	syd, _ := geo.Lookup("syd")
	oneWay := geo.RTT(ams, syd) / 2
	for range 3 {
		begin := time.Now()
		got, err := cl.Get(ctx, "shop", m.ID)
		took := time.Since(begin)
		if err != nil || got.Region != "syd" {
			t.Fatalf("get: %+v %v", got, err)
		}
		if took < oneWay {
			t.Fatalf("a read forwarded from ams to syd took %v, less than the one-way latency %v", took, oneWay)
		}
	}
	// A connection from syd to the registry takes a round trip to ams.
	h := specs["syd-1"]
	begin := time.Now()
	conn, err := h.Dial(ctx, "tcp", h.RegistryAddr)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(begin)
	conn.Close()
	if took < 2*oneWay {
		t.Errorf("syd-1 connected to the registry in %v, less than the round trip %v to ams", took, 2*oneWay)
	}
}

// TestShutdownWhileFilling shuts a dev cluster down while the reconciler
// fills a group: nothing is started once machines are being stopped, and
// no machine runs afterwards.
func TestShutdownWhileFilling(t *testing.T) {
	var mu sync.Mutex
	recs := map[string]*recorder{}
	c := startPlaneDev(t, []string{"ams"}, func(id string) driver.Driver {
		mu.Lock()
		defer mu.Unlock()
		recs[id] = &recorder{Driver: fake.New()}
		return recs[id]
	})
	cl := appClient(t, c)
	ctx := context.Background()
	if _, err := cl.PutGroup(ctx, "shop", api.Group{Name: "app", Regions: map[string]int{"ams": 60},
		Config: &api.MachineConfig{Image: "demo", Guest: smallGuest}}); err != nil {
		t.Fatal(err)
	}
	rec := recs["ams-1"]
	started := func() int {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		return len(rec.starts)
	}
	waitUntil(t, "the group to be filling", func() bool { return started() >= 3 })
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := c.Shutdown(sctx, false); err != nil {
		t.Fatal(err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	t.Logf("%d starts before the shutdown ended", len(rec.starts))
	if len(rec.starts) >= 60 {
		t.Fatalf("the group was filled (%d starts) before the shutdown: nothing tested", len(rec.starts))
	}
	if rec.firstStop == nil {
		t.Fatal("no machine was stopped")
	}
	for _, s := range rec.starts {
		if s.After(*rec.firstStop) {
			t.Errorf("a machine started %v after the machines began to stop", s.Sub(*rec.firstStop))
		}
	}
	running := 0
	for _, p := range rec.procs {
		if p.Running() {
			running++
		}
	}
	if running > 0 {
		t.Errorf("%d of %d machines still run after the shutdown", running, len(rec.procs))
	}
}
