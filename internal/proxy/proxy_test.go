package proxy

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestEdgeHeaders: the request reaches the machine with Fly's headers, the
// client's internal headers stripped; the response carries the edge's.
func TestEdgeHeaders(t *testing.T) {
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", b.addr)}}, nil)

	resp, body := do(t, http.DefaultClient, "POST", p.EdgeAddr(), "Demo.LOCALHOST:8080", "/a%2Fb/c?x=1&y=%20", map[string]string{
		"X-Forwarded-For": "203.0.113.9",
		"Fly-Client-IP":   "198.51.100.1", // a client's claim is replaced
		"Fly-Region":      "syd",
		hdrMachine:        "other",
		hdrToken:          "guess",
		"Connection":      "keep-alive, X-Hop",
		"X-Hop":           "dropped",
		"X-Custom":        "kept",
	}, strings.NewReader("hello"))
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	s := decode(t, body)
	want := map[string]string{
		"Fly-Client-Ip":      "127.0.0.1",
		"Fly-Region":         "ams",
		"X-Forwarded-For":    "203.0.113.9, 127.0.0.1",
		"X-Forwarded-Proto":  "http",
		"X-Forwarded-Port":   "80",
		"Fly-Forwarded-Port": "80",
		"X-Custom":           "kept",
	}
	for k, v := range want {
		if got := s.Header.Get(k); got != v {
			t.Errorf("machine saw %s %q, want %q", k, got, v)
		}
	}
	for k := range s.Header {
		if strings.HasPrefix(k, internalPref) || k == "X-Hop" {
			t.Errorf("machine saw %s: %q", k, s.Header[k])
		}
	}
	if s.Host != "Demo.LOCALHOST:8080" || s.URI != "/a%2Fb/c?x=1&y=%20" || s.Body != "hello" || s.Method != "POST" {
		t.Errorf("machine saw host %q uri %q body %q method %s", s.Host, s.URI, s.Body, s.Method)
	}
	id := resp.Header.Get("Fly-Request-Id")
	if !regexp.MustCompile(`^[0-9A-HJKMNP-TV-Z]{26}-ams$`).MatchString(id) {
		t.Errorf("Fly-Request-Id %q", id)
	}
	if s.Header.Get("Fly-Request-Id") != id {
		t.Errorf("machine saw request id %q, client %q", s.Header.Get("Fly-Request-Id"), id)
	}
	if resp.Header.Get("Server") != "Flame" || resp.Header.Get("Via") != "1.1 flame" || resp.Header.Get("X-Backend") != "m1" {
		t.Errorf("response headers %v", resp.Header)
	}
}

// TestRetryOnRefusedConnect: the first choice refuses connections; every
// request is answered by the next, none fails.
func TestRetryOnRefusedConnect(t *testing.T) {
	good := startBackend(t, "good")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("dead", "ams-1", refusingAddr(t)), machine("good", "ams-1", good.addr)},
		Load:     map[string]int{"good": 5}, // the dead one looks better
	}, nil)
	for i := range 50 {
		resp, body := do(t, http.DefaultClient, "PUT", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(fmt.Sprint("body ", i)))
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		if s := decode(t, body); s.Machine != "good" || s.Body != fmt.Sprint("body ", i) {
			t.Fatalf("request %d: answered by %s with body %q", i, s.Machine, s.Body)
		}
	}
	if n := good.hits.Load(); n != 50 {
		t.Errorf("good machine got %d requests", n)
	}
	if n := p.InFlight(); len(n) != 0 {
		t.Errorf("requests still counted in flight: %v", n)
	}
}

// TestRetryOnReset: the first choice accepts and drops the connection
// before answering; the buffered body goes whole to the next.
func TestRetryOnReset(t *testing.T) {
	good := startBackend(t, "good")
	rst, resets := startResetter(t)
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("rst", "ams-1", rst), machine("good", "ams-1", good.addr)},
		Load:     map[string]int{"good": 5},
	}, nil)
	payload := strings.Repeat("x", 100<<10)
	for i := range 5 {
		resp, body := do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(payload))
		if resp.StatusCode != 200 {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
		if s := decode(t, body); s.Machine != "good" || s.Body != payload {
			t.Fatalf("request %d: answered by %s with %d bytes", i, s.Machine, len(s.Body))
		}
	}
	if resets.Load() == 0 {
		t.Error("the resetting machine was never tried")
	}
}

// TestStreamedBodyRetriedOnlyUnread: a body over the buffer limit streams;
// after a refused connect (nothing sent) the request still moves on, after a
// reset (part of it sent) it does not.
func TestStreamedBodyRetriedOnlyUnread(t *testing.T) {
	good := startBackend(t, "good")
	rst, _ := startResetter(t)
	p := startProxy(t, Config{HostID: "ams-1", MaxBufferedBody: 1024})
	payload := strings.Repeat("y", 64<<10)

	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("dead", "ams-1", refusingAddr(t)), machine("good", "ams-1", good.addr)},
		Load:     map[string]int{"good": 5},
	}, nil)
	resp, body := do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(payload))
	if resp.StatusCode != 200 || decode(t, body).Body != payload {
		t.Fatalf("after a refused connect: %d %.200s", resp.StatusCode, body)
	}

	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("rst", "ams-1", rst), machine("good", "ams-1", good.addr)},
		Load:     map[string]int{"good": 5},
	}, nil)
	before := good.hits.Load()
	resp, body = do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(payload))
	if resp.StatusCode != http.StatusBadGateway || resp.Header.Get("Flame-Error") != codeAllFailed {
		t.Fatalf("after a reset mid-body: %d %s", resp.StatusCode, body)
	}
	if good.hits.Load() != before {
		t.Error("a partly sent streamed body was sent again")
	}
}

// TestUnknownHost: a host that names no app is a 404 naming it.
func TestUnknownHost(t *testing.T) {
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", b.addr)}}, nil)
	for _, host := range []string{"nope.localhost", "example.com", "a.demo.localhost", "localhost", "demo.localhost.evil"} {
		resp, body := get(t, http.DefaultClient, p.EdgeAddr(), host, nil)
		if resp.StatusCode != 404 || resp.Header.Get("Flame-Error") != codeUnknownHost || !strings.Contains(body, fmt.Sprintf("%q", host)) {
			t.Errorf("%s: %d %s", host, resp.StatusCode, body)
		}
		if resp.Header.Get("Fly-Request-Id") == "" || resp.Header.Get("Server") != "Flame" {
			t.Errorf("%s: error without the edge's headers: %v", host, resp.Header)
		}
	}
	if b.hits.Load() != 0 {
		t.Error("a request for another host reached the machine")
	}
}

// TestNoMachineAnswersAtOnce: an app whose machines cannot take requests is
// answered 503 with the reason, and one whose candidates all fail 502 with
// what was tried — never a hang.
func TestNoMachineAnswersAtOnce(t *testing.T) {
	p := startProxy(t, Config{HostID: "ams-1"})
	stopped := machine("m1", "ams-1", refusingAddr(t))
	stopped.Started = false
	sick := machine("m2", "ams-2", refusingAddr(t))
	sick.Healthy = false
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{stopped, sick}}, nil)
	c := &http.Client{Timeout: 30 * time.Second}
	resp, body := get(t, c, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 503 || resp.Header.Get("Flame-Error") != codeNoCandidate ||
		!strings.Contains(body, "1 not started, 1 failing checks") {
		t.Errorf("503: %d %s", resp.StatusCode, body)
	}
	resp, body = get(t, c, p.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Force-Region": "syd"})
	if resp.StatusCode != 503 || !strings.Contains(body, "fly-force-region") {
		t.Errorf("forced region: %d %s", resp.StatusCode, body)
	}

	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("d1", "ams-1", refusingAddr(t)), machine("d2", "ams-1", refusingAddr(t))}}, nil)
	resp, body = get(t, c, p.EdgeAddr(), "demo.localhost", nil)
	if resp.StatusCode != 502 || resp.Header.Get("Flame-Error") != codeAllFailed ||
		!strings.Contains(body, "d1 in ams") || !strings.Contains(body, "d2 in ams") {
		t.Errorf("502: %d %s", resp.StatusCode, body)
	}
}

// TestRoutingHeadersReachTheirMachine: the routing headers pick machines
// end to end.
func TestRoutingHeadersReachTheirMachine(t *testing.T) {
	a, b2 := startBackend(t, "a"), startBackend(t, "b")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("a", "ams-1", a.addr), machine("b", "ams-1", b2.addr)}, Load: map[string]int{"b": 3}}, nil)
	for _, tc := range []struct {
		hdr  map[string]string
		want string
	}{
		{nil, "a"},
		{map[string]string{"Fly-Prefer-Instance-Id": "b"}, "b"},
		{map[string]string{"fly-force-instance-id": "inst-b"}, "b"},
		{map[string]string{"Fly-Force-Region": "ams"}, "a"},
	} {
		resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", tc.hdr)
		if resp.StatusCode != 200 || decode(t, body).Machine != tc.want {
			t.Errorf("%v: %d %s", tc.hdr, resp.StatusCode, body)
		}
	}
}

// TestHeaderLimitAndSlowClients: oversized headers are refused with 431; a
// client that never finishes its headers is cut off.
func TestHeaderLimitAndSlowClients(t *testing.T) {
	p := startProxy(t, Config{HostID: "ams-1", MaxHeaderBytes: 4096, ReadHeaderTimeout: 300 * time.Millisecond})
	resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", map[string]string{"X-Big": strings.Repeat("b", 16<<10)})
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("big headers: %d %s", resp.StatusCode, body)
	}

	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\nX-Slow: ")
	// The server closes the connection once the header timeout passes;
	// the bound here only keeps a broken server from hanging the test.
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	_, err = bufio.NewReader(c).ReadString('\n')
	if err == nil || time.Since(start) < 300*time.Millisecond {
		t.Errorf("slow client: read %v after %v", err, time.Since(start))
	}
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		t.Errorf("the slow client was never cut off")
	}
}

// TestCrossHostDelivery: an edge in ams sends the request over the
// simulated backhaul to the proxy of the machine's host in fra, which
// delivers it; the hop costs the link's latency.
func TestCrossHostDelivery(t *testing.T) {
	const oneWay = 20 * time.Millisecond
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return oneWay }})
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
	m := startBackend(t, "m-fra")
	edge := startProxy(t, Config{HostID: "ams-1", Backhaul: bhA, Dial: n.DialerFrom("ams-1")})
	far := startProxy(t, Config{HostID: "fra-1", Backhaul: bhF, Dial: n.DialerFrom("fra-1")})
	backhaul := map[string]string{"ams-1": bhA.Addr().String(), "fra-1": bhF.Addr().String()}
	facts := func(self, region string) route.Facts {
		return route.Facts{Self: self, Region: region, Hosts: testHosts, Machines: []route.Machine{machine("m-fra", "fra-1", m.addr)}}
	}
	edge.setState(facts("ams-1", "ams"), backhaul)
	far.setState(facts("fra-1", "fra"), backhaul)

	start := time.Now()
	resp, body := do(t, http.DefaultClient, "POST", edge.EdgeAddr(), "demo.localhost", "/x?y=1", map[string]string{"X-Custom": "v"}, strings.NewReader("payload"))
	took := time.Since(start)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d: %s", resp.StatusCode, body)
	}
	s := decode(t, body)
	if s.Machine != "m-fra" || s.Body != "payload" || s.URI != "/x?y=1" || s.Host != "demo.localhost" {
		t.Errorf("machine saw %+v", s)
	}
	if s.Header.Get("Fly-Region") != "ams" || s.Header.Get("X-Custom") != "v" || s.Header.Get("Fly-Client-Ip") != "127.0.0.1" {
		t.Errorf("headers across the backhaul: %v", s.Header)
	}
	for k := range s.Header {
		if strings.HasPrefix(k, internalPref) {
			t.Errorf("the machine saw the internal header %s", k)
		}
	}
	if !strings.HasSuffix(resp.Header.Get("Fly-Request-Id"), "-ams") || resp.Header.Get("Via") != "1.1 flame" {
		t.Errorf("response headers %v", resp.Header)
	}
	// A new connection's handshake and the request each cross the link
	// both ways: at least two round trips.
	if took < 4*oneWay {
		t.Errorf("the hop took %v, less than two round trips of %v", took, 2*oneWay)
	}
	if far.InFlight()["m-fra"] != 0 || edge.InFlight()["m-fra"] != 0 {
		t.Errorf("in flight after the answer: edge %v far %v", edge.InFlight(), far.InFlight())
	}
}

// TestBackhaulTrustsOnlyHosts: the backhaul names machines only for a hop
// with the hosts' token, and only machines that run on its host.
func TestBackhaulTrustsOnlyHosts(t *testing.T) {
	m := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "fra-1"})
	other := machine("m2", "ams-1", m.addr) // on another host, reachable from here
	stopped := machine("m3", "fra-1", m.addr)
	stopped.Started = false
	p.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: []route.Machine{machine("m1", "fra-1", m.addr), other, stopped}}, nil)
	hop := func(token, machine string) (*http.Response, string) {
		return get(t, http.DefaultClient, p.BackhaulAddr(), "demo.localhost", map[string]string{
			hdrToken: token, hdrApp: "demo", hdrMachine: machine, hdrPort: "80",
		})
	}
	for _, tok := range []string{"", "wrong", testToken + "x"} {
		if resp, body := hop(tok, "m1"); resp.StatusCode != 403 {
			t.Errorf("token %q: %d %s", tok, resp.StatusCode, body)
		}
	}
	for _, id := range []string{"m2", "m3", "nope"} {
		resp, body := hop(testToken, id)
		if resp.StatusCode != 503 || resp.Header.Get(hdrRetry) == "" || resp.Header.Get("Flame-Error") != codeNotHere {
			t.Errorf("machine %s: %d %v %s", id, resp.StatusCode, resp.Header, body)
		}
	}
	if m.hits.Load() != 0 {
		t.Fatal("an untrusted or misdirected hop reached a machine")
	}
	resp, body := hop(testToken, "m1")
	if resp.StatusCode != 200 || decode(t, body).Machine != "m1" {
		t.Errorf("trusted hop: %d %s", resp.StatusCode, body)
	}
	// The public edge of the same proxy ignores a client's internal headers.
	resp, body = get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", map[string]string{
		hdrToken: testToken, hdrApp: "demo", hdrMachine: "m2", hdrPort: "80",
	})
	if resp.StatusCode != 200 || decode(t, body).Machine != "m1" {
		t.Errorf("edge with internal headers: %d %s", resp.StatusCode, body)
	}
}

// TestStaleStartedMachineOnFarHost: the edge still believes a machine on
// another host is started; that host knows it stopped and says so, and the
// edge moves on to the next candidate at once: no request fails.
func TestStaleStartedMachineOnFarHost(t *testing.T) {
	m := startBackend(t, "m-fra")
	local := startBackend(t, "m-ams")
	edge := startProxy(t, Config{HostID: "ams-1"})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"ams-1": edge.BackhaulAddr(), "fra-1": far.BackhaulAddr()}
	gone := machine("m-fra", "fra-1", m.addr)
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{gone, machine("m-ams", "ams-1", local.addr)}}, backhaul)
	gone.Started = false
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: []route.Machine{gone}}, backhaul)

	for i := range 10 {
		// The preference puts the stale machine first.
		resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": "m-fra"})
		if resp.StatusCode != 200 || decode(t, body).Machine != "m-ams" {
			t.Fatalf("request %d: %d %s", i, resp.StatusCode, body)
		}
	}
	if m.hits.Load() != 0 {
		t.Error("a stopped machine's host delivered to it")
	}
}

// TestSilentHostCostsRoundTrips: a host that went silent (cut off: its
// connects neither succeed nor fail) costs a request a few round trips to
// it, not the whole connect timeout, before the next candidate answers.
func TestSilentHostCostsRoundTrips(t *testing.T) {
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return 4 * time.Millisecond }})
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
	far := startBackend(t, "m-fra")
	local := startBackend(t, "m-ams")
	const connectTimeout = time.Minute
	edge := startProxy(t, Config{HostID: "ams-1", Dial: n.DialerFrom("ams-1"), ConnectTimeout: connectTimeout})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, // fra-1 measured at 8 ms
		Machines: []route.Machine{machine("m-fra", "fra-1", far.addr), machine("m-ams", "ams-1", local.addr)}},
		map[string]string{"fra-1": bhF.Addr().String()})
	n.Kill("fra-1")

	start := time.Now()
	resp, body := get(t, &http.Client{Timeout: 2 * connectTimeout}, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": "m-fra"})
	took := time.Since(start)
	if resp.StatusCode != 200 || decode(t, body).Machine != "m-ams" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	// The budget is 250 ms + 3 × 8 ms; the connect timeout, a minute.
	if took >= connectTimeout/2 {
		t.Errorf("the silent host held the request %v", took)
	}
	if far.hits.Load() != 0 {
		t.Error("the cut-off host's machine was reached")
	}
}

// TestNoFailureWhileAMachineStops: requests keep coming from several
// clients while the preferred machine stops gracefully (it refuses new
// connections and closes idle ones) and the edge still lists it: not one
// request fails, and the other machine takes them all.
func TestNoFailureWhileAMachineStops(t *testing.T) {
	a, b := startBackend(t, "a"), startBackend(t, "b")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("a", "ams-1", a.addr), machine("b", "ams-1", b.addr)},
		Load:     map[string]int{"b": 10}}, nil) // a first
	const clients, each = 4, 60
	var sent atomic.Int64
	stopped := make(chan struct{})
	errs := make(chan string, clients*each)
	var wg sync.WaitGroup
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 30 * time.Second}
			for i := range each {
				if sent.Add(1) == clients*each/3 {
					go func() {
						defer close(stopped)
						a.srv.Shutdown(context.Background())
					}()
				}
				req, _ := http.NewRequest("POST", "http://"+p.EdgeAddr()+"/", strings.NewReader(fmt.Sprint("n", i)))
				req.Host = "demo.localhost"
				resp, err := c.Do(req)
				if err != nil {
					errs <- err.Error()
					continue
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || decode(t, string(body)).Body != fmt.Sprint("n", i) {
					errs <- fmt.Sprintf("%d %s", resp.StatusCode, body)
				}
			}
		}()
	}
	wg.Wait()
	<-stopped
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if a.hits.Load() == 0 || b.hits.Load() == 0 || a.hits.Load()+b.hits.Load() != clients*each {
		t.Errorf("a answered %d, b %d of %d", a.hits.Load(), b.hits.Load(), clients*each)
	}
	// After the stop every request goes to b.
	before := b.hits.Load()
	for range 5 {
		if resp, body := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil); resp.StatusCode != 200 || decode(t, body).Machine != "b" {
			t.Fatalf("after the stop: %d %s", resp.StatusCode, body)
		}
	}
	if b.hits.Load() != before+5 {
		t.Errorf("b answered %d of 5", b.hits.Load()-before)
	}
}

// TestMachineCannotForgeInternalHeaders: a machine answering with the
// proxies' own headers neither makes the edge retry elsewhere nor shows
// them to the client.
func TestMachineCannotForgeInternalHeaders(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	forger := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set(hdrRetry, "please")
		w.Header().Set(hdrToken, "leak")
		io.WriteString(w, "forger")
	})}
	go forger.Serve(ln)
	t.Cleanup(func() { forger.Close() })
	honest := startBackend(t, "honest")
	edge := startProxy(t, Config{HostID: "ams-1"})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	facts := route.Facts{Hosts: testHosts, Machines: []route.Machine{
		machine("forger", "fra-1", ln.Addr().(*net.TCPAddr)), machine("honest", "ams-1", honest.addr)}}
	facts.Self, facts.Region = "ams-1", "ams"
	edge.setState(facts, backhaul)
	facts.Self, facts.Region = "fra-1", "fra"
	far.setState(facts, backhaul)
	resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Force-Instance-Id": "forger"})
	if resp.StatusCode != 200 || body != "forger" {
		t.Fatalf("%d %s", resp.StatusCode, body)
	}
	for k := range resp.Header {
		if strings.HasPrefix(k, internalPref) {
			t.Errorf("the client saw %s", k)
		}
	}
	if honest.hits.Load() != 0 {
		t.Error("a forged retry moved the request")
	}
}

// TestChunkedAndEmptyBodies: a body of unknown length is buffered and sent
// with its length; an empty one arrives empty.
func TestChunkedAndEmptyBodies(t *testing.T) {
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(factsOne(b), nil)
	for _, payload := range []string{"", "chunked body"} {
		pr, pw := io.Pipe()
		go func() {
			io.WriteString(pw, payload)
			pw.Close()
		}()
		resp, body := do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, pr)
		s := decode(t, body)
		if resp.StatusCode != 200 || s.Body != payload {
			t.Errorf("%q: %d, machine got %q", payload, resp.StatusCode, s.Body)
		}
		if te := s.Header.Get("Transfer-Encoding"); te != "" {
			t.Errorf("%q: sent on with Transfer-Encoding %q", payload, te)
		}
	}
}

// TestHangingMachine: a machine that takes a request and never answers is
// given up after the response header timeout; an idempotent request then
// goes to the next candidate, any other is answered 504 and sent nowhere
// else — on this host and across the backhaul alike.
func TestHangingMachine(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	hang := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-release:
		}
	})}
	go hang.Serve(ln)
	t.Cleanup(func() {
		close(release)
		hang.Close()
	})
	hangAddr := ln.Addr().(*net.TCPAddr)
	good := startBackend(t, "good")
	const timeout = 200 * time.Millisecond
	// A machine that timed out counts toward its breaker; the clock moves
	// on between requests, so that each meets the hanging machine first
	// whatever the breaker's weights.
	clock := newTestClock()
	edge := startProxy(t, Config{HostID: "ams-1", ResponseHeaderTimeout: timeout, Now: clock.now})
	far := startProxy(t, Config{HostID: "fra-1", ResponseHeaderTimeout: timeout, Now: clock.now})
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	client := &http.Client{Timeout: 30 * time.Second} // a proxy that never gives up fails the test
	for _, hangHost := range []string{"ams-1", "fra-1"} {
		clock.advance(time.Hour)
		ms := []route.Machine{machine("hang", hangHost, hangAddr), machine("good", "ams-1", good.addr)}
		edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
		far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)

		prefer := map[string]string{"Fly-Prefer-Instance-Id": "hang"}
		before := good.hits.Load()
		start := time.Now()
		resp, body := do(t, client, "GET", edge.EdgeAddr(), "demo.localhost", "/", prefer, nil)
		if resp.StatusCode != 200 || decode(t, body).Machine != "good" {
			t.Errorf("hanging on %s, GET: %d %s", hangHost, resp.StatusCode, body)
		}
		if took := time.Since(start); took < timeout {
			t.Errorf("hanging on %s, GET moved on after %v, before the timeout", hangHost, took)
		}
		clock.advance(time.Hour)
		resp, body = do(t, client, "POST", edge.EdgeAddr(), "demo.localhost", "/", prefer, strings.NewReader("once"))
		if resp.StatusCode != http.StatusGatewayTimeout || resp.Header.Get("Flame-Error") != codeTimeout {
			t.Errorf("hanging on %s, POST: %d %s", hangHost, resp.StatusCode, body)
		}
		for k := range resp.Header {
			if strings.HasPrefix(k, internalPref) {
				t.Errorf("the client saw %s", k)
			}
		}
		if n := good.hits.Load() - before; n != 1 {
			t.Errorf("hanging on %s: the other machine got %d requests, want the GET only", hangHost, n)
		}
	}
}

// startEchoUpgrader is a machine that switches requests with "Upgrade:
// echo" to a line echo protocol, as a WebSocket server switches.
func startEchoUpgrader(t *testing.T) *net.TCPAddr {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		fmt.Fprintf(brw, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\nX-Region-Seen: %s\r\n\r\n", r.Header.Get("Fly-Region"))
		brw.Flush()
		for {
			line, err := brw.ReadString('\n')
			if err != nil {
				return
			}
			brw.WriteString("echo " + line)
			brw.Flush()
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().(*net.TCPAddr)
}

// upgradeAt opens a connection to an edge, asks for the echo protocol and
// returns the connection once switched.
func upgradeAt(t *testing.T, edge string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", edge)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(c, "GET /chat HTTP/1.1\r\nHost: demo.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols || resp.Header.Get("Upgrade") != "echo" ||
		!strings.HasSuffix(resp.Header.Get("Fly-Request-Id"), "-ams") || resp.Header.Get("X-Region-Seen") != "ams" {
		t.Fatalf("upgrade answer: %d %v", resp.StatusCode, resp.Header)
	}
	for k := range resp.Header {
		if strings.HasPrefix(k, internalPref) {
			t.Errorf("the client saw %s", k)
		}
	}
	// A line the client sent right behind its request is not lost.
	if line, err := br.ReadString('\n'); err != nil || line != "echo early\n" {
		t.Fatalf("first echo: %q %v", line, err)
	}
	return c, br
}

// TestUpgradePassesThrough: a WebSocket-style upgrade reaches the machine,
// on this host and across the backhaul, and the switched connection carries
// bytes both ways; it counts in flight until it closes, and Close ends it.
func TestUpgradePassesThrough(t *testing.T) {
	addr := startEchoUpgrader(t)
	edge := startProxy(t, Config{HostID: "ams-1"})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	for _, on := range []string{"ams-1", "fra-1"} {
		ms := []route.Machine{machine("ws", on, addr)}
		edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
		far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
		c, br := upgradeAt(t, edge.EdgeAddr())
		for i := range 3 {
			fmt.Fprintf(c, "line %d\n", i)
			if line, err := br.ReadString('\n'); err != nil || line != fmt.Sprintf("echo line %d\n", i) {
				t.Fatalf("on %s: echo %d: %q %v", on, i, line, err)
			}
		}
		if n := edge.InFlight()["ws"]; n != 1 {
			t.Errorf("on %s: %d in flight at the edge, want the open connection", on, n)
		}
		c.Close()
		deadline := time.Now().Add(10 * time.Second)
		for edge.InFlight()["ws"] != 0 || far.InFlight()["ws"] != 0 {
			if time.Now().After(deadline) {
				t.Fatalf("on %s: still in flight after the close: edge %v far %v", on, edge.InFlight(), far.InFlight())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	// An upgraded connection still open when the proxy closes is cut.
	c, br := upgradeAt(t, edge.EdgeAddr())
	closed := make(chan error, 1)
	go func() { closed <- edge.Close() }()
	select {
	case <-closed:
	case <-time.After(20 * time.Second):
		t.Fatal("Close waited on an upgraded connection")
	}
	if _, err := br.ReadString('\n'); err == nil {
		t.Error("the upgraded connection outlived the proxy")
	}
	c.Close()
}

// TestForceHTTPS: a port with force_https answers plain HTTP with a
// permanent redirect to the same URL over HTTPS, without reaching a machine.
func TestForceHTTPS(t *testing.T) {
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1"})
	m := machine("m1", "ams-1", b.addr)
	m.Services[0].Ports[0].ForceHTTPS = true
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
	c := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, body := do(t, c, "GET", p.EdgeAddr(), "demo.localhost:8080", "/a/b?c=d", nil, nil)
	if resp.StatusCode != http.StatusMovedPermanently || resp.Header.Get("Location") != "https://demo.localhost/a/b?c=d" {
		t.Errorf("%d %v %s", resp.StatusCode, resp.Header, body)
	}
	if b.hits.Load() != 0 {
		t.Error("the machine was reached")
	}
}

// TestFailedCandidatesDemoted: after a silent host cost one request its
// connect budget, the next requests do not try it again; when the
// demotion ends the edge's own probe does, not a request (and, failing
// again, demotes it for longer). A machine that refuses connections is
// demoted too, and probed by a request.
func TestFailedCandidatesDemoted(t *testing.T) {
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
	var dials atomic.Int64
	dial := n.DialerFrom("ams-1")
	countingDial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return dial(ctx, network, addr)
	}
	local := startBackend(t, "m-ams")
	clock := newTestClock()
	edge := startProxy(t, Config{HostID: "ams-1", Dial: countingDial, Now: clock.now, MinConnectTimeout: 50 * time.Millisecond})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("m-fra", "fra-1", local.addr), machine("m-ams", "ams-1", local.addr)}},
		map[string]string{"fra-1": bhF.Addr().String()})
	n.Kill("fra-1")
	prefer := map[string]string{"Fly-Prefer-Instance-Id": "m-fra"}
	ask := func() {
		t.Helper()
		if resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", prefer); resp.StatusCode != 200 || decode(t, body).Machine != "m-ams" {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	}
	ask()
	if dials.Load() != 1 {
		t.Fatalf("%d dials to the silent host, want 1", dials.Load())
	}
	for range 5 {
		ask()
	}
	if dials.Load() != 1 {
		t.Errorf("the demoted host was dialled %d more times", dials.Load()-1)
	}
	clock.advance(breakerBase)
	deadline := time.Now().Add(30 * time.Second)
	for hostTrips(edge, "fra-1") < 2 { // the edge's probe failed (probe.go)
		if time.Now().After(deadline) {
			t.Fatal("no probe of the silent host after the demotion")
		}
		ask()
		time.Sleep(5 * time.Millisecond)
	}
	if dials.Load() != 2 {
		t.Errorf("after the demotion %d dials, want the one probe", dials.Load())
	}
	clock.advance(breakerBase) // the failed probe demotes for twice as long
	ask()
	if _, st := edge.strikes.states("", "fra-1"); st != stateOpen || dials.Load() != 2 {
		t.Errorf("a second failure demoted for no longer than the first: %v, %d dials", st, dials.Load())
	}

	// A machine refusing connections on this host.
	refused := refusingAddr(t)
	p := startProxy(t, Config{HostID: "ams-1", Now: clock.now})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{machine("dead", "ams-1", refused), machine("good", "ams-1", local.addr)},
		Load:     map[string]int{"good": 5}}, nil)
	if resp, _ := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	if !p.strikes.demoted("dead", "ams-1") || p.strikes.demoted("good", "ams-1") {
		t.Error("a refused connect did not demote only its machine")
	}
	if got := p.Table().Select("demo", route.Query{Port: 80}, routeInput{p}, nil); len(got) != 0 {
		t.Fatal("no room, yet candidates")
	}
	var buf [route.MaxCandidates]*route.Target
	if got := p.Table().Select("demo", route.Query{Port: 80}, routeInput{p}, buf[:0]); len(got) != 2 || got[0].MachineID != "good" {
		t.Errorf("order with dead demoted: %v", got)
	}
}

// TestBufferedBodiesBounded: while the bodies in flight hold the whole
// buffer budget, another body streams instead (and so is not retried after
// a machine read part of it); once they are done, bodies buffer again.
func TestBufferedBodiesBounded(t *testing.T) {
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	slow := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.ReadAll(r.Body)
		arrived <- struct{}{}
		<-release
	})}
	go slow.Serve(ln)
	t.Cleanup(func() { slow.Close() })
	good := startBackend(t, "good")
	rst, _ := startResetter(t)
	clock := newTestClock()
	p := startProxy(t, Config{HostID: "ams-1", MaxBufferedBody: 1000, MaxBufferedTotal: 100, Now: clock.now})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{
		machine("slow", "ams-1", ln.Addr().(*net.TCPAddr)), machine("rst", "ams-1", rst), machine("good", "ams-1", good.addr),
	}, Load: map[string]int{"slow": 10, "good": 5}}, nil) // rst first, then good
	payload := strings.Repeat("p", 80)

	first := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest("POST", "http://"+p.EdgeAddr()+"/", strings.NewReader(payload))
		req.Host = "demo.localhost"
		req.Header.Set("Fly-Force-Instance-Id", "slow")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			first <- 0
			return
		}
		resp.Body.Close()
		first <- resp.StatusCode
	}()
	<-arrived // 80 of the 100 bytes are held
	resp, body := do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(payload))
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("over the budget: %d %s, want the streamed body not retried", resp.StatusCode, body)
	}
	close(release)
	if code := <-first; code != 200 {
		t.Fatalf("the held request: %d", code)
	}
	clock.advance(time.Hour) // were rst's breaker open, it is half-open now: tried first again
	before := good.hits.Load()
	resp, body = do(t, http.DefaultClient, "POST", p.EdgeAddr(), "demo.localhost", "/", nil, strings.NewReader(payload))
	if resp.StatusCode != 200 || decode(t, body).Body != payload || good.hits.Load() != before+1 {
		t.Errorf("within the budget again: %d %s", resp.StatusCode, body)
	}
	if left := p.buffered.left.Load(); left != 100 {
		t.Errorf("budget left after every request: %d of 100", left)
	}
}

// TestSlowBodySender: a client that sends part of a body and stalls is
// answered 408 once the body read timeout passes, and holds no buffer.
func TestSlowBodySender(t *testing.T) {
	b := startBackend(t, "m1")
	const timeout = 300 * time.Millisecond
	p := startProxy(t, Config{HostID: "ams-1", BodyReadTimeout: timeout})
	p.setState(factsOne(b), nil)
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "POST / HTTP/1.1\r\nHost: demo.localhost\r\nContent-Length: 100\r\n\r\nonly part")
	c.SetReadDeadline(time.Now().Add(30 * time.Second)) // only a broken proxy waits this long
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestTimeout || time.Since(start) < timeout {
		t.Errorf("%d after %v", resp.StatusCode, time.Since(start))
	}
	if b.hits.Load() != 0 {
		t.Error("a partial body was delivered")
	}
	if left := p.buffered.left.Load(); left != DefaultMaxBufferedTotal {
		t.Errorf("budget left: %d", left)
	}
}
