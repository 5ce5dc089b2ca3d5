package proxy

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// parked is a stopped machine of app "demo" with autostart.
func parked(id, host string, b *backend) route.Machine {
	m := machine(id, host, b.addr)
	m.Started, m.Stopped = false, true
	for i := range m.Services {
		m.Services[i].Autostart = true
	}
	return m
}

// fakeMachines is the state a test's Start hook changes: the machines of
// one proxy's table, republished on every change.
type fakeMachines struct {
	mu       sync.Mutex
	p        *Proxy
	self     string
	ms       []route.Machine
	backhaul map[string]string
}

func (f *fakeMachines) set(id string, edit func(*route.Machine)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for i := range f.ms {
		if f.ms[i].ID == id {
			edit(&f.ms[i])
		}
	}
	f.p.setState(route.Facts{Self: f.self, Region: "ams", Hosts: testHosts, Machines: append([]route.Machine(nil), f.ms...)}, f.backhaul)
}

func started(healthy bool) func(*route.Machine) {
	return func(m *route.Machine) { m.Started, m.Stopped, m.Healthy = true, false, healthy }
}

// TestAutostartHoldsTheRequestUntilReady: a request to an app whose only
// machine is stopped starts it through the host's hook and is held until
// the machine is started and its checks pass, then answered by it.
func TestAutostartHoldsTheRequestUntilReady(t *testing.T) {
	b := startBackend(t, "a")
	fm := &fakeMachines{self: "ams-1", ms: []route.Machine{parked("a", "ams-1", b)}}
	var calls atomic.Int32
	var healthyAt atomic.Int64
	p := startProxy(t, Config{HostID: "ams-1", Start: func(ctx context.Context, app, id string) error {
		calls.Add(1)
		if app != "demo" || id != "a" {
			t.Errorf("start %s/%s", app, id)
		}
		fm.set(id, started(false)) // started, checks not passing yet
		go func() {
			time.Sleep(100 * time.Millisecond)
			healthyAt.Store(time.Now().UnixNano())
			fm.set(id, started(true))
		}()
		return nil
	}})
	fm.p = p
	fm.set("a", func(*route.Machine) {})

	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	answered := time.Now().UnixNano()
	if resp.StatusCode != 200 || decode(t, body).Machine != "a" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if calls.Load() != 1 {
		t.Errorf("%d starts", calls.Load())
	}
	if h := healthyAt.Load(); h == 0 || answered < h {
		t.Errorf("answered before the machine's checks passed")
	}
}

// TestAutostartCheckNeverPasses: a machine started for a request whose
// check never passes: the request is answered 503 with the reason once the
// autostart timeout ran out, not before and not much later.
func TestAutostartCheckNeverPasses(t *testing.T) {
	b := startBackend(t, "a")
	fm := &fakeMachines{self: "ams-1", ms: []route.Machine{parked("a", "ams-1", b)}}
	const bound = 300 * time.Millisecond
	p := startProxy(t, Config{HostID: "ams-1", AutostartTimeout: bound, Start: func(ctx context.Context, app, id string) error {
		fm.set(id, started(false))
		return nil
	}})
	fm.p = p
	fm.set("a", func(*route.Machine) {})
	began := time.Now()
	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	took := time.Since(began)
	if resp.StatusCode != 503 || resp.Header.Get("Flame-Error") != codeNoCandidate ||
		!strings.Contains(body, "autostart") || !strings.Contains(body, "failing checks") || !strings.Contains(body, "a in ams") {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	t.Logf("answered after %v: %s", took, body)
	// Held for the bound; answered well within the test's own patience
	// (the proxy's timer, not a hang, ended the wait).
	if took < bound {
		t.Errorf("answered after %v, before the %v bound", took, bound)
	}
	if b.hits.Load() != 0 {
		t.Errorf("the unhealthy machine got %d requests", b.hits.Load())
	}
}

// TestAutostartOneStartForManyRequests: concurrent requests for a stopped
// app share one start, and all are answered by the machine.
func TestAutostartOneStartForManyRequests(t *testing.T) {
	b := startBackend(t, "a")
	fm := &fakeMachines{self: "ams-1", ms: []route.Machine{parked("a", "ams-1", b), parked("z", "ams-1", b)}}
	var calls atomic.Int32
	release := make(chan struct{})
	p := startProxy(t, Config{HostID: "ams-1", Start: func(ctx context.Context, app, id string) error {
		calls.Add(1)
		<-release
		fm.set(id, started(true))
		return nil
	}})
	fm.p = p
	fm.set("a", func(*route.Machine) {})
	const n = 20
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
			if resp.StatusCode != 200 || decode(t, body).Machine != "a" {
				errs <- body
			}
		}()
	}
	// Let every request reach the edge and wait on the start, then let
	// the start finish.
	deadline := time.Now().Add(30 * time.Second)
	for p.starts.waiters("demo") < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d requests wait on a start", p.starts.waiters("demo"), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	close(release)
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if c := calls.Load(); c != 1 {
		t.Errorf("%d starts for %d concurrent requests, want 1", c, n)
	}
}

// TestAutostartOverTheBackhaul: the edge asks the machine's host to start
// it; that host's proxy calls its own hook, and reports it ready before
// the edge's table knows it started; the request is answered by it.
func TestAutostartOverTheBackhaul(t *testing.T) {
	b := startBackend(t, "a")
	var calls atomic.Int32
	far := &fakeMachines{self: "ams-2", ms: []route.Machine{parked("a", "ams-2", b)}}
	fp := startProxy(t, Config{HostID: "ams-2", Start: func(ctx context.Context, app, id string) error {
		calls.Add(1)
		far.set(id, started(true))
		return nil
	}})
	far.p = fp
	far.set("a", func(*route.Machine) {})
	ep := startProxy(t, Config{HostID: "ams-1", Start: func(context.Context, string, string) error {
		t.Error("the edge's own hook was called for another host's machine")
		return nil
	}})
	edge := &fakeMachines{p: ep, self: "ams-1", ms: []route.Machine{parked("a", "ams-2", b)}, backhaul: map[string]string{"ams-2": fp.BackhaulAddr()}}
	edge.set("a", func(*route.Machine) {})

	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, ep.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "a" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if calls.Load() != 1 {
		t.Errorf("%d starts", calls.Load())
	}
	// A start request without the hosts' token is refused.
	req, _ := http.NewRequest("POST", "http://"+fp.BackhaulAddr()+"/", nil)
	req.Header.Set(hdrStart, "1")
	req.Header.Set(hdrApp, "demo")
	req.Header.Set(hdrMachine, "a")
	r2, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	r2.Body.Close()
	if r2.StatusCode != 403 {
		t.Errorf("start without the token: %d", r2.StatusCode)
	}
}

// TestAutostartNextMachineAfterAFailure: a machine that fails to start
// makes way for the next startable one.
func TestAutostartNextMachineAfterAFailure(t *testing.T) {
	a, b := startBackend(t, "a"), startBackend(t, "b")
	fm := &fakeMachines{self: "ams-1", ms: []route.Machine{parked("a", "ams-1", a), parked("b", "ams-1", b)}}
	p := startProxy(t, Config{HostID: "ams-1", Start: func(ctx context.Context, app, id string) error {
		if id == "a" {
			return errors.New("no room on this host")
		}
		fm.set(id, started(true))
		return nil
	}})
	fm.p = p
	fm.set("a", func(*route.Machine) {})
	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "b" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
}

// TestAutostartBehindSoftLimit: when every started machine is at its soft
// limit, a stopped one is started, and the request is served at once by a
// machine under its hard limit rather than held.
func TestAutostartBehindSoftLimit(t *testing.T) {
	a, b := startBackend(t, "a"), startBackend(t, "b")
	busy := machine("a", "ams-2", a.addr)
	busy.Services[0].SoftLimit, busy.Services[0].HardLimit = 1, 100
	startedB := make(chan struct{})
	var once sync.Once
	fm := &fakeMachines{self: "ams-1", ms: []route.Machine{busy, parked("b", "ams-1", b)}}
	p := startProxy(t, Config{HostID: "ams-1", Start: func(ctx context.Context, app, id string) error {
		<-startedB // the request must not wait for this
		fm.set(id, started(true))
		return nil
	}})
	fm.p = p
	t.Cleanup(func() { once.Do(func() { close(startedB) }) })
	fp := startProxy(t, Config{HostID: "ams-2"}) // a's host
	fp.setState(route.Facts{Self: "ams-2", Region: "ams", Hosts: testHosts, Machines: []route.Machine{busy}}, nil)
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: fm.ms, Load: map[string]int{"a": 1}},
		map[string]string{"ams-2": fp.BackhaulAddr()})
	resp, body := get(t, &http.Client{Timeout: 60 * time.Second}, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "a" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	if p.starts.inFlight("demo") != 1 {
		t.Errorf("no start behind the request")
	}
	once.Do(func() { close(startedB) })
}

// inFlight counts (for the tests) the starts in flight for an app; waiters the requests
// held for them.
func (s *starter) inFlight(appName string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, f := range s.flights {
		if f.app == appName {
			n++
		}
	}
	return n
}

func (s *starter) waiters(appName string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, f := range s.flights {
		if f.app == appName {
			n += int(f.waiters.Load())
		}
	}
	return n
}
