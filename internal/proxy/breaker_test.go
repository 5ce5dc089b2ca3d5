package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// TestBreakerStates steps one machine's breaker through scripted outcomes
// on a fake clock and checks its state, and what a request is let do,
// after each.
func TestBreakerStates(t *testing.T) {
	type step struct {
		wait  time.Duration // the clock moves first
		do    string        // reset, connect, ok, admit, release, lastresort-fail
		state breakerState
		admit string // after "admit": probe, ok or no
	}
	resets := func(n int) []step {
		var s []step
		for range n {
			s = append(s, step{do: "reset", state: stateClosed})
		}
		return s
	}
	cat := func(parts ...[]step) []step {
		var s []step
		for _, p := range parts {
			s = append(s, p...)
		}
		return s
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"four resets leave it closed, the fifth opens it", cat(resets(4),
			[]step{{do: "reset", state: stateOpen}, {do: "admit", state: stateOpen, admit: "no"}})},
		{"a success between resets starts the count again", cat(resets(4),
			[]step{{do: "ok", state: stateClosed}}, resets(4),
			[]step{{do: "admit", state: stateClosed, admit: "ok"}})},
		{"a failed connect opens it at once", []step{{do: "connect", state: stateOpen}}},
		{"after the backoff exactly one request probes, and its success closes", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase - 1, do: "admit", state: stateOpen, admit: "no"},
			{wait: 1, do: "admit", state: stateHalfOpen, admit: "probe"},
			{do: "admit", state: stateHalfOpen, admit: "no"},
			{do: "admit", state: stateHalfOpen, admit: "no"},
			{do: "ok", state: stateClosed},
			{do: "admit", state: stateClosed, admit: "ok"},
		}},
		{"a failed probe opens it for twice as long", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase, do: "admit", state: stateHalfOpen, admit: "probe"},
			{do: "reset", state: stateOpen},
			{wait: 2*breakerBase - 1, do: "admit", state: stateOpen, admit: "no"},
			{wait: 1, do: "admit", state: stateHalfOpen, admit: "probe"},
			{do: "connect", state: stateOpen},
			{wait: 4*breakerBase - 1, do: "admit", state: stateOpen, admit: "no"},
			{wait: 1, do: "admit", state: stateHalfOpen, admit: "probe"},
		}},
		{"the backoff stops growing at its cap", cat(
			[]step{{do: "connect", state: stateOpen}},
			func() []step {
				var s []step
				for range 12 {
					s = append(s, step{wait: breakerMax, do: "admit", state: stateHalfOpen, admit: "probe"}, step{do: "connect", state: stateOpen})
				}
				return s
			}(),
			[]step{{wait: breakerMax - 1, do: "admit", state: stateOpen, admit: "no"}, {wait: 1, do: "admit", state: stateHalfOpen, admit: "probe"}})},
		{"a last resort failing while open changes nothing", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase / 2, do: "connect", state: stateOpen},
			{wait: breakerBase / 2, do: "admit", state: stateHalfOpen, admit: "probe"},
		}},
		{"a last resort succeeding while open closes it", []step{
			{do: "connect", state: stateOpen},
			{do: "ok", state: stateClosed},
		}},
		{"a failure while half-open, the probe out, opens it again", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase, do: "admit", state: stateHalfOpen, admit: "probe"},
			{do: "reset", state: stateOpen},
		}},
		{"a released probe goes to the next request", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase, do: "admit", state: stateHalfOpen, admit: "probe"},
			{do: "release", state: stateHalfOpen},
			{do: "admit", state: stateHalfOpen, admit: "probe"},
		}},
		{"a probe that never reports is handed out again after its lease", []step{
			{do: "connect", state: stateOpen},
			{wait: breakerBase, do: "admit", state: stateHalfOpen, admit: "probe"},
			{wait: testLease - 1, do: "admit", state: stateHalfOpen, admit: "no"},
			{wait: 1, do: "admit", state: stateHalfOpen, admit: "probe"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newTestClock()
			b := newBreakers(clock.now, testLease)
			for i, s := range tt.steps {
				clock.advance(s.wait)
				got := ""
				switch s.do {
				case "reset":
					b.fail("m", "h", weightReset)
				case "connect":
					b.fail("m", "h", weightConnect)
				case "ok":
					b.reset("m", "h")
				case "release":
					b.release("m", "h")
				case "admit":
					ok, probe := b.admit("m", "h")
					got = map[[2]bool]string{{true, true}: "probe", {true, false}: "ok", {false, false}: "no"}[[2]bool{ok, probe}]
					// What a selection sees agrees with what a request is let do.
					if demoted := b.demoted("m", "h"); demoted != (s.state == stateOpen || s.state == stateHalfOpen) {
						t.Errorf("step %d: demoted %v in state %v with the probe decided", i, demoted, s.state)
					}
				default:
					t.Fatalf("step %d: unknown %q", i, s.do)
				}
				if st, _ := b.states("m", "h"); st != s.state {
					t.Fatalf("step %d (%s after %v): state %v, want %v", i, s.do, s.wait, st, s.state)
				}
				if got != s.admit {
					t.Fatalf("step %d: admit %q, want %q", i, got, s.admit)
				}
			}
		})
	}
}

const testLease = time.Minute

// TestBreakerHalfOpenRankedAsUsual: once half-open with no probe out, a
// selection ranks the machine as usual again, so the next request is the
// probe; a host's breaker guards all its machines.
func TestBreakerHalfOpenRankedAsUsual(t *testing.T) {
	clock := newTestClock()
	b := newBreakers(clock.now, testLease)
	b.fail("m", "h", weightConnect)
	if !b.demoted("m", "h") {
		t.Fatal("open, not demoted")
	}
	clock.advance(breakerBase)
	if b.demoted("m", "h") {
		t.Error("half-open with no probe out, yet demoted")
	}
	b.fail("", "h2", weightConnect)
	if !b.demoted("other", "h2") || b.demoted("other", "h") {
		t.Error("a host's breaker does not guard exactly its machines")
	}
	if ok, _ := b.admit("other", "h2"); ok {
		t.Error("a machine of an open host admitted")
	}
}

// TestBreakerOneProbeUnderContention: however many requests reach a
// half-open breaker at once, one takes the probe.
func TestBreakerOneProbeUnderContention(t *testing.T) {
	clock := newTestClock()
	b := newBreakers(clock.now, testLease)
	b.fail("m", "h", weightConnect)
	clock.advance(breakerBase)
	var probes, admitted atomic.Int64
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if ok, probe := b.admit("m", "h"); ok {
				admitted.Add(1)
				if probe {
					probes.Add(1)
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	if probes.Load() != 1 || admitted.Load() != 1 {
		t.Errorf("%d admitted, %d probes; want one", admitted.Load(), probes.Load())
	}
}

// TestBreakersBounded: however many machines fail, the breakers kept stay
// bounded; the open ones are kept.
func TestBreakersBounded(t *testing.T) {
	clock := newTestClock()
	b := newBreakers(clock.now, testLease)
	b.fail("open-one", "h", weightConnect)
	for i := range 3 * maxBreakers {
		b.fail(fmt.Sprint("m", i), "h", weightReset)
	}
	if n := int(b.entries.Load()); n > maxBreakers || n != len(b.machine)+len(b.host) {
		t.Errorf("%d breakers kept (map %d), at most %d", n, len(b.machine), maxBreakers)
	}
	if st, _ := b.states("open-one", "h"); st != stateOpen {
		t.Errorf("an open breaker was forgotten: %v", st)
	}
}

// switchDialer dials the machines of this host; a machine's address can be
// made to refuse (dialled at an address nobody listens on), and a dial to
// it can be held until released. It counts the dials per machine address.
type switchDialer struct {
	refusing string
	mu       sync.Mutex
	down     map[string]bool
	gate     map[string]chan struct{}
	dials    map[string]*atomic.Int64
}

func newSwitchDialer(t *testing.T) *switchDialer {
	return &switchDialer{refusing: refusingAddr(t).String(), down: map[string]bool{}, gate: map[string]chan struct{}{}, dials: map[string]*atomic.Int64{}}
}

func (d *switchDialer) count(addr string) *atomic.Int64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.dials[addr]
	if c == nil {
		c = new(atomic.Int64)
		d.dials[addr] = c
	}
	return c
}

func (d *switchDialer) set(addr string, down bool) {
	d.mu.Lock()
	d.down[addr] = down
	d.mu.Unlock()
}

// hold makes the next dials to addr wait until the returned func is called.
func (d *switchDialer) hold(addr string) func() {
	ch := make(chan struct{})
	d.mu.Lock()
	d.gate[addr] = ch
	d.mu.Unlock()
	return func() {
		d.mu.Lock()
		delete(d.gate, addr)
		d.mu.Unlock()
		close(ch)
	}
}

func (d *switchDialer) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	d.count(addr).Add(1)
	d.mu.Lock()
	down, gate := d.down[addr], d.gate[addr]
	d.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if down {
		addr = d.refusing
	}
	var nd net.Dialer
	return nd.DialContext(ctx, network, addr)
}

// TestBreakerThroughProxy: a machine that refuses connections opens its
// breaker on the first refusal and is not dialled again while it is open;
// once half-open exactly one request probes it (the others, meanwhile, go
// to the other machine), a failed probe opens it for longer, and a
// successful one closes it: the machine takes its share again.
func TestBreakerThroughProxy(t *testing.T) {
	flaky, good := startBackend(t, "flaky"), startBackend(t, "good")
	d := newSwitchDialer(t)
	fa := flaky.addr.String()
	d.set(fa, true)
	clock := newTestClock()
	// Dials may be held by the test: connects get all the time they need.
	p := startProxy(t, Config{HostID: "ams-1", Now: clock.now, DialMachine: d.dial, ConnectTimeout: time.Minute, MinConnectTimeout: time.Minute})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("flaky", "ams-1", flaky.addr), machine("good", "ams-1", good.addr)},
		Load:     map[string]int{"good": 5}}, nil) // flaky first, while it can
	// A request that waits on the held probe fails the test, not hangs it.
	client := &http.Client{Timeout: 30 * time.Second}
	ask := func(want string) {
		t.Helper()
		resp, body := get(t, client, p.EdgeAddr(), "demo.localhost", nil)
		if resp.StatusCode != 200 || decode(t, body).Machine != want {
			t.Fatalf("%d %s, want an answer from %s", resp.StatusCode, body, want)
		}
	}
	state := func() breakerState {
		st, _ := p.strikes.states("flaky", "ams-1")
		return st
	}

	ask("good")
	if state() != stateOpen || d.count(fa).Load() != 1 {
		t.Fatalf("after a refusal: breaker %v, %d dials", state(), d.count(fa).Load())
	}
	for range 10 {
		ask("good")
	}
	if n := d.count(fa).Load(); n != 1 {
		t.Errorf("an open breaker's machine was dialled %d more times", n-1)
	}

	clock.advance(breakerBase) // half-open: the next request probes, and fails
	ask("good")
	if state() != stateOpen || d.count(fa).Load() != 2 {
		t.Fatalf("after a failed probe: breaker %v, %d dials", state(), d.count(fa).Load())
	}
	clock.advance(breakerBase) // open for twice as long
	ask("good")
	if d.count(fa).Load() != 2 {
		t.Errorf("probed before the longer backoff ended")
	}

	// The machine heals. The probe's connect is held: meanwhile every other
	// request skips the machine.
	d.set(fa, false)
	release := d.hold(fa)
	clock.advance(breakerBase)
	probe := make(chan string, 1)
	go func() {
		req, _ := http.NewRequest("GET", "http://"+p.EdgeAddr()+"/", nil)
		req.Host = "demo.localhost"
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			probe <- err.Error()
			return
		}
		defer resp.Body.Close()
		var s seen
		if err := jsonDecode(resp, &s); err != nil {
			probe <- err.Error()
			return
		}
		probe <- s.Machine
	}()
	deadline := time.Now().Add(30 * time.Second)
	for d.count(fa).Load() != 3 {
		if time.Now().After(deadline) {
			t.Fatal("the probe never dialled")
		}
		time.Sleep(2 * time.Millisecond)
	}
	for range 5 {
		ask("good")
	}
	if n := d.count(fa).Load(); n != 3 {
		t.Errorf("%d dials while the probe was out, want the probe's alone", n-2)
	}
	release()
	if got := <-probe; got != "flaky" {
		t.Fatalf("the probe was answered by %s", got)
	}
	if state() != stateClosed {
		t.Fatalf("after a successful probe: breaker %v", state())
	}
	ask("flaky")
	ask("flaky")
}

// TestBreakerLastResort: when the only machine's breaker is open the
// request still tries it — 502 with what was tried while it refuses, never
// a 503 for the breaker alone — and the first request after it heals is
// served, before the backoff ends.
func TestBreakerLastResort(t *testing.T) {
	only := startBackend(t, "only")
	d := newSwitchDialer(t)
	oa := only.addr.String()
	d.set(oa, true)
	clock := newTestClock()
	p := startProxy(t, Config{HostID: "ams-1", Now: clock.now, DialMachine: d.dial})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("only", "ams-1", only.addr)}}, nil)
	for i := range 3 {
		resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil)
		if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Flame-Error") != codeAllFailed {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
	}
	if st, _ := p.strikes.states("only", "ams-1"); st != stateOpen || d.count(oa).Load() != 3 {
		t.Fatalf("breaker %v after %d dials", st, d.count(oa).Load())
	}
	d.set(oa, false)
	resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 200 || decode(t, body).Machine != "only" {
		t.Fatalf("healed: %d %s", resp.StatusCode, body)
	}
	if st, _ := p.strikes.states("only", "ams-1"); st != stateClosed {
		t.Errorf("a last resort's success left the breaker %v", st)
	}
}

// TestBreakerWeights: a refused connect opens a machine's breaker at once;
// resets before the answer need breakerTrip in a row.
func TestBreakerWeights(t *testing.T) {
	clock := newTestClock()
	p, err := New(Config{HostID: "ams-1", Region: "ams", Token: testToken, Backhaul: nopListener{}, Now: clock.now})
	if err != nil {
		t.Fatal(err)
	}
	tg := &route.Target{MachineID: "m", Host: "ams-2", Region: "ams"}
	refused := &connectError{addr: "x", err: syscall.ECONNREFUSED}
	p.strike(tg, refused)
	if st, _ := p.strikes.states("m", "ams-2"); st != stateOpen {
		t.Errorf("after a refused connect: %v", st)
	}
	p.strikes.reset("m", "ams-2")
	for i := range breakerTrip {
		if st, _ := p.strikes.states("m", "ams-2"); st != stateClosed {
			t.Fatalf("after %d resets: %v", i, st)
		}
		p.strike(tg, syscall.ECONNRESET)
	}
	if st, _ := p.strikes.states("m", "ams-2"); st != stateOpen {
		t.Errorf("after %d resets: %v", breakerTrip, st)
	}
	// A connect to another host that timed out counts against the host.
	p.strike(&route.Target{MachineID: "m2", Host: "fra-1"}, &connectError{addr: "y", err: context.DeadlineExceeded})
	if m, h := p.strikes.states("m2", "fra-1"); m != stateClosed || h != stateOpen {
		t.Errorf("silent host: machine %v host %v", m, h)
	}
	// The far host saying the machine was not reached opens it at once.
	p.strike(&route.Target{MachineID: "m3", Host: "fra-2"}, fmt.Errorf("%w: host fra-2: stopped", errNotReached))
	if m, _ := p.strikes.states("m3", "fra-2"); m != stateOpen {
		t.Errorf("not reached: %v", m)
	}
	if !errors.Is(fmt.Errorf("%w: x", errNotReached), errNotReached) {
		t.Fatal("wrap")
	}
}

// nopListener is a listener never served.
type nopListener struct{}

func (nopListener) Accept() (net.Conn, error) { return nil, net.ErrClosed }
func (nopListener) Close() error              { return nil }
func (nopListener) Addr() net.Addr            { return &net.TCPAddr{} }

func jsonDecode(resp *http.Response, v any) error { return json.NewDecoder(resp.Body).Decode(v) }

// TestBreakerAcrossBackhaul: the far host says why a machine was not
// reached — not running there, or refusing connections: its breaker at the
// edge opens at once — while a reset there counts one point only.
func TestBreakerAcrossBackhaul(t *testing.T) {
	good := startBackend(t, "good")
	rst, _ := startResetter(t)
	edge := startProxy(t, Config{HostID: "ams-1"})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"ams-1": edge.BackhaulAddr(), "fra-1": far.BackhaulAddr()}
	stale := machine("stale", "fra-1", good.addr)
	ms := []route.Machine{stale, machine("refusing", "fra-1", refusingAddr(t)), machine("resetting", "fra-1", rst), machine("good", "ams-1", good.addr)}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
	stale.Started = false // the far host knows it stopped
	ms[0] = stale
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
	for id, want := range map[string]breakerState{"stale": stateOpen, "refusing": stateOpen, "resetting": stateClosed} {
		resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": id})
		if resp.StatusCode != 200 || decode(t, body).Machine != "good" {
			t.Fatalf("%s: %d %s", id, resp.StatusCode, body)
		}
		if m, h := edge.strikes.states(id, "fra-1"); m != want || h != stateClosed {
			t.Errorf("%s: machine breaker %v (want %v), host %v", id, m, want, h)
		}
	}
}
