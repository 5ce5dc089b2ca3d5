package proxy

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/proxy/route"
)

// startHolder is a machine that holds a request to /hold until release
// is closed and answers any other at once, with its name; it counts the
// requests it took.
func startHolder(t *testing.T, name string, release <-chan struct{}) (*net.TCPAddr, *atomic.Int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	took := new(atomic.Int64)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		took.Add(1)
		if r.URL.Path == "/hold" {
			select {
			case <-r.Context().Done():
				return
			case <-release:
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"machine":"` + name + `"}`))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr), took
}

// TestHostDyingUnderRequests: a far host dies — silent: no reset, no
// close. A GET sent afterwards on the edge's pooled connection to it (no
// connect, so no connect timeout) hears no acknowledgement and goes to the
// next candidate; so does a GET the host had taken (its machine working on
// it) when it died, once the host's acknowledgements stop. Both are
// answered long before the minute a machine may take to start its answer,
// which is all the edge would otherwise wait for. Both edge paths: the
// fast path and net/http's.
func TestHostDyingUnderRequests(t *testing.T) {
	for _, path := range []string{"fast", "net/http"} {
		t.Run(path, func(t *testing.T) { hostDyingUnderRequests(t, path == "net/http") })
	}
}

func hostDyingUnderRequests(t *testing.T, netHTTP bool) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	farAddr, farTook := startHolder(t, "far", release)
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return 4 * time.Millisecond }})
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
	near := startBackend(t, "near")
	// Demotions end when the test says: each request meets fra-1 first.
	clock := newTestClock()
	edge := startProxy(t, Config{HostID: "ams-1", Backhaul: bhA, Dial: n.DialerFrom("ams-1"), Now: clock.now, DisableFastPath: netHTTP})
	fp := startProxy(t, Config{HostID: "fra-1", Backhaul: bhF, Dial: n.DialerFrom("fra-1")})
	ms := []route.Machine{machine("far", "fra-1", farAddr), machine("near", "ams-1", near.addr)}
	backhaul := map[string]string{"ams-1": bhA.Addr().String(), "fra-1": bhF.Addr().String()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
	fp.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
	client := &http.Client{Timeout: 30 * time.Second} // the machines' minute would fail the test
	prefer := map[string]string{"Fly-Prefer-Instance-Id": "far"}
	ask := func(path string) (int, string) {
		resp, body := do(t, client, "GET", edge.EdgeAddr(), "demo.localhost", path, prefer, nil)
		if resp.StatusCode != 200 {
			return resp.StatusCode, body
		}
		return 200, decode(t, body).Machine
	}

	// Answered by far: the edge keeps the connection to fra-1.
	if status, m := ask("/"); status != 200 || m != "far" {
		t.Fatalf("before the host dies: %d %s, want 200 from far", status, m)
	}
	n.Kill("fra-1")
	if status, m := ask("/"); status != 200 || m != "near" {
		t.Fatalf("GET on the pooled connection to the dead host: %d %s, want 200 from near", status, m)
	}

	// fra-1 comes back; a GET is taken by its machine, and fra-1 dies.
	n.Revive("fra-1")
	clock.advance(time.Hour)
	// The edge's own probe of fra-1 closes its breaker (probe.go).
	waitHostBreaker(t, edge, "fra-1", stateClosed)
	took := farTook.Load()
	type answer struct {
		status int
		m      string
	}
	answered := make(chan answer, 1)
	go func() {
		req, _ := http.NewRequest("GET", "http://"+edge.EdgeAddr()+"/hold", nil)
		req.Host = "demo.localhost"
		req.Header.Set("Fly-Prefer-Instance-Id", "far")
		resp, err := client.Do(req)
		if err != nil {
			answered <- answer{0, err.Error()}
			return
		}
		defer resp.Body.Close()
		var s seen
		json.NewDecoder(resp.Body).Decode(&s)
		answered <- answer{resp.StatusCode, s.Machine}
	}()
	for farTook.Load() == took {
		time.Sleep(time.Millisecond)
	}
	n.Kill("fra-1")
	if a := <-answered; a.status != 200 || a.m != "near" {
		t.Fatalf("GET in flight on the dying host: %d %s, want 200 from near", a.status, a.m)
	}
	if got := farTook.Load(); got != took+1 {
		t.Errorf("far took %d requests after it came back, want 1", got-took)
	}
}

// TestBackhaulAcknowledgesUntilAnswered: the far proxy acknowledges a
// request at once with 102 and again while its machine works on it; the
// machine answers only once three acknowledgements arrived, and its answer
// follows them.
func TestBackhaulAcknowledgesUntilAnswered(t *testing.T) {
	release := make(chan struct{})
	addr, _ := startHolder(t, "m", release)
	far := startProxy(t, Config{HostID: "fra-1"})
	ms := []route.Machine{machine("m", "fra-1", addr)}
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, nil)

	var acks atomic.Int32
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, _ textproto.MIMEHeader) error {
		if code != http.StatusProcessing {
			t.Errorf("interim answer %d, want 102", code)
		}
		if acks.Add(1) == 3 {
			close(release)
		}
		return nil
	}}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace),
		"GET", "http://"+far.BackhaulAddr()+"/hold", nil)
	req.Host = "demo.localhost"
	req.Header.Set(hdrToken, testToken)
	req.Header.Set(hdrApp, "demo")
	req.Header.Set(hdrMachine, "m")
	req.Header.Set(hdrPort, "80")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("backhaul request: %v (after %d acknowledgements)", err, acks.Load())
	}
	defer resp.Body.Close()
	var s seen
	json.NewDecoder(resp.Body).Decode(&s)
	if resp.StatusCode != 200 || s.Machine != "m" || acks.Load() < 3 {
		t.Fatalf("%d from %q after %d acknowledgements", resp.StatusCode, s.Machine, acks.Load())
	}
}
