//go:build linux

package proxy

import (
	"bufio"
	"net"
	"os"
	"testing"

	"github.com/flamehq/flame/internal/proxy/route"
)

func init() {
	if os.Getenv("FLAME_TEST_EVENT_LOOP") == "1" {
		forceEventLoop = true
	}
}

// loopEdge starts an edge with its event loops in front of the machine at
// addr (soft and hard limits high enough for many clients).
func loopEdge(t *testing.T, addr *net.TCPAddr, cfg Config) *Proxy {
	t.Helper()
	cfg.HostID, cfg.EdgeEventLoop = "ams-1", true
	p := startProxy(t, cfg)
	m := machine("m1", "ams-1", addr)
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 10000, 10000
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
	if p.edge == nil || p.edge.loops == nil {
		t.Fatal("the edge has no event loops")
	}
	return p
}

func leanMachine(t *testing.T) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go leanBackend(ln)
	return ln.Addr().(*net.TCPAddr)
}

func TestEventLoopServesKeepAlive(t *testing.T) {
	p := loopEdge(t, leanMachine(t), Config{})
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := range 200 {
		if _, err := c.Write([]byte("GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")); err != nil {
			t.Fatal(err)
		}
		if err := readLeanResponse(br); err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	if n := p.edge.loops.live(); n != 1 {
		t.Errorf("the loops serve %d connections, want 1", n)
	}
	if _, handed := p.edge.loops.stats(); handed != 0 {
		t.Errorf("%d connections handed to goroutines, want 0", handed)
	}
}
