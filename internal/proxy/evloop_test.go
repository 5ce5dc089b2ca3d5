//go:build linux

package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// With FLAME_TEST_EVENT_LOOP=0 no edge of the package's tests has event
// loops: the whole suite runs with a goroutine per connection.
func init() {
	if os.Getenv("FLAME_TEST_EVENT_LOOP") == "0" {
		noEventLoop = true
	}
}

// loopEdge starts an edge with its event loops in front of the machine at
// addr (limits high enough for many clients at once).
func loopEdge(t *testing.T, addr *net.TCPAddr, cfg Config) *Proxy {
	t.Helper()
	cfg.HostID, cfg.loops = "ams-1", true
	p := startProxy(t, cfg)
	m := machine("m1", "ams-1", addr)
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 10000, 10000
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
	if p.edge == nil || p.edge.loops == nil {
		t.Fatal("the edge has no event loops")
	}
	return p
}

// fixedMachine answers every request on every connection with a 200 and
// body, at once, allocating nothing per request.
func fixedMachine(t *testing.T, body []byte) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	resp := fmt.Appendf(nil, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				answerEach(c, resp)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().(*net.TCPAddr)
}

const loopReq = "GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n"

func loopHanded(p *Proxy) int64 { _, h := p.edge.loops.stats(); return h }

// TestEventLoopForwardsLikeTheFastPath: a request served by the loop
// reaches the machine with Fly's headers and comes back with the edge's,
// as the fast path sends them, and no connection left the loop.
func TestEventLoopForwardsLikeTheFastPath(t *testing.T) {
	b := startBackend(t, "m1")
	p := loopEdge(t, b.addr, Config{})
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := range 20 {
		fmt.Fprintf(c, "POST /x/%d?q=1 HTTP/1.1\r\nHost: demo.localhost\r\nX-Forwarded-For: 203.0.113.9\r\nFly-Region: forged\r\nContent-Length: 5\r\n\r\nhello", i)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		s := decode(t, string(body))
		if s.URI != fmt.Sprintf("/x/%d?q=1", i) || s.Method != "POST" || s.Body != "hello" {
			t.Fatalf("request %d reached the machine as %s %s %q", i, s.Method, s.URI, s.Body)
		}
		h := s.Header
		if h.Get("Fly-Client-Ip") != "127.0.0.1" || h.Get("Fly-Region") != "ams" || h.Get("X-Forwarded-For") != "203.0.113.9, 127.0.0.1" ||
			h.Get("X-Forwarded-Proto") != "http" || h.Get("Fly-Forwarded-Port") != "80" || !strings.HasSuffix(h.Get("Fly-Request-Id"), "-ams") {
			t.Fatalf("request %d: the machine got headers %v", i, h)
		}
		if resp.Header.Get("Fly-Request-Id") != h.Get("Fly-Request-Id") || resp.Header.Get("Via") != viaValue || resp.Header.Get("Server") != serverName {
			t.Fatalf("request %d: answer headers %v", i, resp.Header)
		}
	}
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", n)
	}
}

// TestEventLoopManyClients: many keep-alive clients at once, every answer
// right, all of them on the loops.
func TestEventLoopManyClients(t *testing.T) {
	p := loopEdge(t, fixedMachine(t, []byte("hello\n")), Config{})
	const clients, each = 100, 30
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	conns := make(chan net.Conn, clients)
	for range clients {
		wg.Go(func() {
			c, err := net.Dial("tcp", p.EdgeAddr())
			if err != nil {
				errs <- err
				return
			}
			conns <- c
			br := bufio.NewReader(c)
			for i := range each {
				if _, err := io.WriteString(c, loopReq); err != nil {
					errs <- err
					return
				}
				if err := readLeanResponse(br); err != nil {
					errs <- fmt.Errorf("request %d: %w", i, err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	close(conns)
	for err := range errs {
		t.Error(err)
	}
	if n := p.edge.loops.live(); n != clients {
		t.Errorf("the loops serve %d connections, want %d", n, clients)
	}
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", n)
	}
	for c := range conns {
		c.Close()
	}
	if !settle(func() bool { return p.edge.loops.live() == 0 }) {
		t.Errorf("%d connections still on the loops after their clients closed", p.edge.loops.live())
	}
}

// TestEventLoopPipelined: requests sent in one write are answered in
// order.
func TestEventLoopPipelined(t *testing.T) {
	b := startBackend(t, "m1")
	p := loopEdge(t, b.addr, Config{})
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var all bytes.Buffer
	const n = 40
	for i := range n {
		fmt.Fprintf(&all, "GET /%d HTTP/1.1\r\nHost: demo.localhost\r\n\r\n", i)
	}
	if _, err := c.Write(all.Bytes()); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for i := range n {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if s := decode(t, string(body)); s.URI != "/"+strconv.Itoa(i) {
			t.Fatalf("answer %d is for %s", i, s.URI)
		}
	}
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", n)
	}
}

// TestEventLoopSlowReaderStallsNoOne: a client that sends requests and
// never reads its answers, on the same loop as another. The bound is by
// construction, not by timing: no read or write of the loop waits (every
// socket is non-blocking, and a write the client cannot take is kept and
// finished on its next writable edge), so once the slow client's socket
// is full, each wake-up costs the loop at most one write attempt for it
// (one EAGAIN) and one read into its bounded buffer. The test proves the
// stall happened (the loop counted a write that would block, and the slow
// connection is still on the loop, unanswered) and that the other client
// was served all the while, with nothing handed to a goroutine.
func TestEventLoopSlowReaderStallsNoOne(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1)) // one loop: both clients on it
	p := loopEdge(t, fixedMachine(t, bytes.Repeat([]byte("x"), 8<<10)), Config{})
	if len(p.edge.loops.loops) != 1 {
		t.Fatalf("%d loops, want 1", len(p.edge.loops.loops))
	}
	slow, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	slow.(*net.TCPConn).SetReadBuffer(4 << 10)
	stopWriting := make(chan struct{})
	var wg sync.WaitGroup
	defer wg.Wait()
	defer close(stopWriting)
	wg.Go(func() {
		reqs := bytes.Repeat([]byte(loopReq), 64)
		for {
			select {
			case <-stopWriting:
				return
			default:
			}
			slow.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
			slow.Write(reqs) // blocks (until the deadline) once the edge stops reading
		}
	})
	if !settle(func() bool { s, _ := p.edge.loops.stats(); return s > 0 }) {
		t.Fatal("the slow client's answers never filled its socket")
	}
	fast, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer fast.Close()
	br := bufio.NewReader(fast)
	for i := range 200 {
		if _, err := io.WriteString(fast, loopReq); err != nil {
			t.Fatal(err)
		}
		if err := readLeanResponse(br); err != nil {
			t.Fatalf("request %d of the other client: %v", i, err)
		}
	}
	if n := p.edge.loops.live(); n != 2 {
		t.Errorf("the loop serves %d connections, want both", n)
	}
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", n)
	}
}

// TestEventLoopMachineClosesMidAnswer: a machine that sends the head and
// part of the body, then closes: the client's connection is cut (as the
// fast path cuts it), the machine counts no failure of a request it
// answered, and the loop serves the next client.
func TestEventLoopMachineClosesMidAnswer(t *testing.T) {
	cutter := startRawMachine(t, func(m *rawMachine, c net.Conn, br *bufio.Reader) {
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		m.got.Add(1)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
	})
	p := loopEdge(t, cutter.addr, Config{})
	for i := range 3 {
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(c, loopReq)
		c.SetReadDeadline(time.Now().Add(settleWait))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil {
			t.Fatalf("round %d: the client's connection was not cut: %v", i, err)
		}
		if resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(got)), nil); err == nil {
			if b, err := io.ReadAll(resp.Body); err == nil {
				t.Fatalf("round %d: a whole answer from a cut one: %q", i, b)
			}
		}
	}
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines: the loop did not see the machine's end itself", n)
	}
	if got := cutter.got.Load(); got != 3 {
		t.Errorf("the machine got %d requests, want 3 (nothing retried after its answer started)", got)
	}
	if !settle(func() bool { return p.edge.loops.live() == 0 && p.load.InFlight("m1") == 0 }) {
		t.Errorf("after the cut answers: %d connections on the loops, %d requests counted in flight", p.edge.loops.live(), p.load.InFlight("m1"))
	}
}

// TestEventLoopClientLeaves: a client that closes halfway through a head
// is forgotten at once (not when the header timeout, here longer than the
// test's wait, passes: its end comes with the edge that brought its last
// bytes, and the loop reads on to it); one that closes while its machine
// is slow gets the machine's connection closed (the attempt ends, as on
// the fast path).
func TestEventLoopClientLeaves(t *testing.T) {
	hung := startRawMachine(t, hangUp)
	p := loopEdge(t, hung.addr, Config{ReadHeaderTimeout: 2 * settleWait})
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: demo.loc")
	if !settle(func() bool { return p.edge.loops.live() == 1 }) {
		t.Fatal("the loop did not take the connection")
	}
	c.Close()
	if !settle(func() bool { return p.edge.loops.live() == 0 }) {
		t.Fatal("a client that left mid-head is still on the loop")
	}
	c, err = net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, loopReq)
	if !settle(func() bool { return hung.got.Load() == 1 && hung.open.Load() == 1 }) {
		t.Fatal("the request never reached the machine")
	}
	c.Close()
	if !settle(func() bool { return hung.open.Load() == 0 }) {
		t.Fatal("the machine's connection stayed open after its client left")
	}
	if !settle(func() bool { return p.load.InFlight("m1") == 0 }) {
		t.Errorf("%d requests still counted in flight", p.load.InFlight("m1"))
	}
}

// TestEventLoopIdleConnections: hundreds of idle connections cost the
// loop no goroutine each, the loop serves a request among them, and they
// are closed after IdleTimeout.
func TestEventLoopIdleConnections(t *testing.T) {
	const idle = 300
	p := loopEdge(t, fixedMachine(t, []byte("hello\n")), Config{IdleTimeout: time.Second})
	before := runtime.NumGoroutine()
	conns := make([]net.Conn, 0, idle)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range idle {
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	if !settle(func() bool { return p.edge.loops.live() == idle }) {
		t.Fatalf("the loops took %d of %d connections", p.edge.loops.live(), idle)
	}
	if g := runtime.NumGoroutine() - before; g > idle/10 {
		t.Errorf("%d idle connections added %d goroutines", idle, g)
	}
	c := conns[idle/2]
	io.WriteString(c, loopReq)
	if err := readLeanResponse(bufio.NewReader(c)); err != nil {
		t.Fatalf("a request among idle connections: %v", err)
	}
	// Every one is closed once idle for IdleTimeout (the loop looks every
	// loopTick); settle bounds the wait.
	for i, c := range conns {
		c.SetReadDeadline(time.Now().Add(settleWait))
		if n, err := c.Read(make([]byte, 1)); err == nil || isTimeout(err) {
			t.Fatalf("idle connection %d: read %d bytes, %v; want it closed", i, n, err)
		}
	}
	if !settle(func() bool { return p.edge.loops.live() == 0 }) {
		t.Errorf("%d connections left on the loops", p.edge.loops.live())
	}
}

// openFDs counts the process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// TestEventLoopLeavesNothing: after clients on the loop, connections
// handed to goroutines (a chunked request, an unknown host, a streamed
// answer), a request held by a slow machine and idle connections, Close
// leaves no goroutine of the proxy and no descriptor it opened.
func TestEventLoopLeavesNothing(t *testing.T) {
	if !settle(func() bool { return len(proxyGoroutines()) == 0 }) {
		t.Fatalf("goroutines of earlier tests never ended:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	plain := startRawMachine(t, answerAll)
	hung := startRawMachine(t, hangUp)
	fds := openFDs(t)
	p := loopEdge(t, plain.addr, Config{})
	var conns []net.Conn
	dial := func() net.Conn {
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		return c
	}
	for range 20 {
		c := dial()
		io.WriteString(c, loopReq)
		if _, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil {
			t.Fatal(err)
		}
	}
	c := dial() // chunked: handed over
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: demo.localhost\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
		t.Fatalf("chunked request: %v %v", resp, err)
	}
	c = dial() // unknown host: net/http's 404
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: nobody.localhost\r\n\r\n")
	if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 404 {
		t.Fatalf("unknown host: %v %v", resp, err)
	}
	dial() // idle
	// A request held by a machine that never answers.
	m := machine("m1", "ams-1", hung.addr)
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
	io.WriteString(dial(), loopReq)
	if !settle(func() bool { return hung.got.Load() == 1 }) {
		t.Fatal("the held request never reached the machine")
	}
	if n := loopHanded(p); n != 2 {
		t.Errorf("%d connections handed over, want 2", n)
	}
	p.Close()
	for _, c := range conns {
		c.Close()
	}
	if !settle(func() bool { return len(proxyGoroutines()) == 0 }) {
		t.Errorf("goroutines left after Close:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	if !settle(func() bool { return openFDs(t) <= fds }) {
		t.Errorf("%d descriptors open after Close, %d before the proxy", openFDs(t), fds)
	}
	if !settle(func() bool { return plain.open.Load() == 0 && hung.open.Load() == 0 }) {
		t.Errorf("machine connections left: %d, %d", plain.open.Load(), hung.open.Load())
	}
}

// TestEventLoopAllocatesNothing: a request served by the loop allocates
// nothing (the process's allocations: client, loop and machine alike).
func TestEventLoopAllocatesNothing(t *testing.T) {
	p := loopEdge(t, fixedMachine(t, []byte("hello\n")), Config{Logger: slog.New(slog.DiscardHandler)})
	requestsAllocateNothing(t, p.EdgeAddr())
	if n := loopHanded(p); n != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", n)
	}
}

// TestEventLoopSimulatedDialer: when the machines' dialer gives
// connections that are not plain sockets (a simulated network's), the
// request that found out goes on in a goroutine, and later connections
// are not adopted at all.
func TestEventLoopSimulatedDialer(t *testing.T) {
	var n connCount
	p := loopEdge(t, fixedMachine(t, []byte("hello\n")), Config{DialMachine: n.dialer()})
	for i := range 3 {
		c, err := net.Dial("tcp", p.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		br := bufio.NewReader(c)
		for j := range 5 {
			io.WriteString(c, loopReq)
			if err := readLeanResponse(br); err != nil {
				t.Fatalf("client %d, request %d: %v", i, j, err)
			}
		}
		c.Close()
	}
	if !p.edge.loops.notRaw.Load() {
		t.Error("the loops did not learn that the dialer gives no plain sockets")
	}
	if n := loopHanded(p); n != 1 {
		t.Errorf("%d connections handed over, want 1 (the first; the others never adopted)", n)
	}
}
