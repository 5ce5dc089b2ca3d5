package proxy

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"

	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy/route"
)

// BenchmarkCrossHost measures a request through an edge to a machine on
// another host (edge → backhaul → far proxy → machine, all on loopback).
// The edge serves with net/http, its backhaul hop multiplexed over HTTP/2
// (h2c) and, for comparison, over the HTTP/1.1 keep-alive pool it used
// before (the pool upgrades still use); "fast" is an edge on its fast
// path, which keeps HTTP/1.1 connections of its own to the far host. One
// request at a time, and 64 at once. The backhaul runs over mutual TLS
// between the hosts' certificates (hostcreds.go); revisions before it
// checked a shared token, so bench/compare-revs.sh puts the two side by
// side.
//
//	go test ./internal/proxy -run '^$' -bench CrossHost -benchmem
func BenchmarkCrossHost(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	backendSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "hello\n")
	})}
	go backendSrv.Serve(ln)
	defer backendSrv.Close()
	m := machine("m1", "fra-1", ln.Addr().(*net.TCPAddr))
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 1000, 1000

	ca := newTestCA(b)
	start := func(host string, edge, fastPath bool) *Proxy {
		var edgeLn net.Listener
		if edge {
			if edgeLn, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
				b.Fatal(err)
			}
		}
		bh, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		p, err := New(Config{HostID: host, Region: host[:3], Edge: edgeLn, Backhaul: bh,
			Identity: pki.NewSlot(ca.identity(pki.RoleHost, host)), Revoked: new(pki.Revocations),
			Logger: slog.New(slog.DiscardHandler), DisableFastPath: !fastPath})
		if err != nil {
			b.Fatal(err)
		}
		if err := p.Start(b.Context()); err != nil {
			b.Fatal(err)
		}
		return p
	}
	edge, fast, far := start("ams-1", true, false), start("ams-1", true, true), start("fra-1", false, false)
	defer edge.Close()
	defer fast.Close()
	defer far.Close()
	backhaul := map[string]string{"fra-1": far.BackhaulAddr()}
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)
	fast.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)
	far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)
	h2, h1 := edge.toHosts, edge.toHostsUpgrade
	defer func() { edge.toHosts = h2 }()

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}}
	defer client.CloseIdleConnections()
	target := edge.EdgeAddr()
	one := func(b *testing.B) {
		req, _ := http.NewRequest("GET", "http://"+target+"/", nil)
		req.Host = "demo.localhost"
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
	for _, bc := range []struct {
		name string
		tr   *http.Transport
	}{{"h2c", h2}, {"http1", h1}, {"fast", nil}} {
		if bc.tr != nil {
			edge.toHosts = bc.tr
		} else {
			target = fast.EdgeAddr()
		}
		b.Run(bc.name+"/serial", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				one(b)
			}
		})
		b.Run(bc.name+"/parallel64", func(b *testing.B) {
			b.ReportAllocs()
			b.SetParallelism(32) // 64 goroutines on 2 CPUs
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					one(b)
				}
			})
		})
	}
}
