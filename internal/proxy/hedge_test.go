package proxy

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// starvedListener's connections write late while starve is set: every
// Write waits that long first, as the writes of a host whose proxy waits
// for a core do. Its acknowledgements come late, its answers after them.
type starvedListener struct {
	net.Listener
	starve *atomic.Int64 // nanoseconds
}

func (l starvedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return starvedConn{Conn: c, starve: l.starve}, nil
}

type starvedConn struct {
	net.Conn
	starve *atomic.Int64
}

func (c starvedConn) Write(b []byte) (int, error) {
	if d := time.Duration(c.starve.Load()); d > 0 {
		time.Sleep(d)
	}
	return c.Conn.Write(b)
}

// answerName answers every request with 200 and the machine's name.
func answerName(name string) func(m *rawMachine, c net.Conn, br *bufio.Reader) {
	return func(m *rawMachine, c net.Conn, br *bufio.Reader) {
		for {
			req, err := http.ReadRequest(br)
			if err != nil {
				return
			}
			m.got.Add(1)
			io.Copy(io.Discard, req.Body)
			if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: "+itoa(len(name))+"\r\n\r\n"+name); err != nil {
				return
			}
		}
	}
}

func itoa(n int) string { return portOf(&net.TCPAddr{Port: n}) }

// hedgeRig is an edge on ams-1 and a far proxy on fra-1 whose backhaul
// writes late once starved; "far" is a machine on fra-1, "near" one on
// ams-1. Requests prefer far. Every connection the proxies make or take is
// counted.
type hedgeRig struct {
	edge, far *Proxy
	starve    atomic.Int64
	counts    []*connCount
}

func startHedgeRig(t *testing.T, netHTTP bool, far, near *rawMachine) *hedgeRig {
	t.Helper()
	if !settle(func() bool { return len(proxyGoroutines()) == 0 }) {
		t.Fatalf("goroutines of earlier tests never ended:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	rig := &hedgeRig{}
	count := func(what string) *connCount {
		n := &connCount{what: what}
		rig.counts = append(rig.counts, n)
		return n
	}
	farBH := count("far backhaul, from the edge").listen(t)
	rig.far = startProxy(t, Config{HostID: "fra-1", Backhaul: starvedListener{Listener: farBH, starve: &rig.starve},
		Edge: count("far edge").listen(t), DialMachine: count("far, to machines").dialer()})
	rig.edge = startProxy(t, Config{HostID: "ams-1", Edge: count("edge, from clients").listen(t),
		Backhaul: count("edge backhaul").listen(t), DialMachine: count("edge, to machines").dialer(),
		Dial: count("edge, to the far backhaul").dialer(), DisableFastPath: netHTTP})
	ms := []route.Machine{machine("far", "fra-1", far.addr), machine("near", "ams-1", near.addr)}
	backhaul := map[string]string{"ams-1": rig.edge.BackhaulAddr(), "fra-1": rig.far.BackhaulAddr()}
	rig.edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
	rig.far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
	return rig
}

// ask sends a GET preferring far, and returns the status and body.
func (rig *hedgeRig) ask(t *testing.T, c *http.Client) (int, string) {
	t.Helper()
	resp, body := do(t, c, "GET", rig.edge.EdgeAddr(), "demo.localhost", "/", map[string]string{"Fly-Prefer-Instance-Id": "far"}, nil)
	return resp.StatusCode, body
}

// closeAndCheck closes both proxies: no goroutine of theirs and no
// connection they made or took may be left, nor one to the machines.
func (rig *hedgeRig) closeAndCheck(t *testing.T, ms ...*rawMachine) {
	t.Helper()
	for _, p := range []*Proxy{rig.edge, rig.far} {
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}
	ok := settle(func() bool {
		for _, n := range rig.counts {
			if n.open.Load() != 0 {
				return false
			}
		}
		for _, m := range ms {
			if m.open.Load() != 0 {
				return false
			}
		}
		return len(proxyGoroutines()) == 0
	})
	if !ok {
		for _, n := range rig.counts {
			if v := n.open.Load(); v != 0 {
				t.Errorf("%s: %d connections open", n.what, v)
			}
		}
		for i, m := range ms {
			if v := m.open.Load(); v != 0 {
				t.Errorf("machine %d holds %d connections", i, v)
			}
		}
		if g := proxyGoroutines(); len(g) > 0 {
			t.Errorf("%d goroutines left:\n%s", len(g), strings.Join(g, "\n\n"))
		}
	}
}

// starveFor is how late the far host writes: many times its
// acknowledgement budget (DefaultAckTimeout beyond two round trips of
// fra-1's 8 ms), so its first acknowledgement is late however late the
// edge's own timer fires short of that.
const starveFor = 20 * DefaultAckTimeout

func bothPaths(t *testing.T, f func(t *testing.T, netHTTP bool)) {
	for _, path := range []string{"fast", "net/http"} {
		t.Run(path, func(t *testing.T) { f(t, path == "net/http") })
	}
}

// TestHedgeKeepsTheLateAnswer: a live far host acknowledges late (its
// writes wait), and the next candidate refuses connections. The edge used
// to give the far host up and answer 502 when the next one failed too;
// now the far attempt keeps running while the next candidate is tried, and
// its answer, late, is the client's.
func TestHedgeKeepsTheLateAnswer(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		far := startRawMachine(t, answerName("far"))
		near := startRawMachine(t, answerName("near"))
		rig := startHedgeRig(t, netHTTP, far, near)
		client := &http.Client{Timeout: time.Minute}
		t.Cleanup(client.CloseIdleConnections)
		if status, body := rig.ask(t, client); status != 200 || body != "far" {
			t.Fatalf("before the host starves: %d %q, want 200 far", status, body)
		}
		// near refuses from now on: its address is given to a closed port.
		refused := refusingAddr(t)
		ms := []route.Machine{machine("far", "fra-1", far.addr), machine("near", "ams-1", refused)}
		backhaul := map[string]string{"ams-1": rig.edge.BackhaulAddr(), "fra-1": rig.far.BackhaulAddr()}
		rig.edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
		rig.starve.Store(int64(starveFor))
		if status, body := rig.ask(t, client); status != 200 || body != "far" {
			t.Fatalf("far host acknowledging late, near refusing: %d %q, want 200 far (its late answer)", status, body)
		}
		if n := rig.edge.hedges.Load(); n != 1 {
			t.Errorf("%d hedges started, want 1", n)
		}
		rig.starve.Store(0)
		client.CloseIdleConnections()
		rig.closeAndCheck(t, far, near)
	})
}

// TestHedgeWinsAndEndsTheLateAttempt: the far host acknowledges late and
// its machine holds the request; the hedge to near answers (once the far
// machine is at work), and the client has near's answer. The far attempt is cancelled: the far
// machine's connection closes (its work stops) while the proxies still
// run, and nothing is left once they close.
func TestHedgeWinsAndEndsTheLateAttempt(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		far := startRawMachine(t, hangUp)
		// near answers once far has the request: the far machine is at
		// work when it loses.
		near := startRawMachine(t, func(m *rawMachine, c net.Conn, br *bufio.Reader) {
			settle(func() bool { return far.got.Load() > 0 })
			answerName("near")(m, c, br)
		})
		rig := startHedgeRig(t, netHTTP, far, near)
		client := &http.Client{Timeout: time.Minute}
		t.Cleanup(client.CloseIdleConnections)
		rig.starve.Store(int64(starveFor))
		if status, body := rig.ask(t, client); status != 200 || body != "near" {
			t.Fatalf("far acknowledging late and holding the request: %d %q, want 200 near", status, body)
		}
		if far.got.Load() != 1 || rig.edge.hedges.Load() != 1 {
			t.Fatalf("far took %d requests, %d hedges started; want 1 and 1", far.got.Load(), rig.edge.hedges.Load())
		}
		if !settle(func() bool { return far.open.Load() == 0 }) {
			t.Errorf("the far machine still holds %d connections: the losing attempt was not cancelled", far.open.Load())
		}
		rig.starve.Store(0)
		client.CloseIdleConnections()
		rig.closeAndCheck(t, far, near)
	})
}

// TestHedgeLosesAndIsCancelled: the far host acknowledges late but its
// machine answers; the hedge goes to near, which holds the request. The
// far answer comes first and is the client's; the hedge's connection to
// near closes.
func TestHedgeLosesAndIsCancelled(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		far := startRawMachine(t, answerName("far"))
		near := startRawMachine(t, hangUp)
		rig := startHedgeRig(t, netHTTP, far, near)
		client := &http.Client{Timeout: time.Minute}
		t.Cleanup(client.CloseIdleConnections)
		if status, body := rig.ask(t, client); status != 200 || body != "far" {
			t.Fatalf("before the host starves: %d %q, want 200 far", status, body)
		}
		rig.starve.Store(int64(starveFor))
		if status, body := rig.ask(t, client); status != 200 || body != "far" {
			t.Fatalf("far acknowledging late, near holding: %d %q, want 200 far", status, body)
		}
		if near.got.Load() != 1 || rig.edge.hedges.Load() != 1 {
			t.Fatalf("near took %d requests, %d hedges started; want 1 and 1", near.got.Load(), rig.edge.hedges.Load())
		}
		if !settle(func() bool { return near.open.Load() == 0 }) {
			t.Errorf("near still holds %d connections: the losing hedge was not cancelled", near.open.Load())
		}
		rig.starve.Store(0)
		client.CloseIdleConnections()
		rig.closeAndCheck(t, far, near)
	})
}

// TestNonIdempotentNeverHedged: a POST to a far host that acknowledges
// late is not sent anywhere else: it waits for its answer.
func TestNonIdempotentNeverHedged(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		far := startRawMachine(t, answerName("far"))
		near := startRawMachine(t, answerName("near"))
		rig := startHedgeRig(t, netHTTP, far, near)
		client := &http.Client{Timeout: time.Minute}
		t.Cleanup(client.CloseIdleConnections)
		rig.ask(t, client)
		rig.starve.Store(int64(starveFor))
		resp, body := do(t, client, "POST", rig.edge.EdgeAddr(), "demo.localhost", "/", map[string]string{"Fly-Prefer-Instance-Id": "far"}, strings.NewReader("once"))
		if resp.StatusCode != 200 || body != "far" || near.got.Load() != 0 || rig.edge.hedges.Load() != 0 {
			t.Fatalf("POST: %d %q, near took %d, %d hedges; want 200 far, 0, 0", resp.StatusCode, body, near.got.Load(), rig.edge.hedges.Load())
		}
		rig.starve.Store(0)
		client.CloseIdleConnections()
		rig.closeAndCheck(t, far, near)
	})
}

// TestHedgeBounds: a hedge skips a machine that reached its hard limit
// after the request chose its candidates, and a region whose breaker is
// not closed; it takes a machine under its limit in a closed region.
func TestHedgeBounds(t *testing.T) {
	p := startProxy(t, Config{HostID: "ams-1"})
	tg := &route.Target{App: "demo", MachineID: "m", Region: "fra", SoftLimit: 2, HardLimit: 3}
	if why := p.notHedgedTo(tg); why != "" {
		t.Fatalf("an idle machine in a closed region: not hedged to: %s", why)
	}
	p.load.add("m", 3)
	if why := p.notHedgedTo(tg); !strings.Contains(why, "hard limit") {
		t.Errorf("a machine at its hard limit: %q, want it skipped for its hard limit", why)
	}
	p.load.add("m", -3)
	for range route.RegionMinAttempts {
		p.regions.record("demo", "fra", true)
	}
	if why := p.notHedgedTo(tg); !strings.Contains(why, "region fra") {
		t.Errorf("a machine of a tripped region: %q, want it skipped for its region", why)
	}
}
