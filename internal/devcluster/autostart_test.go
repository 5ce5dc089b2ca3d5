package devcluster

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
)

// autostartRig is a dev cluster with one demo machine on ams-2 (stopped
// between rounds) and the ams edge on ams-1: a request for the app starts
// it over the backhaul.
type autostartRig struct {
	c      *Cluster
	client *api.Client // ams-2's Machines API
	id     string
	edge   string
	port   int
}

func newAutostartRig(t testing.TB, c *Cluster) *autostartRig {
	t.Helper()
	ctx := context.Background()
	var ams2 *Host
	for _, h := range c.Hosts {
		if h.ID == "ams-2" {
			ams2 = h
		}
	}
	if ams2 == nil {
		t.Fatal("no host ams-2")
	}
	r := &autostartRig{c: c, client: c.HostClient(ams2), edge: c.Edges()["ams"], port: freePort(t)}
	m, err := r.client.Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(r.port)},
		Services: []api.MachineService{{
			Protocol: "tcp", InternalPort: r.port, Autostart: ptr(true),
			Ports: []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
		}},
	}})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	r.id = m.ID
	return r
}

// stop stops the machine and waits until the ams edge knows it stopped.
func (r *autostartRig) stop(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	if err := r.client.Stop(ctx, "demo", r.id, api.StopMachineInput{}); err != nil {
		t.Fatalf("stop: %v", err)
	}
	edge := r.c.Hosts[0]
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		tgs := edge.Proxy.Table().Targets("demo", 80)
		if len(tgs) == 1 && tgs[0].Startable() {
			return
		}
		if time.Now().After(end) {
			t.Fatal("the edge never saw the machine stopped")
		}
	}
}

// request sends one request for the app to the ams edge and returns the
// machine that answered.
func (r *autostartRig) request(t testing.TB) (string, time.Duration) {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+r.edge+"/", nil)
	req.Host = "demo.localhost"
	began := time.Now()
	resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("request: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	took := time.Since(began)
	if resp.StatusCode != 200 {
		t.Fatalf("request: %d %s", resp.StatusCode, b)
	}
	var id struct {
		Env map[string]string `json:"env"`
	}
	if err := json.Unmarshal(b, &id); err != nil {
		t.Fatalf("not the demo app's answer: %s", b)
	}
	return id.Env["FLY_MACHINE_ID"], took
}

func (r *autostartRig) starts(t testing.TB) int {
	t.Helper()
	m, err := r.client.Get(context.Background(), "demo", r.id)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, ev := range m.Events {
		if ev.Type == api.EventStart {
			n++
		}
	}
	return n
}

// TestAutostartThroughTheEdge: a request at the ams edge for an app whose
// only machine is stopped on another host starts it there, through that
// host's proxy, and is answered by it; the control plane is down
// throughout.
func TestAutostartThroughTheEdge(t *testing.T) {
	c := startExecCluster(t, Config{ControlPlane: true}, nil)
	if err := c.Plane.Close(); err != nil {
		t.Fatal(err)
	}
	r := newAutostartRig(t, c)
	r.stop(t)
	before := r.starts(t)
	got, took := r.request(t)
	if got != r.id {
		t.Fatalf("answered by %q, want %s", got, r.id)
	}
	if n := r.starts(t) - before; n != 1 {
		t.Errorf("%d start events, want 1", n)
	}
	t.Logf("request to the stopped app answered in %v", took)
}

// BenchmarkAutostart compares, on a dev cluster of exec machines, the time
// a request to a stopped app takes (the edge on ams-1 starts the machine on
// ams-2 and waits until it accepts connections) with what starting the
// machine through its Machines API and waiting until it accepts
// connections takes. Reported per round: start-ms (API start, until
// started), ready-ms (API start, until connectable), request-ms (the held
// request, answered), overhead-ms (request − ready).
func BenchmarkAutostart(b *testing.B) {
	c := startExecCluster(b, Config{}, nil)
	r := newAutostartRig(b, c)
	ctx := context.Background()
	var start, ready, request []time.Duration
	for b.Loop() {
		// Through the API: start, then until the app answers.
		r.stop(b)
		began := time.Now()
		if _, err := r.client.Start(ctx, "demo", r.id); err != nil {
			b.Fatal(err)
		}
		start = append(start, time.Since(began))
		for {
			resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(r.port) + "/")
			if err == nil {
				resp.Body.Close()
				break
			}
			if time.Since(began) > 30*time.Second {
				b.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
		ready = append(ready, time.Since(began))
		// Through the edge.
		r.stop(b)
		_, took := r.request(b)
		request = append(request, took)
	}
	med := func(ds []time.Duration) float64 {
		s := slices.Clone(ds)
		slices.Sort(s)
		return float64(s[len(s)/2]) / float64(time.Millisecond)
	}
	b.ReportMetric(med(start), "start-ms")
	b.ReportMetric(med(ready), "ready-ms")
	b.ReportMetric(med(request), "request-ms")
	b.ReportMetric(med(request)-med(ready), "overhead-ms")
}

// TestScaleToZeroAndBack: an app whose machines have autostop stop and
// min_machines_running 1 (primary region ams) goes from two idle machines
// in ams to one — never none — and an idle machine alone in iad is stopped
// too; a request at the iad edge goes to the running ams machine, and one
// forced to iad (fly-force-region) starts iad's machine again and is
// answered by it.
func TestScaleToZeroAndBack(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{AutostopInterval: 100 * time.Millisecond}, nil)
	byHost := map[string]*Host{}
	for _, h := range c.Hosts {
		byHost[h.ID] = h
	}
	stopMode := api.Autostop(api.AutostopStop)
	ids := map[string]string{} // machine → host
	for _, hid := range []string{"ams-1", "ams-2", "iad-1"} {
		port := freePort(t)
		m, err := c.HostClient(byHost[hid]).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port), "PRIMARY_REGION": "ams"},
			Services: []api.MachineService{{
				Protocol: "tcp", InternalPort: port, Autostop: &stopMode, MinMachinesRunning: ptr(1),
				Ports: []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
			}},
		}})
		if err != nil {
			t.Fatalf("create on %s: %v", hid, err)
		}
		ids[m.ID] = hid
	}
	state := func(id string) string {
		m, err := c.HostClient(byHost[ids[id]]).Get(ctx, "demo", id)
		if err != nil {
			t.Fatal(err)
		}
		return m.State
	}
	count := func(region, st string) int {
		n := 0
		for id, hid := range ids {
			if byHost[hid].Region == region && state(id) == st {
				n++
			}
		}
		return n
	}
	waitUntil(t, "one ams machine and the iad machine stopped", func() bool {
		return count("ams", api.StateStopped) == 1 && count("iad", api.StateStopped) == 1
	})
	// Several more passes: the last ams machine stays.
	time.Sleep(time.Second)
	if n := count("ams", api.StateStarted); n != 1 {
		t.Fatalf("%d ams machines started, want min_machines_running 1", n)
	}
	// A request at the iad edge: iad's machine is stopped, ams has one
	// running under its soft limit, so the request goes there (Fly's
	// order: a running machine elsewhere before a start).
	req, _ := http.NewRequest("GET", "http://"+c.Edges()["iad"]+"/", nil)
	req.Host = "demo.localhost"
	resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("request at the iad edge: %d", resp.StatusCode)
	}
	req.Header.Set("Fly-Force-Region", "iad")
	resp, err = (&http.Client{Timeout: 60 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var who struct {
		Env map[string]string `json:"env"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(b, &who) != nil || who.Env["FLY_REGION"] != "iad" {
		t.Fatalf("request forced to iad: %d %s", resp.StatusCode, b)
	}
}
