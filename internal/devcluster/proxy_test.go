package devcluster

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/demoapp"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestMain lets the test binary be the demo app, as the flame binary is.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "demo-app" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		if err := demoapp.Run(ctx, "", os.Getenv, os.Stdout); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	if len(os.Args) > 1 && os.Args[1] == "chaos-demo-app" {
		runChaosDemoApp()
	}
	if len(os.Args) > 1 && os.Args[1] == "echo-upgrader" {
		runEchoUpgrader()
	}
	if len(os.Args) > 1 && os.Args[1] == "tcp-echo" {
		runTCPEcho()
	}
	if len(os.Args) > 1 && os.Args[1] == sandbox.InitCommand {
		os.Exit(sandbox.InitMain(os.Args[2:]))
	}
	os.Exit(m.Run())
}

// freePort is a loopback port free when asked: exec machines share the
// host's network, so each listens on its own.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// startExecCluster starts a dev cluster whose hosts run machines as host
// processes of this test binary (the demo image runs it as the demo app;
// modes maps further images to the mode of the binary they run), logs
// warnings to t (unless cfg brings its own logger), stops it when the
// test ends and waits for it to converge.
func startExecCluster(t testing.TB, cfg Config, modes map[string]string) *Cluster {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	images := map[string][]string{host.DemoImage: {self, "demo-app"}}
	for image, mode := range modes {
		images[image] = []string{self, mode}
	}
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	cfg.Dir, cfg.Token, cfg.Seed = t.TempDir(), "t", 1
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	if cfg.NewDriver == nil {
		cfg.NewDriver = func(string, int, string) (driver.Driver, error) {
			return exec.New(exec.Config{Images: images}, nil), nil
		}
	}
	c, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.StopMachines(context.Background())
		c.Close()
	})
	wctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestEdgeRoutesToNearestRegion: a request for demo.localhost at the ams
// edge is answered by an ams machine; once the ams machines are stopped, by
// the next region's, paying the distance — and no request fails meanwhile.
// The control plane and its catalog are down throughout: the data plane
// routes by the hosts' gossip alone.
func TestEdgeRoutesToNearestRegion(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{ControlPlane: true}, nil)
	if err := c.Plane.Close(); err != nil {
		t.Fatalf("stop the control plane: %v", err)
	}
	edges := c.Edges()
	if len(edges) != 3 || edges["ams"] == "" || edges["iad"] == "" || edges["syd"] == "" {
		t.Fatalf("edges %v, want one per region", edges)
	}

	// One demo machine on each ams host, one in iad and one in syd, each
	// with a service on port 80 gated by a tcp check.
	byHost := map[string]*Host{}
	for _, h := range c.Hosts {
		byHost[h.ID] = h
	}
	machines := map[string]string{} // id → host
	for _, id := range []string{"ams-1", "ams-2", "iad-1", "syd-1"} {
		port := freePort(t)
		m, err := c.HostClient(byHost[id]).Create(ctx, "demo", api.LaunchMachineInput{Config: demoConfig(port)})
		if err != nil {
			t.Fatalf("create on %s: %v", id, err)
		}
		machines[m.ID] = id
	}
	ams := byHost["ams-1"]
	waitUntil(t, "every machine routable at the ams edge", func() bool {
		n := 0
		for _, tg := range ams.Proxy.Table().Targets("demo", 80) {
			if tg.Excluded == route.Included {
				n++
			}
		}
		return n == 4
	})

	// "Next region" is by measured RTT: wait until ams-1 has measured it
	// to both other regions (iad is nearer than syd).
	waitUntil(t, "RTTs measured from ams-1", func() bool {
		snap := ams.Cluster.Snapshot()
		return snap.RTT("iad-1") > 0 && snap.RTT("syd-1") > snap.RTT("iad-1")
	})
	client := &http.Client{Timeout: 30 * time.Second}
	ask := func() (region string, status int, took time.Duration) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+edges["ams"]+"/", nil)
		req.Host = "demo.localhost"
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request at the ams edge: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		took = time.Since(start)
		if resp.StatusCode != 200 {
			t.Logf("answer %d: %s", resp.StatusCode, b)
			return "", resp.StatusCode, took
		}
		var id struct {
			Env map[string]string `json:"env"`
		}
		if err := json.Unmarshal(b, &id); err != nil {
			t.Fatalf("not the demo app's answer: %s", b)
		}
		if id.Env["FLY_REGION"] == "" || machines[id.Env["FLY_MACHINE_ID"]] == "" {
			t.Fatalf("answer from an unknown machine: %s", b)
		}
		return id.Env["FLY_REGION"], 200, took
	}
	for i := range 10 {
		if region, status, _ := ask(); status != 200 || region != "ams" {
			t.Fatalf("request %d: %d from %q, want 200 from ams", i, status, region)
		}
	}

	// The ams machines stop. The edge may still believe them started for
	// a moment: a refused connect moves the request on, so none fails.
	for id, h := range machines {
		if byHost[h].Region != "ams" {
			continue
		}
		if err := c.HostClient(byHost[h]).Stop(ctx, "demo", id, api.StopMachineInput{}); err != nil {
			t.Fatalf("stop %s: %v", id, err)
		}
	}
	rtt := geo.RTT(mustRegion(t, "ams"), mustRegion(t, "iad"))
	for i := range 10 {
		region, status, took := ask()
		if status != 200 || region != "iad" {
			t.Fatalf("request %d after the stop: %d from %q, want 200 from iad (the nearest other region)", i, status, region)
		}
		// The request crossed to iad and back over the simulated
		// network at least once.
		if took < rtt {
			t.Errorf("request %d answered from iad in %v, under the round trip of %v", i, took, rtt)
		}
	}
}

func mustRegion(t *testing.T, code string) geo.Region {
	t.Helper()
	r, ok := geo.Lookup(code)
	if !ok {
		t.Fatalf("no region %s", code)
	}
	return r
}
