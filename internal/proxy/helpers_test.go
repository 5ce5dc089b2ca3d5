package proxy

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

const testToken = "hosts-shared-secret"

// seen is what a backend received.
type seen struct {
	Machine string      `json:"machine"`
	Method  string      `json:"method"`
	URI     string      `json:"uri"`
	Host    string      `json:"host"`
	Header  http.Header `json:"header"`
	Body    string      `json:"body"`
}

// backend is a machine's HTTP server on loopback: it answers with its name
// and what it received.
type backend struct {
	name string
	addr *net.TCPAddr
	hits atomic.Int64
	srv  *http.Server
}

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, addr: ln.Addr().(*net.TCPAddr)}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.hits.Add(1)
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Backend", name)
		json.NewEncoder(w).Encode(seen{Machine: name, Method: r.Method, URI: r.RequestURI, Host: r.Host, Header: r.Header, Body: string(body)})
	}), ReadHeaderTimeout: 10 * time.Second}
	b.srv = srv
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return b
}

// resetter accepts connections, reads the first bytes of a request and
// resets the connection without answering: a reset before the response
// started, after the request (and some of its body: the client writes
// headers and body together) arrived.
func startResetter(t *testing.T) (*net.TCPAddr, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			go func() {
				buf := make([]byte, 4096)
				c.SetReadDeadline(time.Now().Add(10 * time.Second))
				c.Read(buf)
				if tc, ok := c.(*net.TCPConn); ok {
					tc.SetLinger(0)
				}
				c.Close()
			}()
		}
	}()
	t.Cleanup(func() { ln.Close() })
	return ln.Addr().(*net.TCPAddr), &n
}

// refusingAddr is a loopback port nobody listens on.
func refusingAddr(t *testing.T) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().(*net.TCPAddr)
	ln.Close()
	return a
}

// machine is a started, healthy machine of app "demo" with a service on
// public port 80 at the given internal address.
func machine(id, host string, addr *net.TCPAddr) route.Machine {
	region, _, _ := strings.Cut(host, "-")
	return route.Machine{
		ID: id, InstanceID: "inst-" + id, App: "demo", Region: region, Host: host,
		PrivateIP: addr.IP.String(), Started: true, Healthy: true,
		Services: []route.Service{{InternalPort: addr.Port, Ports: []route.PortRange{{Start: 80, End: 80}}}},
	}
}

var testHosts = []route.Host{
	{ID: "ams-1", Region: "ams", Status: route.HostAlive},
	{ID: "ams-2", Region: "ams", Status: route.HostAlive, RTT: time.Millisecond},
	{ID: "fra-1", Region: "fra", Status: route.HostAlive, RTT: 8 * time.Millisecond},
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t *testing.T }

func (w tlogWriter) Write(b []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// startProxy starts a proxy of host id with loopback listeners where cfg
// has none.
func startProxy(t *testing.T, cfg Config) *Proxy {
	t.Helper()
	if cfg.Region == "" {
		cfg.Region, _, _ = strings.Cut(cfg.HostID, "-")
	}
	if cfg.Token == "" && cfg.Identity == nil {
		cfg.Token = testToken
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	var err error
	if cfg.Edge == nil {
		if cfg.Edge, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	if cfg.Backhaul == nil {
		if cfg.Backhaul, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// get sends a request for host (the Host header) to an edge.
func get(t *testing.T, c *http.Client, edge, host string, hdr map[string]string) (*http.Response, string) {
	t.Helper()
	return do(t, c, http.MethodGet, edge, host, "/", hdr, nil)
}

func do(t *testing.T, c *http.Client, method, edge, host, path string, hdr map[string]string, body io.Reader) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+edge+path, body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s (Host %s): %v", method, path, host, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatalf("read response: %v", err)
	}
	return resp, string(b)
}

func decode(t *testing.T, body string) seen {
	t.Helper()
	var s seen
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		t.Fatalf("not a backend's answer: %v: %s", err, body)
	}
	return s
}

func portOf(a *net.TCPAddr) string { return strconv.Itoa(a.Port) }

func factsOne(b *backend) route.Facts {
	return route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine(b.name, "ams-1", b.addr)}}
}

// testClock is a clock tests move by hand.
type testClock struct {
	mu sync.Mutex
	t  time.Time
}

func newTestClock() *testClock { return &testClock{t: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)} }

func (c *testClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *testClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}
