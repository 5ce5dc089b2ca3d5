package cli

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/host"
)

// TestMain lets the test binary be the demo app, for machines run by the
// exec driver.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "demo-app" {
		os.Exit(Main(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// demoRegion asks url for the demo app and returns the region that
// answered.
func demoRegion(client *http.Client, url string, header ...string) (string, error) {
	req, _ := http.NewRequest("GET", url+"/", nil)
	req.Host = "demo.localhost"
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("%s: %.200s", resp.Status, b)
	}
	var id struct {
		Env map[string]string `json:"env"`
	}
	if err := json.Unmarshal(b, &id); err != nil {
		return "", fmt.Errorf("not the demo app's answer: %.200s", b)
	}
	return id.Env["FLY_REGION"], nil
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(30 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// startDemoDev starts a dev cluster with the control plane and the chaos
// API, hostsPerRegion hosts in each of ams and iad, and one demo machine
// (exec driver: the test binary) on each host, served by the edges on port
// 80.
func startDemoDev(t *testing.T, hostsPerRegion int) *devcluster.Cluster {
	t.Helper()
	ctx := context.Background()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	images := map[string][]string{host.DemoImage: {self, "demo-app"}}
	dev, err := devcluster.Start(ctx, devcluster.Config{
		Dir: t.TempDir(), Token: "agent-secret", Seed: 1, Regions: []string{"ams", "iad"}, HostsPerRegion: hostsPerRegion,
		Logger: slog.New(slog.DiscardHandler),
		NewDriver: func(string, int, string) (driver.Driver, error) {
			return exec.New(exec.Config{Images: images}, nil), nil
		},
		ControlPlane: true, Chaos: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dev.StopMachines(context.Background())
		dev.Close()
	})
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := dev.WaitConverged(wctx); err != nil {
		t.Fatal(err)
	}
	// One demo machine in each region, behind the edges.
	for _, h := range dev.Hosts {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		_, err = dev.HostClient(h).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
			Services: []api.MachineService{{
				Protocol: "tcp", InternalPort: port,
				Ports:  []api.MachinePort{{Port: ptrTo(80), Handlers: []string{"http"}}},
				Checks: []api.MachineServiceCheck{{Type: ptrTo("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
			}},
		}})
		if err != nil {
			t.Fatalf("create on %s: %v", h.ID, err)
		}
	}
	return dev
}

// TestChaosKillRegion runs `flame chaos kill-region ams` against a dev
// cluster: the ams edge stops answering, and requests through the global
// entry from a client in ams keep being answered, from iad, none failing.
func TestChaosKillRegion(t *testing.T) {
	ctx := context.Background()
	dev := startDemoDev(t, 1)
	client := &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{}}
	t.Cleanup(client.CloseIdleConnections)
	edges, global := dev.Edges(), "http://"+dev.GlobalAddr
	for _, r := range []string{"ams", "iad"} {
		waitFor(t, "the "+r+" edge to serve its region's machine", func() bool {
			got, err := demoRegion(client, "http://"+edges[r])
			return err == nil && got == r
		})
	}
	if got, err := demoRegion(client, global); err != nil || got != "ams" {
		t.Fatalf("global entry before: %q, %v; want ams", got, err)
	}

	// Requests through the global entry, all along.
	var (
		mu      sync.Mutex
		answers = map[string]int{}
		failed  []error
	)
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, err := demoRegion(client, global)
			mu.Lock()
			if err != nil {
				failed = append(failed, err)
			} else {
				answers[r]++
			}
			mu.Unlock()
		}
	}()
	waitFor(t, "answers from ams through the global entry", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return answers["ams"] >= 5
	})

	flags := []string{"--api", dev.Plane.URL(), "--token-file", secretFile(t, dev.Plane.AdminToken)}
	code, out, stderr := run(append([]string{"chaos", "kill-region", "ams", "--json"}, flags...)...)
	if code != 0 {
		t.Fatalf("flame chaos kill-region: exit %d, %s", code, stderr)
	}
	var st devcluster.FaultStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Killed) != 1 || st.Killed[0] != "ams-1" {
		t.Fatalf("flame chaos kill-region printed %q (%v), want ams-1 killed", out, err)
	}
	waitFor(t, "the ams edge to stop answering", func() bool {
		_, err := demoRegion(client, "http://"+edges["ams"])
		return err != nil
	})
	mu.Lock()
	before := answers["iad"]
	mu.Unlock()
	waitFor(t, "answers from iad through the global entry", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return answers["iad"] >= before+20
	})
	close(stop)
	<-done
	if len(failed) > 0 {
		t.Errorf("%d requests through the global entry failed, first: %v", len(failed), failed[0])
	}
	if got, err := demoRegion(client, global); err != nil || got != "iad" {
		t.Errorf("global entry after: %q, %v; want iad", got, err)
	}
	code, out, stderr = run(append([]string{"chaos", "status"}, flags...)...)
	if code != 0 || !strings.Contains(out, "killed") || !strings.Contains(out, "ams-1") {
		t.Errorf("flame chaos status: exit %d, %q %q", code, out, stderr)
	}

	// Revived, the region's host starts from its data dir, its machine
	// there and restarted by its policy, as after any crash: the global
	// entry answers from ams again.
	if code, out, stderr = run(append([]string{"chaos", "revive", "ams"}, flags...)...); code != 0 || !strings.Contains(out, "no faults") {
		t.Fatalf("flame chaos revive: exit %d, %q %q", code, out, stderr)
	}
	ms, err := dev.HostClient(dev.Hosts[0]).List(ctx, "demo", api.ListMachinesOptions{})
	if err != nil || len(ms) != 1 {
		t.Fatalf("machines of the revived host: %v, %v", ms, err)
	}
	waitFor(t, "the global entry to answer from ams again", func() bool {
		got, err := demoRegion(client, global)
		return err == nil && got == "ams"
	})

	// The control plane killed: status says so, the global entry answers
	// on; restarted, status says it is up.
	if code, out, stderr = run(append([]string{"chaos", "kill-control-plane"}, flags...)...); code != 0 || !strings.Contains(out, "control plane: killed") {
		t.Fatalf("flame chaos kill-control-plane: exit %d, %q %q", code, out, stderr)
	}
	for range 5 {
		if _, err := demoRegion(client, global); err != nil {
			t.Errorf("global entry with the control plane down: %v", err)
		}
	}
	if code, out, stderr = run(append([]string{"chaos", "status"}, flags...)...); code != 0 || !strings.Contains(out, "control plane: killed") {
		t.Errorf("flame chaos status: exit %d, %q %q", code, out, stderr)
	}
	if code, out, stderr = run(append([]string{"chaos", "restart-control-plane"}, flags...)...); code != 0 || !strings.Contains(out, "control plane: up") {
		t.Fatalf("flame chaos restart-control-plane: exit %d, %q %q", code, out, stderr)
	}
}

func TestChaosUsage(t *testing.T) {
	t.Setenv("FLAME_ADMIN_TOKEN", "")
	for _, args := range [][]string{
		{"chaos", "kill-region"},
		{"chaos", "loss", "ams", "iad", "many", "--token-file", secretFile(t, "x")},
		{"chaos", "loss", "ams", "iad", "101", "--token-file", secretFile(t, "x")},
		{"chaos", "slow-link", "ams", "iad", "-5", "--token-file", secretFile(t, "x")},
		{"chaos", "stall-host", "ams-1", "forever", "--token-file", secretFile(t, "x")},
		{"chaos", "status"}, // no admin token
		{"chaos", "heal", "--token-file", secretFile(t, "x"), "--api", "127.0.0.1:4280"},
	} {
		if code, _, stderr := run(args...); code != 2 || !strings.HasPrefix(stderr, "flame: ") {
			t.Errorf("flame %s: exit %d, stderr %q; want 2", strings.Join(args, " "), code, stderr)
		}
	}
	// Refused by the API (here: nobody listens) is not a usage error.
	if code, _, stderr := run("chaos", "heal", "--token-file", secretFile(t, "x"), "--api", "http://127.0.0.1:1"); code != 1 {
		t.Errorf("flame chaos heal against nothing: exit %d, %q; want 1", code, stderr)
	}
}
