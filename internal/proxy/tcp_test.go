package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// tcpPort is the public port the raw TCP tests serve: the edge's listener
// for it is opened on a free loopback port (tcpListen), so the number
// itself is never bound.
const tcpPort = 10001

var tcpRange = PortRange{Lo: 10000, Hi: 10999}

// tcpListen opens each raw TCP public port's listener on a free loopback
// port.
func tcpListen(port int) (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

// tcpBackend is a machine's raw TCP server: on each connection it reads a
// PROXY protocol v1 header first when asked to, greets with its name and
// the addresses the header named, then echoes lines; at the end of the
// client's stream it says bye and closes.
type tcpBackend struct {
	name  string
	addr  *net.TCPAddr
	open  atomic.Int64 // connections open now
	total atomic.Int64
}

func startTCPBackend(t *testing.T, name string, proxyProto bool) *tcpBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &tcpBackend{name: name, addr: ln.Addr().(*net.TCPAddr)}
	var wg sync.WaitGroup
	conns := map[net.Conn]bool{}
	var mu sync.Mutex
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			b.open.Add(1)
			b.total.Add(1)
			wg.Go(func() {
				defer func() {
					c.Close()
					b.open.Add(-1)
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				br := bufio.NewReader(c)
				greeting := name
				if proxyProto {
					version, src, dst, err := readProxyHeader(br)
					if err != nil {
						fmt.Fprintf(c, "bad PROXY header: %v\n", err)
						return
					}
					greeting += " " + version + " " + src.String() + " " + dst.String()
				}
				fmt.Fprintf(c, "%s\n", greeting)
				for {
					line, err := br.ReadString('\n')
					if err == io.EOF {
						fmt.Fprintf(c, "bye\n") // the client's half close arrived
						return
					}
					if err != nil {
						return
					}
					fmt.Fprintf(c, "%s: %s", name, line)
				}
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return b
}

// readProxyHeader parses a PROXY protocol header of either version, as a
// machine would.
func readProxyHeader(br *bufio.Reader) (version string, src, dst netip.AddrPort, err error) {
	if sig, _ := br.Peek(len(proxyV2Sig)); string(sig) == proxyV2Sig {
		src, dst, err = readProxyV2(br)
		return "v2", src, dst, err
	}
	src, dst, err = readProxyV1(br)
	return "v1", src, dst, err
}

// readProxyV2 parses a PROXY protocol v2 header (PROXY command, TCP).
func readProxyV2(br *bufio.Reader) (src, dst netip.AddrPort, err error) {
	var fixed [16]byte
	if _, err := io.ReadFull(br, fixed[:]); err != nil {
		return src, dst, err
	}
	if string(fixed[:12]) != proxyV2Sig || fixed[12] != 0x21 {
		return src, dst, fmt.Errorf("v2 header %x: not version 2 PROXY", fixed)
	}
	n := int(fixed[14])<<8 | int(fixed[15])
	body := make([]byte, n)
	if _, err := io.ReadFull(br, body); err != nil {
		return src, dst, err
	}
	port := func(b []byte) uint16 { return uint16(b[0])<<8 | uint16(b[1]) }
	switch {
	case fixed[13] == 0x11 && n >= 12:
		s, _ := netip.AddrFromSlice(body[0:4])
		d, _ := netip.AddrFromSlice(body[4:8])
		return netip.AddrPortFrom(s, port(body[8:])), netip.AddrPortFrom(d, port(body[10:])), nil
	case fixed[13] == 0x21 && n >= 36:
		s, _ := netip.AddrFromSlice(body[0:16])
		d, _ := netip.AddrFromSlice(body[16:32])
		return netip.AddrPortFrom(s.Unmap(), port(body[32:])), netip.AddrPortFrom(d.Unmap(), port(body[34:])), nil
	}
	return src, dst, fmt.Errorf("v2 header: family %#x with %d address bytes", fixed[13], n)
}

// readProxyV1 parses a PROXY protocol v1 header as a machine would.
func readProxyV1(br *bufio.Reader) (src, dst netip.AddrPort, err error) {
	line, err := br.ReadString('\n')
	if err != nil {
		return src, dst, err
	}
	if len(line) > 107 || !strings.HasSuffix(line, "\r\n") {
		return src, dst, fmt.Errorf("header %q: too long or not CRLF-terminated", line)
	}
	f := strings.Fields(strings.TrimSuffix(line, "\r\n"))
	if len(f) != 6 || f[0] != "PROXY" || (f[1] != "TCP4" && f[1] != "TCP6") {
		return src, dst, fmt.Errorf("header %q: want PROXY TCP4|TCP6 src dst sport dport", line)
	}
	if src, err = netip.ParseAddrPort(net.JoinHostPort(f[2], f[4])); err != nil {
		return src, dst, err
	}
	if dst, err = netip.ParseAddrPort(net.JoinHostPort(f[3], f[5])); err != nil {
		return src, dst, err
	}
	if (f[1] == "TCP4") != (src.Addr().Is4() && dst.Addr().Is4()) {
		return src, dst, fmt.Errorf("header %q: family does not match its addresses", line)
	}
	return src, dst, nil
}

// tcpMachine is a started machine of app with a raw TCP service on public
// port tcpPort.
func tcpMachine(id, app, host string, addr *net.TCPAddr, h route.Handler, hard int) route.Machine {
	m := machine(id, host, addr)
	m.App = app
	m.Services = []route.Service{{InternalPort: addr.Port, SoftLimit: hard, HardLimit: hard,
		Ports: []route.PortRange{{Start: tcpPort, End: tcpPort, Handler: h}}}}
	return m
}

// dialTCPEdge connects to the edge's raw TCP port and returns the greeting.
func dialTCPEdge(t *testing.T, p *Proxy) (net.Conn, *bufio.Reader, string) {
	t.Helper()
	addr := p.TCPAddrs()[tcpPort]
	if addr == "" {
		t.Fatalf("no listener for port %d: %v", tcpPort, p.TCPAddrs())
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return c, br, ""
	}
	return c, br, strings.TrimSuffix(line, "\n")
}

func echo(t *testing.T, c net.Conn, br *bufio.Reader, name string) {
	t.Helper()
	for i := range 3 {
		fmt.Fprintf(c, "line %d\n", i)
		want := fmt.Sprintf("%s: line %d\n", name, i)
		if line, err := br.ReadString('\n'); err != nil || line != want {
			t.Fatalf("echo %d: %q %v, want %q", i, line, err, want)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("still not %s after 20s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// tcpPair is an edge (ams-1) and a far host (fra-1) with raw TCP ports.
func tcpPair(t *testing.T) (edge, far *Proxy, set func(ms ...route.Machine)) {
	edge = startProxy(t, Config{HostID: "ams-1", TCPPorts: tcpRange, ListenTCP: tcpListen})
	far = startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	set = func(ms ...route.Machine) {
		edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
		far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
	}
	return edge, far, set
}

// TestTCPPassthrough: a raw TCP service answers on its public port, on a
// machine of the edge's host and on one across the backhaul; bytes pass
// both ways untouched, the connection counts in flight while open, and a
// client's half close reaches the machine.
func TestTCPPassthrough(t *testing.T) {
	b := startTCPBackend(t, "echo", false)
	edge, far, set := tcpPair(t)
	for _, on := range []string{"ams-1", "fra-1"} {
		set(tcpMachine("m1", "demo", on, b.addr, route.HandlerTCP, 0))
		c, br, greeting := dialTCPEdge(t, edge)
		if greeting != "echo" {
			t.Fatalf("on %s: greeting %q", on, greeting)
		}
		echo(t, c, br, "echo")
		if n := edge.InFlight()["m1"]; n != 1 {
			t.Errorf("on %s: %d in flight at the edge, want the open connection", on, n)
		}
		if on == "fra-1" && far.InFlight()["m1"] != 1 {
			t.Errorf("on %s: %d in flight at the far host", on, far.InFlight()["m1"])
		}
		// A line sent with the half close still arrives and is answered.
		fmt.Fprintf(c, "last\n")
		c.(*net.TCPConn).CloseWrite()
		// The machine sees the end of the stream and still answers.
		for _, want := range []string{"echo: last\n", "bye\n"} {
			if line, err := br.ReadString('\n'); err != nil || line != want {
				t.Errorf("on %s: after a half close: %q %v, want %q", on, line, err, want)
			}
		}
		c.Close()
		waitFor(t, "closed everywhere", func() bool {
			return edge.InFlight()["m1"] == 0 && far.InFlight()["m1"] == 0 && b.open.Load() == 0
		})
	}
	// An HTTP request on the HTTP edge does not reach the raw TCP service.
	resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 503 {
		t.Errorf("HTTP request for a raw TCP app: %d %s", resp.StatusCode, body)
	}
}

// TestTCPProxyProto: a port with the proxy_proto handler sends the machine
// a PROXY header (v1, or v2 when the port asks) with the client's address
// and the edge's before the client's bytes, directly and across the
// backhaul.
func TestTCPProxyProto(t *testing.T) {
	b := startTCPBackend(t, "pp", true)
	edge, _, set := tcpPair(t)
	for _, h := range []route.Handler{route.HandlerProxyProto, route.HandlerProxyProtoV2} {
		version := map[route.Handler]string{route.HandlerProxyProto: "v1", route.HandlerProxyProtoV2: "v2"}[h]
		for _, on := range []string{"ams-1", "fra-1"} {
			set(tcpMachine("m1", "demo", on, b.addr, h, 0))
			c, br, greeting := dialTCPEdge(t, edge)
			want := fmt.Sprintf("pp %s %s %s", version, c.LocalAddr(), c.RemoteAddr())
			if greeting != want {
				t.Fatalf("on %s: the machine saw %q, want %q", on, greeting, want)
			}
			echo(t, c, br, "pp")
			c.Close()
		}
	}
}

func TestProxyHeaderV2(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct{ client, edge netip.AddrPort }{
		{ap("1.2.3.4:5678"), ap("10.0.0.1:10001")},
		{ap("[2001:db8::1]:5678"), ap("[::1]:443")},
		{ap("[::ffff:1.2.3.4]:1"), ap("10.0.0.1:2")},
	} {
		h := proxyHeaderV2(tc.client, tc.edge)
		src, dst, err := readProxyV2(bufio.NewReader(strings.NewReader(string(h))))
		if err != nil || src != netip.AddrPortFrom(tc.client.Addr().Unmap(), tc.client.Port()) || dst != tc.edge {
			t.Errorf("%v → %v: read back %v → %v, %v (%x)", tc.client, tc.edge, src, dst, err, h)
		}
	}
	want := []byte("\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x01\x02\x03\x04\x0a\x00\x00\x01\x16\x2e\x27\x11")
	if got := proxyHeaderV2(ap("1.2.3.4:5678"), ap("10.0.0.1:10001")); string(got) != string(want) {
		t.Errorf("IPv4 header %x, want %x", got, want)
	}
	if got := proxyHeaderV2(netip.AddrPort{}, ap("10.0.0.1:1")); string(got) != proxyV2Sig+"\x20\x00\x00\x00" {
		t.Errorf("unknown addresses: %x, want a LOCAL header", got)
	}
}

func TestProxyHeaderV1(t *testing.T) {
	ap := netip.MustParseAddrPort
	for _, tc := range []struct {
		client, edge netip.AddrPort
		want         string
	}{
		{ap("1.2.3.4:5678"), ap("10.0.0.1:10001"), "PROXY TCP4 1.2.3.4 10.0.0.1 5678 10001\r\n"},
		{ap("[2001:db8::1]:5678"), ap("[::1]:443"), "PROXY TCP6 2001:db8::1 ::1 5678 443\r\n"},
		{ap("[::ffff:1.2.3.4]:1"), ap("10.0.0.1:2"), "PROXY TCP4 1.2.3.4 10.0.0.1 1 2\r\n"},
		{ap("1.2.3.4:1"), ap("[::1]:2"), "PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n"},
		{netip.AddrPort{}, ap("[::1]:2"), "PROXY UNKNOWN\r\n"},
	} {
		got := string(proxyHeaderV1(tc.client, tc.edge))
		if got != tc.want {
			t.Errorf("%v → %v: %q, want %q", tc.client, tc.edge, got, tc.want)
		}
		if got != "PROXY UNKNOWN\r\n" {
			if _, _, err := readProxyV1(bufio.NewReader(strings.NewReader(got))); err != nil {
				t.Errorf("%q does not parse: %v", got, err)
			}
		}
	}
}

// TestTCPHardLimit: a raw TCP service counts connections: at its hard limit
// a machine takes no new one, which goes to another machine, and when every
// machine is at its limit the connection is refused (closed at once).
func TestTCPHardLimit(t *testing.T) {
	b1 := startTCPBackend(t, "one", false)
	b2 := startTCPBackend(t, "two", false)
	edge, _, set := tcpPair(t)
	set(tcpMachine("m1", "demo", "ams-1", b1.addr, route.HandlerTCP, 1),
		tcpMachine("m2", "demo", "fra-1", b2.addr, route.HandlerTCP, 1))
	c1, _, g1 := dialTCPEdge(t, edge)
	if g1 != "one" {
		t.Fatalf("first connection went to %q, want the local machine", g1)
	}
	_, _, g2 := dialTCPEdge(t, edge)
	if g2 != "two" {
		t.Fatalf("with the local machine at its hard limit the second went to %q", g2)
	}
	_, _, g3 := dialTCPEdge(t, edge)
	if g3 != "" {
		t.Fatalf("with every machine at its hard limit a third was taken by %q", g3)
	}
	c1.Close()
	waitFor(t, "the first connection counted out", func() bool { return edge.InFlight()["m1"] == 0 })
	if _, _, g := dialTCPEdge(t, edge); g != "one" {
		t.Fatalf("after the first closed, a new connection went to %q", g)
	}
}

// TestTCPRefusedConnectMovesOn: a machine that refuses the connection,
// on the edge's host or on another (whose proxy says so), or that its host
// knows stopped, costs nothing but the attempt: the connection goes to the
// next candidate.
func TestTCPRefusedConnectMovesOn(t *testing.T) {
	good := startTCPBackend(t, "good", false)
	// The clock stands still: a demotion lasts until the test looks.
	edge := startProxy(t, Config{HostID: "ams-1", TCPPorts: tcpRange, ListenTCP: tcpListen, Now: newTestClock().now})
	near := startProxy(t, Config{HostID: "ams-2"})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"ams-2": near.BackhaulAddr(), "fra-1": far.BackhaulAddr()}
	// The third case: a machine the edge believes started, whose host
	// knows it stopped.
	for _, on := range []string{"ams-1", "ams-2", "stale"} {
		// The bad machine is in the edge's region, the good one away:
		// the bad one comes first.
		bad := "bad-" + on // a machine of its own each time: not demoted yet
		host := on
		if on == "stale" {
			host = "ams-2"
		}
		ms := []route.Machine{tcpMachine(bad, "demo", host, refusingAddr(t), route.HandlerTCP, 0),
			tcpMachine("good", "demo", "fra-1", good.addr, route.HandlerTCP, 0)}
		for _, p := range []*Proxy{edge, near, far} {
			mine := slices.Clone(ms)
			if on == "stale" && p == near {
				mine[0] = tcpMachine(bad, "demo", host, good.addr, route.HandlerTCP, 0) // would answer, were it started
				mine[0].Started = false
			}
			p.setState(route.Facts{Self: p.cfg.HostID, Region: p.cfg.Region, Hosts: testHosts, Machines: mine}, backhaul)
		}
		var q route.Query
		q.Port, q.TCP = tcpPort, true
		var buf [route.MaxCandidates]*route.Target
		if cands := edge.Table().Select("demo", q, routeInput{edge}, buf[:0]); len(cands) != 2 || cands[0].MachineID != bad {
			t.Fatalf("bad on %s: candidates %v, want the refusing machine first", on, cands)
		}
		c, br, g := dialTCPEdge(t, edge)
		if g != "good" {
			t.Fatalf("bad on %s: greeted by %q", on, g)
		}
		echo(t, c, br, "good")
		c.Close()
		if !edge.strikes.demoted(bad, host) {
			t.Errorf("bad on %s: the refusing machine was not tried (not demoted)", on)
		}
	}
}

// TestTCPPortsFollowTheTable: the edge listens on exactly the raw TCP
// ports its table shows inside its range and one app declares; a port two
// apps declare is served to neither.
func TestTCPPortsFollowTheTable(t *testing.T) {
	b := startTCPBackend(t, "echo", false)
	edge, _, set := tcpPair(t)
	if n := len(edge.TCPAddrs()); n != 0 {
		t.Fatalf("%d listeners with no machine", n)
	}
	out := tcpMachine("out", "other", "ams-1", b.addr, route.HandlerTCP, 0)
	out.Services[0].Ports[0] = route.PortRange{Start: 9999, End: 9999, Handler: route.HandlerTCP}
	set(tcpMachine("m1", "demo", "ams-1", b.addr, route.HandlerTCP, 0), out)
	addrs := edge.TCPAddrs()
	if len(addrs) != 1 || addrs[tcpPort] == "" {
		t.Fatalf("listeners %v, want port %d only", addrs, tcpPort)
	}
	old := addrs[tcpPort]
	set(tcpMachine("m1", "demo", "ams-1", b.addr, route.HandlerTCP, 0), tcpMachine("m2", "rival", "ams-1", b.addr, route.HandlerTCP, 0))
	if n := len(edge.TCPAddrs()); n != 0 {
		t.Fatalf("a port two apps declare is still served: %v", edge.TCPAddrs())
	}
	if c, err := net.Dial("tcp", old); err == nil {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		if n, _ := c.Read(make([]byte, 1)); n > 0 {
			t.Error("the closed port still answers")
		}
		c.Close()
	}
	set()
	if n := len(edge.TCPAddrs()); n != 0 {
		t.Fatalf("listeners %v with no machine", edge.TCPAddrs())
	}
}

// TestTCPIdleTimeout: through the edge, a raw TCP connection idle both
// ways for the idle timeout is closed, on both sides, and not before.
func TestTCPIdleTimeout(t *testing.T) {
	const idle = 300 * time.Millisecond
	b := startTCPBackend(t, "echo", false)
	edge := startProxy(t, Config{HostID: "ams-1", TCPPorts: tcpRange, ListenTCP: tcpListen, TCPIdleTimeout: idle})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{tcpMachine("m1", "demo", "ams-1", b.addr, route.HandlerTCP, 0)}}, nil)
	c, br, _ := dialTCPEdge(t, edge)
	// The edge's last byte moved after the client sent its last line.
	start := time.Now()
	echo(t, c, br, "echo")
	if _, err := br.ReadString('\n'); err == nil {
		t.Fatal("an idle connection got a line")
	}
	if took := time.Since(start); took < idle {
		t.Errorf("closed after %v idle, before the %v timeout", took, idle)
	}
	waitFor(t, "the machine's side closed", func() bool { return b.open.Load() == 0 })
}

// TestSpliceIdle: a splice lives while bytes move in either direction —
// one way only is enough — and ends idle for exactly the idle timeout after
// the last byte (virtual time).
func TestSpliceIdle(t *testing.T) {
	const idle = time.Minute
	synctest.Test(t, func(t *testing.T) {
		client, edgeSide := net.Pipe()
		machineSide, machine := net.Pipe()
		done := make(chan struct{})
		go func() {
			splice(edgeSide, edgeSide, machineSide, machineSide, idle)
			close(done)
		}()
		// The machine streams a byte every idle/3 for ten idle timeouts;
		// the client only reads.
		go io.Copy(io.Discard, client)
		for range 30 {
			time.Sleep(idle / 3)
			if _, err := machine.Write([]byte{'x'}); err != nil {
				t.Fatalf("the splice ended while the machine was sending: %v", err)
			}
		}
		last := time.Now()
		go io.Copy(io.Discard, machine)
		<-done
		if took := time.Since(last); took != idle {
			t.Errorf("ended %v after the last byte, want the idle timeout %v", took, idle)
		}
		if _, err := machine.Write([]byte{'x'}); err == nil {
			t.Error("the machine's side is still open")
		}
	})
}

// TestTCPCloseLeavesNothing: Close cuts open raw TCP connections (edge and
// backhaul), closes the listeners and leaves no goroutine behind.
func TestTCPCloseLeavesNothing(t *testing.T) {
	b := startTCPBackend(t, "echo", false)
	before := runtime.NumGoroutine()
	edge, far, set := tcpPair(t)
	set(tcpMachine("m1", "demo", "fra-1", b.addr, route.HandlerTCP, 0), tcpMachine("m2", "demo", "ams-1", b.addr, route.HandlerTCP, 0))
	var conns []*bufio.Reader
	for range 4 {
		c, br, g := dialTCPEdge(t, edge)
		if g != "echo" {
			t.Fatalf("greeting %q", g)
		}
		echo(t, c, br, "echo")
		conns = append(conns, br)
	}
	addr := edge.TCPAddrs()[tcpPort]
	closed := make(chan struct{})
	go func() {
		edge.Close()
		far.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close waited on raw TCP connections")
	}
	for i, br := range conns {
		if _, err := br.ReadString('\n'); err != io.EOF && !isClosedErr(err) {
			t.Errorf("connection %d after Close: %v", i, err)
		}
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("the raw TCP listener outlived Close")
	}
	waitFor(t, "the machine's connections closed", func() bool { return b.open.Load() == 0 })
	waitFor(t, "goroutines gone", func() bool { return runtime.NumGoroutine() <= before })
}

func TestTCPPlan(t *testing.T) {
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}
	at := func(id, app string, lo, hi int, h route.Handler) route.Machine {
		m := tcpMachine(id, app, "ams-1", addr, h, 0)
		m.Services[0].Ports[0] = route.PortRange{Start: lo, End: hi, Handler: h}
		return m
	}
	tb := route.Build(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{
		at("a", "db", 10001, 10001, route.HandlerTCP),
		at("b", "db", 10001, 10001, route.HandlerProxyProto), // the same app twice: one owner
		at("c", "games", 10998, 11001, route.HandlerTCP),     // a range across the edge of the range
		at("d", "rival", 10999, 10999, route.HandlerTCP),     // a conflict
		at("e", "web", 10500, 10500, route.HandlerHTTP),      // not raw
		at("f", "low", 80, 80, route.HandlerTCP),             // out of range
	}})
	want, conflicts := tcpPlan(tb, PortRange{Lo: 10000, Hi: 10999})
	if got := fmt.Sprint(want); got != "map[10001:true 10998:true]" {
		t.Errorf("served %s", got)
	}
	if got := fmt.Sprint(conflicts); got != "map[10999:[games rival]]" {
		t.Errorf("conflicts %s", got)
	}
	if want, _ := tcpPlan(tb, PortRange{}); len(want) != 0 {
		t.Errorf("an empty range serves %v", want)
	}
}
