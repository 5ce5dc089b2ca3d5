package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/netsim"
)

// stopHost is one host of a real cluster whose machines a test owns: it
// publishes them as a host does — autostop's draining machines cordoned —
// and stops them when the proxy's autostop asks.
type stopHost struct {
	t  *testing.T
	c  *cluster.Cluster
	p  atomic.Pointer[Proxy]
	mu sync.Mutex
	ms []cluster.Machine
	// stopped lists the machines stopped, in order; onStop, when set,
	// runs in the stop hook first.
	stopped []string
	onStop  func(id string)
}

func newStopHost(t *testing.T) *stopHost {
	t.Helper()
	n := netsim.New(netsim.Config{})
	t.Cleanup(func() { n.Close() })
	if _, err := n.AddHost("ams-1"); err != nil {
		t.Fatal(err)
	}
	tr, err := n.Transport("ams-1", 7946)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cluster.New(cluster.Config{HostID: "ams-1", Region: "ams", Transport: tr, Capacity: cluster.Resources{CPUs: 1, MemoryMB: 256},
		Addrs: map[string]string{"proxy": "unused"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &stopHost{t: t, c: c}
}

// svc is a service on public port 80 at b's port with the given autostop
// and min_machines_running.
func svc(b *backend, autostop string, min int) cluster.Service {
	return cluster.Service{Protocol: "tcp", InternalPort: b.addr.Port, Ports: []cluster.Port{{Port: 80, Handlers: []string{"http"}}},
		Autostop: autostop, Autostart: true, MinMachinesRunning: min}
}

func (h *stopHost) add(id string, s cluster.Service) {
	h.mu.Lock()
	h.ms = append(h.ms, cluster.Machine{ID: id, App: "demo", Region: "ams", State: "started", PrivateIP: "127.0.0.1",
		Services: []cluster.Service{s}})
	h.mu.Unlock()
	h.publish()
}

func (h *stopHost) publish() {
	h.mu.Lock()
	defer h.mu.Unlock()
	var draining map[string]bool
	if p := h.p.Load(); p != nil {
		draining = p.Draining()
	}
	ms := slices.Clone(h.ms)
	for i := range ms {
		ms[i].Cordoned, ms[i].Draining = draining[ms[i].ID], draining[ms[i].ID]
	}
	if err := h.c.Publish(cluster.HostFacts{Machines: ms}); err != nil {
		h.t.Error(err)
	}
}

func (h *stopHost) stop(ctx context.Context, app, id string, suspend bool) error {
	if h.onStop != nil {
		h.onStop(id)
	}
	h.mu.Lock()
	for i := range h.ms {
		if h.ms[i].ID == id {
			h.ms[i].State = "stopped"
		}
	}
	h.stopped = append(h.stopped, id)
	h.mu.Unlock()
	h.publish()
	return nil
}

func (h *stopHost) stops() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.stopped)
}

func (h *stopHost) running() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, m := range h.ms {
		if m.State == "started" {
			n++
		}
	}
	return n
}

// start runs the host's proxy with autostop passes every period.
func (h *stopHost) start(period time.Duration, grace time.Duration) *Proxy {
	p := startProxy(h.t, Config{HostID: "ams-1", Source: h.c, Autostop: AutostopConfig{
		Stop: h.stop, Interval: period, Idle: period / 2, Grace: grace, DrainTimeout: 20 * time.Second, OnDrain: h.publish,
	}})
	h.p.Store(p)
	return p
}

// passes waits until the proxy ran at least n more autostop passes.
func passes(t *testing.T, p *Proxy, n int64) {
	t.Helper()
	want := p.drain.passes.Load() + n
	deadline := time.Now().Add(30 * time.Second)
	for p.drain.passes.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("autostop ran %d passes in 30 s", p.drain.passes.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestAutostopNeverBelowMinimum: idle machines are stopped one per pass
// down to min_machines_running (here the machines' own region is the
// primary one), and never further.
func TestAutostopNeverBelowMinimum(t *testing.T) {
	b := startBackend(t, "m")
	h := newStopHost(t)
	for _, id := range []string{"m1", "m2", "m3"} {
		h.add(id, svc(b, cluster.AutostopStop, 1))
	}
	p := h.start(20*time.Millisecond, time.Millisecond)
	deadline := time.Now().Add(30 * time.Second)
	for len(h.stops()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("stopped %v in 30 s, want two machines", h.stops())
		}
		time.Sleep(5 * time.Millisecond)
	}
	passes(t, p, 10)
	if got := h.stops(); len(got) != 2 || h.running() != 1 {
		t.Fatalf("stopped %v, %d running; want two stopped and one left", got, h.running())
	}
	// The one left still answers.
	if resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil); resp.StatusCode != 200 {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
}

// TestAutostopLeavesOffMachinesAlone: a machine whose service says
// autostop off is never stopped; an idle neighbour with autostop is.
func TestAutostopLeavesOffMachinesAlone(t *testing.T) {
	b := startBackend(t, "m")
	h := newStopHost(t)
	h.add("keep", svc(b, cluster.AutostopOff, 0))
	h.add("zap", svc(b, cluster.AutostopSuspend, 0)) // suspend: the hook decides how
	p := h.start(20*time.Millisecond, time.Millisecond)
	deadline := time.Now().Add(30 * time.Second)
	for len(h.stops()) < 1 {
		if time.Now().After(deadline) {
			t.Fatal("nothing stopped in 30 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	passes(t, p, 10)
	if got := h.stops(); !slices.Equal(got, []string{"zap"}) {
		t.Fatalf("stopped %v, want only zap", got)
	}
}

// TestAutostopNeverCutsARequest: a slow request reaching the machine
// chosen to stop after it was chosen (from an edge that has not yet seen it
// out of rotation: over the backhaul) completes before the machine stops.
func TestAutostopNeverCutsARequest(t *testing.T) {
	var active atomic.Int32
	release := make(chan struct{})
	entered := make(chan struct{}, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	slow := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		active.Add(1)
		defer active.Add(-1)
		entered <- struct{}{}
		<-release
		io.WriteString(w, "done")
	})}
	go slow.Serve(ln)
	t.Cleanup(func() { slow.Close() })
	b := &backend{name: "slow", addr: ln.Addr().(*net.TCPAddr)}

	h := newStopHost(t)
	h.add("m1", svc(b, cluster.AutostopStop, 0))
	var activeAtStop atomic.Int32
	activeAtStop.Store(-1)
	h.onStop = func(string) { activeAtStop.Store(active.Load()) }
	// The first time the machine goes out of rotation, a request another
	// edge chose before it learnt of the cordon arrives over the backhaul
	// and reaches the machine.
	got := make(chan string, 1)
	var once sync.Once
	var p *Proxy
	onDrain := func() {
		h.publish()
		once.Do(func() {
			go func() {
				req, _ := http.NewRequest("GET", "http://"+p.BackhaulAddr()+"/", nil)
				req.Host = "demo.localhost"
				req.Header.Set(hdrToken, testToken)
				req.Header.Set(hdrApp, "demo")
				req.Header.Set(hdrMachine, "m1")
				req.Header.Set(hdrPort, "80")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					got <- err.Error()
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				got <- resp.Status + " " + string(body)
			}()
			select {
			case <-entered:
			case g := <-got:
				t.Errorf("the request did not reach the machine: %s", g)
				got <- g
			}
		})
	}
	p = startProxy(t, Config{HostID: "ams-1", Source: h.c, Autostop: AutostopConfig{
		Stop: h.stop, Interval: 20 * time.Millisecond, Idle: 10 * time.Millisecond, Grace: time.Millisecond,
		DrainTimeout: 30 * time.Second, OnDrain: onDrain,
	}})
	h.p.Store(p)
	for active.Load() == 0 {
		time.Sleep(5 * time.Millisecond) // until the drain began and the request is in
	}
	// The machine is held while the request runs: several passes go by.
	passes(t, p, 5)
	if s := h.stops(); len(s) != 0 {
		t.Fatalf("stopped %v with a request in flight", s)
	}
	close(release)
	if g := <-got; g != "200 OK done" {
		t.Fatalf("the request got %q", g)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(h.stops()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("not stopped after the request completed")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if n := activeAtStop.Load(); n != 0 {
		t.Errorf("stopped with %d requests in the machine", n)
	}
}

// TestAutostopCalledOffByARequest: a request that finds the app's only
// machine draining keeps it: the stop is called off, the request is
// answered by it, and no start was needed.
func TestAutostopCalledOffByARequest(t *testing.T) {
	b := startBackend(t, "m1")
	h := newStopHost(t)
	h.add("m1", svc(b, cluster.AutostopStop, 0))
	drainBegan := make(chan struct{})
	var once sync.Once
	var starts atomic.Int32
	p := startProxy(t, Config{HostID: "ams-1", Source: h.c,
		Start: func(context.Context, string, string) error { starts.Add(1); return nil },
		Autostop: AutostopConfig{
			Stop: h.stop, Interval: 20 * time.Millisecond, Idle: 10 * time.Millisecond, Grace: time.Hour,
			OnDrain: func() {
				h.publish()
				once.Do(func() { close(drainBegan) })
			},
		}})
	h.p.Store(p)
	<-drainBegan
	// Wait until this edge's table has the machine out of rotation.
	deadline := time.Now().Add(30 * time.Second)
	for {
		tgs := p.Table().Targets("demo", 80)
		if len(tgs) == 1 && tgs[0].Startable() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the machine never showed as draining")
		}
		time.Sleep(5 * time.Millisecond)
	}
	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "m1" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if starts.Load() != 0 {
		t.Errorf("%d starts of a machine that never stopped", starts.Load())
	}
	if s := h.stops(); len(s) != 0 {
		t.Errorf("stopped %v", s)
	}
}

// TestAutostopKeepsAnOpenWebSocket: a machine with an open WebSocket
// through the edge is busy: pass after pass leaves it running; once the
// connection closes, the idle machine is stopped.
func TestAutostopKeepsAnOpenWebSocket(t *testing.T) {
	addr := startEchoUpgrader(t)
	h := newStopHost(t)
	h.add("ws", svc(&backend{name: "ws", addr: addr}, cluster.AutostopStop, 0))
	p := h.start(20*time.Millisecond, time.Millisecond)
	deadline := time.Now().Add(30 * time.Second)
	for len(p.Table().Targets("demo", 80)) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the machine never reached the table")
		}
		time.Sleep(5 * time.Millisecond)
	}
	c, br := upgradeAt(t, p.EdgeAddr())
	passes(t, p, 10)
	if s := h.stops(); len(s) != 0 {
		t.Fatalf("stopped %v with a WebSocket open", s)
	}
	fmt.Fprintf(c, "still here\n")
	if line, err := br.ReadString('\n'); err != nil || line != "echo still here\n" {
		t.Fatalf("echo: %q %v", line, err)
	}
	c.Close()
	for len(h.stops()) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("not stopped once the WebSocket closed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// edit changes a machine of the host and republishes.
func (h *stopHost) edit(id string, fn func(*cluster.Machine)) {
	h.mu.Lock()
	for i := range h.ms {
		if h.ms[i].ID == id {
			fn(&h.ms[i])
		}
	}
	h.mu.Unlock()
	h.publish()
}

// TestAutostopSparesAMachineStartingForARequest: a machine started for a
// request is not stopped by autostop while it boots (its checks not yet
// passing, many passes going by), nor right after: the request is
// answered by it.
func TestAutostopSparesAMachineStartingForARequest(t *testing.T) {
	b := startBackend(t, "m1")
	h := newStopHost(t)
	h.add("m1", svc(b, cluster.AutostopStop, 0))
	h.edit("m1", func(m *cluster.Machine) { m.State = "stopped" })
	check := "servicecheck-00-tcp-" + portOf(b.addr)
	var p *Proxy
	p = startProxy(t, Config{HostID: "ams-1", Source: h.c,
		Start: func(ctx context.Context, app, id string) error {
			h.edit(id, func(m *cluster.Machine) {
				m.State = "started"
				m.Checks = []cluster.CheckStatus{{Name: check, Status: cluster.CheckWarning}}
			})
			go func() {
				passes(t, p, 10) // booting for ten passes
				h.edit(id, func(m *cluster.Machine) { m.Checks[0].Status = cluster.CheckPassing })
			}()
			return nil
		},
		Autostop: AutostopConfig{Stop: h.stop, Interval: 20 * time.Millisecond, Idle: 10 * time.Millisecond,
			Grace: time.Millisecond, OnDrain: h.publish},
	})
	h.p.Store(p)
	deadline := time.Now().Add(30 * time.Second)
	for {
		tgs := p.Table().Targets("demo", 80)
		if len(tgs) == 1 && tgs[0].Startable() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the stopped machine never reached the table")
		}
		time.Sleep(5 * time.Millisecond)
	}
	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "m1" {
		t.Fatalf("%d %s (stopped %v)", resp.StatusCode, body, h.stops())
	}
	if s := h.stops(); len(s) != 0 {
		t.Errorf("stopped %v while it started for a request", s)
	}
}
