package server_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/server"
)

// tWriter routes logs to t.Log until the test ends (memberlist may log a
// little after that).
type tWriter struct {
	t    testing.TB
	over *atomic.Bool
	mu   *sync.Mutex
	all  *strings.Builder // everything logged, for tests that read it
}

func (w tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	w.all.Write(p)
	w.mu.Unlock()
	if !w.over.Load() {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

// dev is a dev cluster with a control plane, its fake drivers and its logs.
type dev struct {
	*devcluster.Cluster
	admin   *api.Client
	drivers map[string]*fake.Driver
	logMu   sync.Mutex
	logs    strings.Builder
}

// Logs returns everything logged so far.
func (d *dev) Logs() string {
	d.logMu.Lock()
	defer d.logMu.Unlock()
	return d.logs.String()
}

type devOptions struct {
	regions  []string
	perReg   int
	capacity cluster.Resources
	server   server.Config
}

// startDev runs hosts with the fake driver and a control plane in front of
// them, and returns the cluster and a client holding the admin token.
func startDev(t *testing.T, o devOptions) *dev {
	t.Helper()
	ctx := context.Background()
	d := &dev{drivers: map[string]*fake.Driver{}}
	var drvMu sync.Mutex
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	if o.regions == nil {
		o.regions = []string{"ams", "iad"}
	}
	if o.perReg == 0 {
		o.perReg = 2
	}
	if o.capacity == (cluster.Resources{}) {
		o.capacity = cluster.Resources{CPUs: 64, MemoryMB: 64 * 1024}
	}
	c, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: o.regions, HostsPerRegion: o.perReg,
		Logger: slog.New(slog.NewTextHandler(tWriter{t, over, &d.logMu, &d.logs}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		NewDriver: func(id string, _ int, _ string) (driver.Driver, error) {
			drvMu.Lock()
			defer drvMu.Unlock()
			d.drivers[id] = fake.New()
			return d.drivers[id], nil
		},
		Cluster:      cluster.Config{Capacity: o.capacity},
		ControlPlane: true, Server: o.server,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	if c.Plane.AdminToken == "" {
		t.Fatal("a fresh control plane made no admin token")
	}
	d.Cluster = c
	d.admin = api.NewClient(c.Plane.URL(), c.Plane.AdminToken)
	return d
}

// orgWithApp creates an org, a token for it and an app in it, and returns a
// client holding the token, and the token.
func orgWithApp(t *testing.T, d *dev, org, app string) (*api.Client, string) {
	t.Helper()
	tok, err := d.Plane.AddOrg(context.Background(), org, org)
	if err != nil {
		t.Fatal(err)
	}
	cl := api.NewClient(d.Plane.URL(), tok)
	if _, err := cl.CreateApp(context.Background(), api.CreateAppInput{AppName: app, OrgSlug: org}); err != nil {
		t.Fatalf("create app %s: %v", app, err)
	}
	return cl, tok
}

// spec returns the spec a machine's workload was last started with.
func (d *dev) spec(t *testing.T, id string) driver.Spec {
	t.Helper()
	for _, drv := range d.drivers {
		if p := drv.Process(id); p != nil {
			return p.Spec()
		}
	}
	t.Fatalf("machine %s never started on any host", id)
	return driver.Spec{}
}

// rawGet answers a GET as text.
func rawGet(t *testing.T, url, token string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func waitUntil(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func status(err error) int {
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae.Status
	}
	if err == nil {
		return 200
	}
	return -1
}

func demoConfig() *api.MachineConfig {
	return &api.MachineConfig{Image: "demo", Guest: &api.MachineGuest{CPUKind: "shared", CPUs: 1, MemoryMB: 256}}
}
