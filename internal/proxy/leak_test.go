package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// connCount tracks the connections a proxy accepted or dialled that are
// still open.
type connCount struct {
	what string
	open atomic.Int64
}

type countedNetConn struct {
	net.Conn
	once sync.Once
	n    *connCount
}

func (c *countedNetConn) Close() error {
	c.once.Do(func() { c.n.open.Add(-1) })
	return c.Conn.Close()
}

func (n *connCount) wrap(c net.Conn) net.Conn {
	n.open.Add(1)
	return &countedNetConn{Conn: c, n: n}
}

type countedListener struct {
	net.Listener
	n *connCount
}

func (l countedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return l.n.wrap(c), nil
}

func (n *connCount) listen(t *testing.T) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return countedListener{Listener: ln, n: n}
}

func (n *connCount) dialer() DialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return n.wrap(c), nil
	}
}

// rawMachine is a machine written without net/http, so that every net/http
// goroutine alive in the test is a proxy's. serve handles one connection;
// open counts the connections it holds.
type rawMachine struct {
	addr *net.TCPAddr
	open atomic.Int64
	got  atomic.Int64 // requests read
}

func startRawMachine(t *testing.T, serve func(m *rawMachine, c net.Conn, br *bufio.Reader)) *rawMachine {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &rawMachine{addr: ln.Addr().(*net.TCPAddr)}
	var mu sync.Mutex
	var conns []net.Conn
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			m.open.Add(1)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer m.open.Add(-1)
				defer c.Close()
				serve(m, c, bufio.NewReader(c))
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return m
}

// answerAll answers every request on the connection with 200 "ok".
func answerAll(m *rawMachine, c net.Conn, br *bufio.Reader) {
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		m.got.Add(1)
		io.Copy(io.Discard, req.Body)
		if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"); err != nil {
			return
		}
	}
}

// echoLines switches to a line echo protocol.
func echoLines(m *rawMachine, c net.Conn, br *bufio.Reader) {
	if _, err := http.ReadRequest(br); err != nil {
		return
	}
	m.got.Add(1)
	io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := io.WriteString(c, "echo "+line); err != nil {
			return
		}
	}
}

// hangUp reads a request and never answers, until its connection closes.
func hangUp(m *rawMachine, c net.Conn, br *bufio.Reader) {
	if _, err := http.ReadRequest(br); err != nil {
		return
	}
	m.got.Add(1)
	io.Copy(io.Discard, br)
}

// proxyGoroutines returns the stacks of goroutines that only a proxy
// starts in this test: those running the proxy's code (any of its files but
// the tests), and net/http's servers and transports (the test's machines
// and clients use none).
func proxyGoroutines() []string {
	buf := make([]byte, 8<<20)
	var out []string
	for g := range strings.SplitSeq(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if ownedByProxy(g) {
			out = append(out, g)
		}
	}
	return out
}

func ownedByProxy(stack string) bool {
	for line := range strings.SplitSeq(stack, "\n") {
		line = strings.TrimSpace(line)
		if strings.Contains(line, "/internal/proxy/") && strings.Contains(line, ".go:") && !strings.Contains(line, "_test.go:") {
			return true
		}
		for _, mark := range []string{"net/http.(*conn).serve", "net/http.(*persistConn)", "net/http.(*Transport)"} {
			if strings.HasPrefix(line, mark) {
				return true
			}
		}
	}
	return false
}

// TestCloseLeavesNoGoroutineOrConnection: after plain requests on kept-alive
// connections (to a machine of the edge's host and across the backhaul),
// WebSocket-style connections held open, requests to a machine that never
// answers, and slow clients (headers unfinished, body unfinished), Close on
// both proxies leaves no goroutine of theirs and no connection open — not to
// the clients, not on the backhaul, not to the machines.
func TestCloseLeavesNoGoroutineOrConnection(t *testing.T) {
	if g := settle(func() bool { return len(proxyGoroutines()) == 0 }); !g {
		t.Fatalf("goroutines of earlier tests never ended:\n%s", strings.Join(proxyGoroutines(), "\n\n"))
	}
	plain := startRawMachine(t, answerAll)
	echo := startRawMachine(t, echoLines)
	hung := startRawMachine(t, hangUp)

	counts := map[string]*connCount{}
	count := func(what string) *connCount {
		counts[what] = &connCount{what: what}
		return counts[what]
	}
	far := startProxy(t, Config{HostID: "fra-1", Edge: count("far edge, from clients").listen(t),
		Backhaul: count("far backhaul, from the edge").listen(t), DialMachine: count("far, to machines").dialer()})
	edge := startProxy(t, Config{HostID: "ams-1", Edge: count("edge, from clients").listen(t),
		Backhaul: count("edge backhaul").listen(t), DialMachine: count("edge, to machines").dialer(),
		Dial: count("edge, to the far backhaul").dialer()})
	var ms []route.Machine
	for _, host := range []string{"ams-1", "fra-1"} {
		ms = append(ms,
			ofApp(machine("plain-"+host, host, plain.addr), "plain", ""),
			ofApp(machine("echo-"+host, host, echo.addr), "echo", ""),
			ofApp(machine("hung-"+host, host, hung.addr), "hung", ""))
	}
	backhaul := map[string]string{"ams-1": edge.BackhaulAddr(), "fra-1": far.BackhaulAddr()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)

	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", edge.EdgeAddr())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(time.Minute)) // only a broken proxy waits this long
		return c, bufio.NewReader(c)
	}
	request := func(app, host, extra string) string {
		return fmt.Sprintf("GET / HTTP/1.1\r\nHost: %s.localhost\r\nFly-Force-Instance-Id: %s-%s\r\n%s\r\n", app, app, host, extra)
	}
	var clients []*bufio.Reader

	// Plain requests, the connection kept alive.
	c, br := dial()
	for i := range 6 {
		host := []string{"ams-1", "fra-1"}[i%2]
		io.WriteString(c, request("plain", host, ""))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 || string(b) != "ok" {
			t.Fatalf("plain on %s: %d %s", host, resp.StatusCode, b)
		}
	}
	clients = append(clients, br)

	// Upgraded connections held open.
	for _, host := range []string{"ams-1", "fra-1"} {
		c, br := dial()
		io.WriteString(c, request("echo", host, "Connection: Upgrade\r\nUpgrade: echo\r\n"))
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("upgrade on %s: %v %v", host, resp, err)
		}
		io.WriteString(c, "hi\n")
		if line, err := br.ReadString('\n'); err != nil || line != "echo hi\n" {
			t.Fatalf("echo on %s: %q %v", host, line, err)
		}
		clients = append(clients, br)
	}

	// Requests the machine takes and never answers.
	for _, host := range []string{"ams-1", "fra-1"} {
		c, br := dial()
		io.WriteString(c, request("hung", host, ""))
		clients = append(clients, br)
	}
	if !settle(func() bool { return hung.got.Load() == 2 }) {
		t.Fatalf("the hanging machine got %d requests", hung.got.Load())
	}

	// A client that never finishes its headers, one that never finishes
	// its body.
	c, br = dial()
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: plain.localhost\r\nX-Slow: ")
	clients = append(clients, br)
	c, br = dial()
	io.WriteString(c, "POST / HTTP/1.1\r\nHost: plain.localhost\r\nContent-Length: 100\r\n\r\nonly part")
	clients = append(clients, br)
	if !settle(func() bool { return counts["edge, from clients"].open.Load() == int64(len(clients)) }) {
		t.Fatalf("edge holds %d client connections, want %d", counts["edge, from clients"].open.Load(), len(clients))
	}

	// The check below must see the proxies' goroutines while they run.
	if g := proxyGoroutines(); len(g) < 2*len(clients) {
		t.Fatalf("%d goroutines seen as the proxies' while %d clients are served", len(g), len(clients))
	}
	for _, p := range []*Proxy{edge, far} {
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
	}

	// Every client's connection ends (whatever it is answered first).
	for i, br := range clients {
		if _, err := io.Copy(io.Discard, br); err != nil && !isClosedErr(err) {
			t.Errorf("client %d: %v", i, err)
		}
	}
	ok := settle(func() bool {
		for _, n := range counts {
			if n.open.Load() != 0 {
				return false
			}
		}
		return plain.open.Load() == 0 && echo.open.Load() == 0 && hung.open.Load() == 0 && len(proxyGoroutines()) == 0
	})
	if !ok {
		for _, n := range counts {
			if v := n.open.Load(); v != 0 {
				t.Errorf("%s: %d connections open", n.what, v)
			}
		}
		t.Errorf("machines hold %d plain, %d echo, %d hung connections", plain.open.Load(), echo.open.Load(), hung.open.Load())
		if g := proxyGoroutines(); len(g) > 0 {
			t.Errorf("%d goroutines left:\n%s", len(g), strings.Join(g, "\n\n"))
		}
	}
}

// isClosedErr: the client's read ended because the proxy cut the
// connection (a reset is as good as an end here).
func isClosedErr(err error) bool {
	s := err.Error()
	return strings.Contains(s, "reset") || strings.Contains(s, "closed")
}

// settle polls cond until it holds, for at most settleWait: long enough on
// a loaded machine for goroutines and sockets to end after their last
// cause is gone, and the test fails rather than waits past it.
func settle(cond func() bool) bool {
	deadline := time.Now().Add(settleWait)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

const settleWait = 20 * time.Second
