package proxy

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// BenchmarkEdge measures one request through the edge to a machine on the
// same host (keep-alive both sides), against the same request sent
// straight to the machine: what the proxy adds, with net/http as the
// client and the machine. "nethttp" is the edge served by net/http alone
// (Config.DisableFastPath), "fast" the edge's fast path.
//
//	go test ./internal/proxy -run '^$' -bench 'Edge' -benchmem
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
	slow, fast := benchEdges(b, addr)

	run := func(b *testing.B, target string) {
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
		defer client.CloseIdleConnections()
		req, _ := http.NewRequest("GET", "http://"+target+"/", nil)
		req.Host = "demo.localhost"
		b.ReportAllocs()
		defer reportCPU(b)()
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
	b.Run("nethttp", func(b *testing.B) { run(b, slow.EdgeAddr()) })
	b.Run("fast", func(b *testing.B) { run(b, fast.EdgeAddr()) })
}

// BenchmarkEdgeLean is BenchmarkEdge with a client and a machine that
// allocate nothing (a fixed request written on a raw connection, a fixed
// answer): allocs/op is what the edge allocates per request.
//
//	go test ./internal/proxy -run '^$' -bench 'EdgeLean' -benchmem
func BenchmarkEdgeLean(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go leanBackend(ln)
	addr := ln.Addr().(*net.TCPAddr)
	slow, fast := benchEdges(b, addr)

	run := func(b *testing.B, target string) {
		c, err := net.Dial("tcp", target)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		req := []byte("GET / HTTP/1.1\r\nHost: demo.localhost\r\nUser-Agent: bench\r\n\r\n")
		br := bufio.NewReaderSize(c, 16<<10)
		lat := new(latencies)
		b.ReportAllocs()
		defer reportCPU(b)()
		b.ResetTimer()
		for b.Loop() {
			t0 := time.Now()
			if _, err := c.Write(req); err != nil {
				b.Fatal(err)
			}
			if err := readLeanResponse(br); err != nil {
				b.Fatal(err)
			}
			lat.add(time.Since(t0))
		}
		lat.report(b)
	}
	b.Run("direct", func(b *testing.B) { run(b, addr.String()) })
	b.Run("nethttp", func(b *testing.B) { run(b, slow.EdgeAddr()) })
	b.Run("fast", func(b *testing.B) { run(b, fast.EdgeAddr()) })
	b.Run("loop", func(b *testing.B) { run(b, benchLoopEdge(b, addr).EdgeAddr()) })
	// Two hops: the machine on another host, reached over that host's
	// backhaul listener (net/http on that side).
	slow2, fast2 := benchTwoHops(b, addr)
	b.Run("nethttp-two-hops", func(b *testing.B) { run(b, slow2.EdgeAddr()) })
	b.Run("fast-two-hops", func(b *testing.B) { run(b, fast2.EdgeAddr()) })
}

// benchTwoHops starts a far host (fra-1, backhaul only) whose machine is
// at addr, and two edges on ams-1 in front of it: net/http alone, and the
// fast path.
func benchTwoHops(b *testing.B, addr *net.TCPAddr) (slow, fast *Proxy) {
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		return ln
	}
	m := machine("m1", "fra-1", addr)
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 1000, 1000
	start := func(cfg Config, self string, backhaul map[string]string) *Proxy {
		cfg.Token, cfg.Logger = testToken, slog.New(slog.DiscardHandler)
		p, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		p.setState(route.Facts{Self: self, Region: cfg.Region, Hosts: testHosts, Machines: []route.Machine{m}}, backhaul)
		if err := p.Start(b.Context()); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.Close() })
		return p
	}
	far := start(Config{HostID: "fra-1", Region: "fra", Backhaul: listen()}, "fra-1", nil)
	bh := map[string]string{"fra-1": far.BackhaulAddr()}
	slow = start(Config{HostID: "ams-1", Region: "ams", Edge: listen(), DisableFastPath: true}, "ams-1", bh)
	fast = start(Config{HostID: "ams-1", Region: "ams", Edge: listen()}, "ams-1", bh)
	return slow, fast
}

// BenchmarkEdgeParallel is BenchmarkEdgeLean with 50 clients at once
// (keep-alive, one connection each): req/s is b.N over the time taken.
//
//	go test ./internal/proxy -run '^$' -bench 'EdgeParallel' -benchmem
func BenchmarkEdgeParallel(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go leanBackend(ln)
	addr := ln.Addr().(*net.TCPAddr)
	slow, fast := benchEdges(b, addr)
	run := func(b *testing.B, target string) {
		req := []byte("GET / HTTP/1.1\r\nHost: demo.localhost\r\nUser-Agent: bench\r\n\r\n")
		b.ReportAllocs()
		defer reportCPU(b)()
		b.SetParallelism(25) // 50 clients on 2 cores
		b.RunParallel(func(pb *testing.PB) {
			c, err := net.Dial("tcp", target)
			if err != nil {
				b.Error(err)
				return
			}
			defer c.Close()
			br := bufio.NewReaderSize(c, 16<<10)
			for pb.Next() {
				if _, err := c.Write(req); err != nil {
					b.Error(err)
					return
				}
				if err := readLeanResponse(br); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	}
	b.Run("direct", func(b *testing.B) { run(b, addr.String()) })
	b.Run("nethttp", func(b *testing.B) { run(b, slow.EdgeAddr()) })
	b.Run("fast", func(b *testing.B) { run(b, fast.EdgeAddr()) })
	b.Run("loop", func(b *testing.B) { run(b, benchLoopEdge(b, addr).EdgeAddr()) })
}

// benchLoopEdge starts an edge with its event loops (the default; "fast"
// is the fast path with a goroutine per connection) in front of a machine
// at addr.
func benchLoopEdge(b *testing.B, addr *net.TCPAddr) *Proxy {
	edgeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	p, err := New(Config{HostID: "ams-1", Region: "ams", Token: testToken, Edge: edgeLn, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	m := machine("m1", "ams-1", addr)
	m.Services[0].SoftLimit, m.Services[0].HardLimit = 1000, 1000
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
	if err := p.Start(b.Context()); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

// benchEdges starts two edges in front of a machine at addr: net/http
// alone, and the fast path.
func benchEdges(b *testing.B, addr *net.TCPAddr) (slow, fast *Proxy) {
	start := func(disable bool) *Proxy {
		edgeLn, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		p, err := New(Config{HostID: "ams-1", Region: "ams", Token: testToken, Edge: edgeLn, Logger: slog.New(slog.DiscardHandler), DisableFastPath: disable, DisableEventLoop: true})
		if err != nil {
			b.Fatal(err)
		}
		m := machine("m1", "ams-1", addr)
		m.Services[0].SoftLimit, m.Services[0].HardLimit = 1000, 1000 // 50 clients at once
		p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{m}}, nil)
		if err := p.Start(b.Context()); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { p.Close() })
		return p
	}
	return start(true), start(false)
}

// leanBackend answers every request on every connection with a fixed
// 200, allocating nothing per request.
func leanBackend(ln net.Listener) {
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\nDate: Mon, 07 Dec 2026 00:00:00 GMT\r\n\r\nhello\n")
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			answerEach(c, resp)
		}()
	}
}

// answerEach answers every request head read on c with resp (requests
// without a body), until c ends.
func answerEach(c net.Conn, resp []byte) {
	buf := make([]byte, 16<<10)
	n := 0
	for {
		k, err := c.Read(buf[n:])
		if err != nil {
			return
		}
		n += k
		for {
			i := bytes.Index(buf[:n], []byte("\r\n\r\n"))
			if i < 0 {
				break
			}
			if _, err := c.Write(resp); err != nil {
				return
			}
			n = copy(buf, buf[i+4:n])
		}
	}
}

// readLeanResponse reads one response with a Content-Length.
func readLeanResponse(br *bufio.Reader) error {
	length := -1
	line, err := br.ReadSlice('\n')
	if err != nil {
		return err
	}
	if !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
		return io.ErrUnexpectedEOF
	}
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) <= 2 {
			break
		}
		if k, v, ok := bytes.Cut(line, []byte(":")); ok && bytes.EqualFold(k, []byte("Content-Length")) {
			length, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if length < 0 {
		return io.ErrUnexpectedEOF
	}
	_, err = br.Discard(length)
	return err
}

// reportCPU reports the process's CPU time (user and system, every
// thread: the client, the edge and the machine alike) per request, from
// the call to the call of the function it returns: the CPU an edge costs
// is its cpu-ns/op less direct's. On a busy machine this is steadier than
// ns/op, which counts the waits for other processes too.
func reportCPU(b *testing.B) func() {
	start := processCPU()
	return func() {
		b.ReportMetric(float64((processCPU()-start).Nanoseconds())/float64(b.N), "cpu-ns/op")
	}
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// latencies is a histogram of request times in microseconds (the last
// bucket holds everything slower), allocated before the timed loop.
type latencies struct{ n [10000]uint32 }

func (l *latencies) add(d time.Duration) {
	l.n[min(int(d/time.Microsecond), len(l.n)-1)]++
}

// report reports the median and the 99th percentile (p50-µs, p99-µs).
func (l *latencies) report(b *testing.B) {
	var total uint64
	for _, k := range l.n {
		total += uint64(k)
	}
	at := func(q float64) float64 {
		var seen uint64
		for us, k := range l.n {
			if seen += uint64(k); float64(seen) >= q*float64(total) {
				return float64(us)
			}
		}
		return float64(len(l.n))
	}
	if total > 0 {
		b.ReportMetric(at(0.50), "p50-µs")
		b.ReportMetric(at(0.99), "p99-µs")
	}
}
