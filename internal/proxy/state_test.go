package proxy

import (
	"context"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/check"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/netsim"
)

func TestAppOf(t *testing.T) {
	for _, tc := range []struct {
		host, domain, app string
		ok                bool
	}{
		{"demo.localhost", "localhost", "demo", true},
		{"demo.localhost:4300", "localhost", "demo", true},
		{"DEMO.LocalHost.", "localhost", "demo", true},
		{"my-app.flame.example", "flame.example", "my-app", true},
		{"a.b.localhost", "localhost", "", false},
		{"localhost", "localhost", "", false},
		{".localhost", "localhost", "", false},
		{"-x.localhost", "localhost", "", false},
		{"demo.localhost.evil", "localhost", "", false},
		{"demolocalhost", "localhost", "", false},
		{"de_mo.localhost", "localhost", "", false},
		{"[::1]:80", "localhost", "", false},
		{"", "localhost", "", false},
		{strings.Repeat("a", 64) + ".localhost", "localhost", "", false},
	} {
		app, ok := appOf(tc.host, tc.domain)
		if app != tc.app || ok != tc.ok {
			t.Errorf("appOf(%q, %q) = %q %v, want %q %v", tc.host, tc.domain, app, ok, tc.app, tc.ok)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	ln := startProxy(t, Config{HostID: "ams-1"}).cfg.Edge
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Region: "ams", Token: "t", Edge: ln}, "host id"},
		{Config{HostID: "h", Token: "t", Edge: ln}, "region"},
		{Config{HostID: "h", Region: "ams", Edge: ln}, "token"},
		{Config{HostID: "h", Region: "ams", Token: "t"}, "listener"},
		{Config{HostID: "h", Region: "ams", Token: "t", Edge: ln, Domain: "bad_domain"}, "DNS name"},
		{Config{HostID: "h", Region: "ams", Token: "t", Edge: ln, Port: 70000}, "port"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want an error about %s", tc.cfg, err, tc.want)
		}
	}
}

// TestServiceCheckNames: the checks that gate routing are the ones the
// check package names for services[].checks, and only those.
func TestServiceCheckNames(t *testing.T) {
	port := 8080
	path := "/health"
	specs, err := check.Specs(&api.MachineConfig{
		Services: []api.MachineService{{InternalPort: 8080, Checks: []api.MachineServiceCheck{{Port: &port}, {Path: &path}}}},
		Checks:   map[string]api.MachineCheck{"top": {Port: &port}},
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range specs {
		if got := strings.HasPrefix(s.Name, check.ServicePrefix); got != s.Service {
			t.Errorf("check %q: service %v, prefixed %v", s.Name, s.Service, got)
		}
	}
}

// TestFollowsTheCluster: the proxy routes by its cluster's facts — a
// machine published by the host becomes reachable, one whose service check
// turns critical is not, and a stopped one is not — with the table rebuilt
// on every change.
func TestFollowsTheCluster(t *testing.T) {
	n := netsim.New(netsim.Config{})
	t.Cleanup(func() { n.Close() })
	if _, err := n.AddHost("ams-1"); err != nil {
		t.Fatal(err)
	}
	tr, err := n.Transport("ams-1", 7946)
	if err != nil {
		t.Fatal(err)
	}
	b := startBackend(t, "m1")
	c, err := cluster.New(cluster.Config{HostID: "ams-1", Region: "ams", Transport: tr, Capacity: cluster.Resources{CPUs: 1, MemoryMB: 256},
		Addrs: map[string]string{"proxy": "unused"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	p := startProxy(t, Config{HostID: "ams-1", Source: c})

	publish := func(state, checkStatus string) {
		t.Helper()
		m := cluster.Machine{ID: "m1", App: "demo", Org: "acme", Region: "ams", State: state, PrivateIP: "127.0.0.1",
			Services: []cluster.Service{{Protocol: "tcp", InternalPort: b.addr.Port, Ports: []cluster.Port{{Port: 80, Handlers: []string{"http"}}}}},
			Checks: []cluster.CheckStatus{
				{Name: "servicecheck-00-tcp-" + portOf(b.addr), Status: checkStatus},
				{Name: "top", Status: cluster.CheckCritical}, // reports only
			}}
		if err := c.Publish(cluster.HostFacts{Machines: []cluster.Machine{m}}); err != nil {
			t.Fatal(err)
		}
	}
	status := func() int {
		resp, _ := get(t, http.DefaultClient, p.EdgeAddr(), "demo.localhost", nil)
		return resp.StatusCode
	}
	// Publishing rebuilds the table on the subscription: wait for it.
	waitFor := func(what string, want int) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for status() != want {
			if time.Now().After(deadline) {
				t.Fatalf("%s: still %d, want %d", what, status(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if got := status(); got != 404 {
		t.Fatalf("before any machine: %d", got)
	}
	publish("started", cluster.CheckPassing)
	waitFor("published", 200)
	if !p.Table().SameOrg("demo", "demo") {
		t.Error("the machine's org did not reach the route table")
	}
	publish("started", cluster.CheckCritical)
	waitFor("service check critical", 503)
	publish("started", cluster.CheckPassing)
	waitFor("passing again", 200)
	publish("stopped", cluster.CheckPassing)
	waitFor("stopped", 503)
}

// TestCloseLeavesNothing: after Close no goroutine of the proxy's is left,
// even with keep-alive connections open to it and from it.
func TestCloseLeavesNothing(t *testing.T) {
	before := runtime.NumGoroutine()
	b := startBackend(t, "m1")
	p := startProxy(t, Config{HostID: "ams-1"})
	p.setState(factsOne(b), nil)
	client := &http.Client{Transport: &http.Transport{}}
	for range 3 {
		if resp, body := get(t, client, p.EdgeAddr(), "demo.localhost", nil); resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	client.CloseIdleConnections()
	// The backend's own goroutines (its server and connections) stay until
	// its cleanup: count only beyond them.
	deadline := time.Now().Add(10 * time.Second)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		if !strings.Contains(stacks, "internal/proxy.(*Proxy)") && !strings.Contains(stacks, "net/http.(*persistConn)") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines left after Close (%d before):\n%s", before, stacks)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// FuzzAppOf: whatever the Host header, a name comes back only as one valid
// label, and only for a host under the domain.
func FuzzAppOf(f *testing.F) {
	for _, s := range []string{"demo.localhost", "demo.localhost:80", "DEMO.localhost.", "a.b.localhost", "[::1]:80", "\x00.localhost", "demo.localhost:", ":80"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		app, ok := appOf(host, "localhost")
		if !ok {
			if app != "" {
				t.Fatalf("%q: no app but %q", host, app)
			}
			return
		}
		if !validLabel(app) {
			t.Fatalf("%q: app %q is not a label", host, app)
		}
		if !strings.Contains(strings.ToLower(host), app+".localhost") {
			t.Fatalf("%q: app %q not under the domain", host, app)
		}
	})
}
