package proxy

import (
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// countingListener counts the connections it accepted.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// TestBackhaulMultiplexed: many concurrent requests that net/http serves at
// the edge, to a machine on another host, share the pooled backhaul
// connection (HTTP/2 streams), instead of one connection each. (The edge's
// fast path keeps a pool of HTTP/1.1 connections of its own; this edge
// serves with net/http alone.)
func TestBackhaulMultiplexed(t *testing.T) {
	const n = 100
	var arrived atomic.Int64
	release := make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	// The machine holds every request until all n are in: they are in
	// flight at once.
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/warm" {
			return
		}
		if arrived.Add(1) == n {
			close(release)
		}
		select {
		case <-release:
		case <-time.After(30 * time.Second):
		}
		fmt.Fprintf(w, "ok %s", r.URL.Path)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	bl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	counted := &countingListener{Listener: bl}
	edge := startProxy(t, Config{HostID: "ams-1", DisableFastPath: true})
	far := startProxy(t, Config{HostID: "fra-1", Backhaul: counted})
	m := machine("m-fra", "fra-1", ln.Addr().(*net.TCPAddr))
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 2*n, 2*n
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n}, Timeout: time.Minute}
	t.Cleanup(client.CloseIdleConnections)
	// One request first: the edge's pool holds a connection to the far
	// host, with room for 250 streams.
	if resp, body := do(t, http.DefaultClient, "GET", edge.EdgeAddr(), "demo.localhost", "/warm", nil, nil); resp.StatusCode != 200 {
		t.Fatalf("first request: %d %s", resp.StatusCode, body)
	}
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for i := range n {
		wg.Go(func() {
			req, _ := http.NewRequest("GET", fmt.Sprintf("http://%s/%d", edge.EdgeAddr(), i), nil)
			req.Host = "demo.localhost"
			resp, err := client.Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			defer resp.Body.Close()
			var b [64]byte
			k, _ := resp.Body.Read(b[:])
			if resp.StatusCode != 200 || string(b[:k]) != fmt.Sprintf("ok /%d", i) {
				errs <- fmt.Sprintf("request %d: %d %q", i, resp.StatusCode, b[:k])
			}
		})
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if got := arrived.Load(); got != n {
		t.Fatalf("the machine got %d requests, want %d", got, n)
	}
	// n streams fit in the pooled connection: none is dialed.
	if c := counted.n.Load(); c != 1 {
		t.Errorf("%d concurrent requests went over %d backhaul connections, want the one pooled", n, c)
	} else {
		t.Logf("%d concurrent requests over %d backhaul connection(s)", n, c)
	}
}
