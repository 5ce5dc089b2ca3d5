package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestHostBreakerSyntheticProbes steps a host's breaker through scripted
// outcomes on a fake clock: no request is ever admitted to the host while
// its breaker is not closed; the proxy's own probe falls due after the
// backoff, one at a time, and its outcome closes the breaker or opens it
// for twice as long.
func TestHostBreakerSyntheticProbes(t *testing.T) {
	type step struct {
		wait  time.Duration // the clock moves first
		do    string        // silent, admit, due, probe-ok, probe-fail, ok, postpone, running
		state breakerState
		got   string // after admit: ok or no; after due: probe or none
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"a closed host admits and has no probe due", []step{
			{do: "admit", state: stateClosed, got: "ok"},
			{do: "due", state: stateClosed, got: "none"},
		}},
		{"silence opens it; half-open, it admits no request but falls due, once", []step{
			{do: "silent", state: stateOpen},
			{do: "admit", state: stateOpen, got: "no"},
			{wait: breakerBase - 1, do: "due", state: stateOpen, got: "none"},
			{wait: 1, do: "admit", state: stateHalfOpen, got: "no"},
			{do: "due", state: stateHalfOpen, got: "probe"},
			{do: "due", state: stateHalfOpen, got: "none"},
			{do: "admit", state: stateHalfOpen, got: "no"},
			{wait: time.Hour, do: "admit", state: stateHalfOpen, got: "no"},
			{do: "due", state: stateHalfOpen, got: "none"},
			{do: "probe-ok", state: stateClosed},
			{do: "admit", state: stateClosed, got: "ok"},
		}},
		{"a failed probe opens it for twice as long, up to the cap", []step{
			{do: "silent", state: stateOpen},
			{wait: breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 2*breakerBase - 1, do: "due", state: stateOpen, got: "none"},
			{wait: 1, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 4*breakerBase - 1, do: "admit", state: stateOpen, got: "no"},
			{wait: 1, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 8 * breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 16 * breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 32 * breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: breakerMax - 1, do: "due", state: stateOpen, got: "none"},
			{wait: 1, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: breakerMax, do: "due", state: stateHalfOpen, got: "probe"},
		}},
		{"a request failing on the host while its probe is out: one reopening", []step{
			{do: "silent", state: stateOpen},
			{wait: breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "silent", state: stateOpen}, // a last resort
			{do: "probe-fail", state: stateOpen},
			{wait: 2*breakerBase - 1, do: "due", state: stateOpen, got: "none"},
			{wait: 1, do: "due", state: stateHalfOpen, got: "probe"},
		}},
		{"a last resort's success closes it; the probe's outcome after changes nothing", []step{
			{do: "silent", state: stateOpen},
			{wait: breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "ok", state: stateClosed},
			{do: "probe-fail", state: stateClosed},
			{do: "admit", state: stateClosed, got: "ok"},
		}},
		{"a host declared dead is not probed; its backoff does not grow", []step{
			{do: "silent", state: stateOpen},
			{wait: breakerBase, do: "postpone", state: stateOpen},
			{wait: breakerBase - 1, do: "due", state: stateOpen, got: "none"},
			{wait: 1, do: "due", state: stateHalfOpen, got: "probe"},
			{do: "probe-fail", state: stateOpen},
			{wait: 2 * breakerBase, do: "due", state: stateHalfOpen, got: "probe"},
		}},
		{"a host whose probe still runs is not handed out again", []step{
			{do: "silent", state: stateOpen},
			{wait: breakerBase, do: "running", state: stateHalfOpen, got: "none"},
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
				case "silent":
					b.fail("", "h", weightConnect)
				case "ok":
					b.reset("m", "h")
				case "probe-ok", "probe-fail":
					b.probed("h", s.do == "probe-ok")
				case "postpone":
					if due, _ := b.dueProbes(clock.now(), maxProbes, nil, nil); len(due) != 1 {
						t.Fatalf("step %d: due %v, want h", i, due)
					}
					b.postpone("h", clock.now().Add(breakerBase))
				case "admit":
					ok, probe := b.admit("m", "h")
					if probe {
						t.Fatalf("step %d: a request took a host's probe", i)
					}
					got = map[bool]string{true: "ok", false: "no"}[ok]
					if demoted := b.demoted("m", "h"); demoted == ok {
						t.Errorf("step %d: demoted %v, admitted %v", i, demoted, ok)
					}
				case "due", "running":
					running := map[string]bool{"h": s.do == "running"}
					due, next := b.dueProbes(clock.now(), maxProbes, running, nil)
					got = "none"
					if len(due) == 1 && due[0] == "h" {
						got = "probe"
					}
					if s.state == stateOpen && next.IsZero() {
						t.Errorf("step %d: open, yet no next probe time", i)
					}
				default:
					t.Fatalf("step %d: unknown %q", i, s.do)
				}
				if _, st := b.states("m", "h"); st != s.state {
					t.Fatalf("step %d (%s after %v): state %v, want %v", i, s.do, s.wait, st, s.state)
				}
				if got != s.got {
					t.Fatalf("step %d (%s): %q, want %q", i, s.do, got, s.got)
				}
			}
		})
	}
}

// TestDueProbesBounded: at most the room left is handed out; the rest are
// due at once in the next round.
func TestDueProbesBounded(t *testing.T) {
	clock := newTestClock()
	b := newBreakers(clock.now, testLease)
	for i := range 3 * maxProbes {
		b.fail("", "h"+string(rune('A'+i%26))+string(rune('a'+i/26)), weightConnect)
	}
	clock.advance(breakerBase)
	due, next := b.dueProbes(clock.now(), maxProbes, nil, nil)
	if len(due) != maxProbes || !next.Equal(clock.now()) {
		t.Fatalf("%d due, next %v; want %d, now", len(due), next, maxProbes)
	}
	due, _ = b.dueProbes(clock.now(), 5, nil, nil)
	if len(due) != 5 {
		t.Fatalf("%d due with room for 5", len(due))
	}
}

// waitHostBreaker waits (the probes run in the background, on real
// timers) until the edge's breaker of host is in state want.
func waitHostBreaker(t *testing.T, p *Proxy, host string, want breakerState) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, st := p.strikes.states("", host); st == want {
			return
		}
		if time.Now().After(deadline) {
			_, st := p.strikes.states("", host)
			t.Fatalf("host %s's breaker is %v after 30 s, want %v", host, st, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// hostTrips is how many times in a row host's breaker opened.
func hostTrips(p *Proxy, host string) int {
	p.strikes.mu.Lock()
	defer p.strikes.mu.Unlock()
	if b := p.strikes.host[host]; b != nil {
		return b.trips
	}
	return 0
}

// requestCounter counts the requests for a machine written on the
// connections an edge dials: HTTP/1.1 heads naming it (the fast path), and
// HTTP/2 HEADERS frames (net/http's path; each opens a request). A probe
// names no machine and goes over HTTP/1.1.
type requestCounter struct{ n atomic.Int64 }

func (rc *requestCounter) wrap(dial DialFunc) DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, rc: rc}, nil
	}
}

type countingConn struct {
	net.Conn
	rc    *requestCounter
	mu    sync.Mutex
	buf   []byte // written and not yet parsed
	h2    bool
	known bool
}

var h2Preface = []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")

func (c *countingConn) Write(b []byte) (int, error) {
	c.mu.Lock()
	c.buf = append(c.buf, b...)
	if !c.known && len(c.buf) >= len(h2Preface) {
		c.known, c.h2 = true, bytes.HasPrefix(c.buf, h2Preface)
		if c.h2 {
			c.buf = c.buf[len(h2Preface):]
		}
	}
	switch {
	case c.known && c.h2:
		for len(c.buf) >= 9 {
			size := int(binary.BigEndian.Uint32(append([]byte{0}, c.buf[:3]...)))
			if len(c.buf) < 9+size {
				break
			}
			if c.buf[3] == 0x1 { // HEADERS
				c.rc.n.Add(1)
			}
			c.buf = c.buf[9+size:]
		}
	case c.known:
		mark := []byte("\r\n" + hdrMachine + ":")
		for {
			i := bytes.Index(c.buf, mark)
			if i < 0 {
				break
			}
			c.rc.n.Add(1)
			c.buf = c.buf[i+len(mark):]
		}
		if n := len(c.buf); n > len(mark) {
			c.buf = c.buf[n-len(mark):]
		}
	}
	c.mu.Unlock()
	return c.Conn.Write(b)
}

// TestSilentHostProbedOffTheRequestPath: once a host went silent and its
// breaker opened, no request is sent to it again while it stays silent —
// the proxy's own probes fail meanwhile and its backoff grows — and once
// it answers again, a probe closes the breaker before any request went
// there, and requests return to it. On both edge paths.
func TestSilentHostProbedOffTheRequestPath(t *testing.T) {
	for _, path := range []string{"fast", "net/http"} {
		t.Run(path, func(t *testing.T) { silentHostProbed(t, path == "net/http") })
	}
}

func silentHostProbed(t *testing.T, netHTTP bool) {
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return 2 * time.Millisecond }})
	t.Cleanup(func() { n.Close() })
	for _, h := range []string{"ams-1", "fra-1"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	bhA, err := n.Listen("ams-1", 4380)
	if err != nil {
		t.Fatal(err)
	}
	bhF, err := n.Listen("fra-1", 4380)
	if err != nil {
		t.Fatal(err)
	}
	far, near := startBackend(t, "far"), startBackend(t, "near")
	var sent requestCounter
	edge := startProxy(t, Config{HostID: "ams-1", Backhaul: bhA, Dial: sent.wrap(n.DialerFrom("ams-1")), DisableFastPath: netHTTP})
	fp := startProxy(t, Config{HostID: "fra-1", Backhaul: bhF, Dial: n.DialerFrom("fra-1")})
	ms := []route.Machine{machine("far", "fra-1", far.addr), machine("near", "ams-1", near.addr)}
	backhaul := map[string]string{"ams-1": bhA.Addr().String(), "fra-1": bhF.Addr().String()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
	fp.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
	client := &http.Client{Timeout: 30 * time.Second}
	prefer := map[string]string{"Fly-Prefer-Instance-Id": "far"} // far first whenever it is not demoted
	ask := func() string {
		t.Helper()
		resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", prefer)
		if resp.StatusCode != 200 {
			t.Fatalf("status %d: %s", resp.StatusCode, body)
		}
		return decode(t, body).Machine
	}

	if m := ask(); m != "far" {
		t.Fatalf("before the silence: served by %s, want far", m)
	}
	n.Kill("fra-1")
	if m := ask(); m != "near" {
		t.Fatalf("as fra-1 goes silent: served by %s, want near", m)
	}
	if _, st := edge.strikes.states("", "fra-1"); st != stateOpen {
		t.Fatalf("fra-1's breaker is %v after its silence, want open", st)
	}
	before := sent.n.Load()
	// Requests keep coming while the edge's probes of fra-1 fail: three
	// probes failed once the breaker opened four times in a row.
	deadline := time.Now().Add(60 * time.Second)
	asked := 0
	for hostTrips(edge, "fra-1") < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("fra-1's breaker opened %d times in a row in 60 s; want its probes to fail", hostTrips(edge, "fra-1"))
		}
		if m := ask(); m != "near" {
			t.Fatalf("fra-1 silent: served by %s, want near", m)
		}
		asked++
		time.Sleep(10 * time.Millisecond)
	}
	if got := sent.n.Load() - before; got != 0 {
		t.Fatalf("%d of %d requests were sent to fra-1 while it was silent and its breaker open", got, asked)
	}
	t.Logf("%d requests while fra-1 was silent, none sent to it; its breaker opened %d times", asked, hostTrips(edge, "fra-1"))

	n.Revive("fra-1")
	waitHostBreaker(t, edge, "fra-1", stateClosed)
	if got := sent.n.Load() - before; got != 0 {
		t.Fatalf("%d requests were sent to fra-1 before its probe closed the breaker", got)
	}
	if m := ask(); m != "far" {
		t.Fatalf("fra-1 answering again: served by %s, want far", m)
	}
}

// TestProbeAnsweredOnlyWithTheToken: the far proxy answers a probe at
// once, and only a host's (with the token).
func TestProbeAnsweredOnlyWithTheToken(t *testing.T) {
	far := startProxy(t, Config{HostID: "fra-1"})
	for _, tok := range []string{testToken, "wrong", ""} {
		req, _ := http.NewRequest(http.MethodGet, "http://"+far.BackhaulAddr()+"/", nil)
		req.Header.Set(hdrProbe, "1")
		if tok != "" {
			req.Header.Set(hdrToken, tok)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		ok := resp.StatusCode == http.StatusNoContent && resp.Header.Get(hdrProbe) == probeOK
		if ok != (tok == testToken) {
			t.Errorf("token %q: %s, probe %q", tok, resp.Status, resp.Header.Get(hdrProbe))
		}
	}
}

// TestSilentHostGivesUpQuietWaiters: when a host is found silent, the
// attempts on it that never heard from it, or heard nothing for longer
// than their quiet, are given up at once; one still hearing from the host,
// one on another host, and one that stopped waiting are not.
func TestSilentHostGivesUpQuietWaiters(t *testing.T) {
	var s hostWaiters
	var gaveUp sync.Map
	wait := func(name, host string, quiet time.Duration, heardAgo time.Duration) *hostWaiter {
		w := s.wait(host, quiet, func() { gaveUp.Store(name, true) })
		if heardAgo >= 0 {
			w.hear()
			w.heard.Store(time.Now().Add(-heardAgo).UnixNano())
		}
		return w
	}
	wait("quiet", "fra-1", 100*time.Millisecond, time.Second)
	wait("never heard", "fra-1", time.Hour, -1)
	wait("hearing", "fra-1", time.Hour, time.Second)
	wait("elsewhere", "iad-1", 100*time.Millisecond, time.Second)
	s.stop(wait("answered", "fra-1", 100*time.Millisecond, time.Second))
	if n := s.silent("fra-1"); n != 2 {
		t.Errorf("%d given up, want 2", n)
	}
	for _, name := range []string{"quiet", "never heard", "hearing", "elsewhere", "answered"} {
		_, got := gaveUp.Load(name)
		if got != (name == "quiet" || name == "never heard") {
			t.Errorf("%s: given up %v", name, got)
		}
	}
	if len(s.m["fra-1"]) != 3 || len(s.m["iad-1"]) != 1 {
		t.Errorf("waiters left: %d on fra-1, %d on iad-1; want 3 and 1", len(s.m["fra-1"]), len(s.m["iad-1"]))
	}
}

// TestCloseStopsProbes: Close ends a probe still waiting on a silent host
// (its connect budget a minute) and the scheduler, and leaves no goroutine
// of the proxy behind.
func TestCloseStopsProbes(t *testing.T) {
	if !settle(func() bool { return len(proxyGoroutines()) == 0 }) {
		t.Fatalf("goroutines of earlier tests never ended:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return time.Millisecond }})
	t.Cleanup(func() { n.Close() })
	for _, h := range []string{"ams-1", "fra-1"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	bhF, err := n.Listen("fra-1", 4380)
	if err != nil {
		t.Fatal(err)
	}
	n.Kill("fra-1")
	var dials atomic.Int64
	dial := n.DialerFrom("ams-1")
	clock := newTestClock()
	edge := startProxy(t, Config{HostID: "ams-1", Now: clock.now, ConnectTimeout: time.Minute, MinConnectTimeout: time.Minute,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return dial(ctx, network, addr)
		}})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts}, map[string]string{"fra-1": bhF.Addr().String()})
	edge.strike(&route.Target{MachineID: "m", Host: "fra-1"}, &connectError{addr: "x", err: context.DeadlineExceeded})
	clock.advance(breakerBase)
	if !settle(func() bool { return dials.Load() == 1 }) {
		t.Fatalf("%d probes dialled the silent host, want 1", dials.Load())
	}
	closed := make(chan struct{})
	go func() { edge.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(settleWait):
		t.Fatal("Close waits on a probe of a silent host")
	}
	if !settle(func() bool { return len(proxyGoroutines()) == 0 }) {
		t.Fatalf("goroutines left after Close:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	if dials.Load() != 1 {
		t.Errorf("%d probes of one host, want 1", dials.Load())
	}
}
