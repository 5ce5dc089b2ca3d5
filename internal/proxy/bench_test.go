package proxy

import (
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"

	"github.com/flamehq/flame/internal/proxy/route"
)

// BenchmarkEdge measures one request through the edge to a machine on the
// same host (keep-alive both sides), against the same request sent
// straight to the machine: what the proxy adds, with net/http on both of
// its sides.
//
//	go test ./internal/proxy -run '^$' -bench Edge -benchmem
func BenchmarkEdge(b *testing.B) {
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
	addr := ln.Addr().(*net.TCPAddr)

	edgeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{HostID: "ams-1", Region: "ams", Token: testToken, Edge: edgeLn, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", addr)}}, nil)
	if err := p.Start(b.Context()); err != nil {
		b.Fatal(err)
	}
	defer p.Close()

	run := func(b *testing.B, target string) {
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
		defer client.CloseIdleConnections()
		req, _ := http.NewRequest("GET", "http://"+target+"/", nil)
		req.Host = "demo.localhost"
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
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
	}
	b.Run("direct", func(b *testing.B) { run(b, addr.String()) })
	b.Run("edge", func(b *testing.B) { run(b, p.EdgeAddr()) })
}
