package sandbox

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
)

// outServersEnv tells the unprivileged run where the servers of
// TestRootlessOutbound are: "http=<addr> udp=<addr> udp6=<addr>
// dns=<addr> hold=<addr> echo=<addr>".
const outServersEnv = "FLAME_ROOTLESS_OUT_SERVERS"

// outName is the name the test's resolver answers, with outNameAddr.
const (
	outName     = "outbound.flame-test."
	outNameAddr = "192.0.2.7"
)

// hostServers starts, in this (root's) process, on the host's loopback,
// the servers a rootless machine is to reach: an HTTP server, UDP echoes
// (IPv4 and IPv6), a DNS server answering outName, a TCP server that holds
// connections open and a TCP echo (see measure). It returns outServersEnv's value.
func hostServers(t testing.TB) string {
	t.Helper()
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln
	}
	hl := listen()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "outbound ok\n")
	})}
	go srv.Serve(hl)
	t.Cleanup(func() { srv.Close() })

	udpEcho := func(addr string) net.PacketConn {
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		go func() {
			b := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(b)
				if err != nil {
					return
				}
				pc.WriteTo(b[:n], from)
			}
		}()
		return pc
	}
	pc, pc6 := udpEcho("127.0.0.1:0"), udpEcho("[::1]:0")

	dpc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mux := mdns.NewServeMux()
	mux.HandleFunc(".", func(w mdns.ResponseWriter, q *mdns.Msg) {
		r := new(mdns.Msg)
		r.SetReply(q)
		if len(q.Question) == 1 && strings.EqualFold(q.Question[0].Name, outName) && q.Question[0].Qtype == mdns.TypeA {
			rr, _ := mdns.NewRR(outName + " 60 IN A " + outNameAddr)
			r.Answer = append(r.Answer, rr)
		} else {
			r.Rcode = mdns.RcodeNameError
		}
		w.WriteMsg(r)
	})
	ds := &mdns.Server{PacketConn: dpc, Handler: mux}
	go ds.ActivateAndServe()
	t.Cleanup(func() { ds.Shutdown() })

	hold := listen()
	go func() {
		for {
			c, err := hold.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.Copy(io.Discard, c)
			}()
		}
	}()
	echo := listen()
	go echoServe(echo)
	return fmt.Sprintf("http=%s udp=%s udp6=%s dns=%s hold=%s echo=%s", hl.Addr(), pc.LocalAddr(), pc6.LocalAddr(), dpc.LocalAddr(), hold.Addr(), echo.Addr())
}

// echoServe answers as the net probe's :8082 does: one byte read is one
// byte sent back, more is swallowed, EOF closes.
func echoServe(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			b := make([]byte, 64<<10)
			for {
				n, err := c.Read(b)
				if err != nil {
					return
				}
				if n == 1 {
					if _, err := c.Write(b[:1]); err != nil {
						return
					}
				}
			}
		}()
	}
}

// outServers parses outServersEnv.
func outServers(t testing.TB) map[string]netip.AddrPort {
	t.Helper()
	out := map[string]netip.AddrPort{}
	for _, kv := range strings.Fields(os.Getenv(outServersEnv)) {
		k, v, _ := strings.Cut(kv, "=")
		ap, err := netip.ParseAddrPort(v)
		if err != nil {
			t.Fatalf("%s: %v", outServersEnv, err)
		}
		out[k] = ap
	}
	if len(out) != 6 {
		t.Fatalf("%s=%q: want the servers of TestRootlessOutbound", outServersEnv, os.Getenv(outServersEnv))
	}
	return out
}

// TestRootlessOutbound runs TestRootlessOutboundSandbox as an unprivileged
// user, against servers this process runs on the host's loopback.
func TestRootlessOutbound(t *testing.T) {
	if os.Getenv(rootlessDirEnv) != "" || os.Geteuid() != 0 {
		t.Skip("the unprivileged run itself (see TestRootlessOutboundSandbox)")
	}
	requireSandboxes(t)
	env := outServersEnv + "=" + hostServers(t)
	out := runUnprivilegedEnv(t, []string{env}, "-test.run=^TestRootlessOutboundSandbox$")
	if !strings.Contains(out, "--- PASS: TestRootlessOutboundSandbox") {
		t.Fatal("TestRootlessOutboundSandbox did not pass as an unprivileged user")
	}
}

// TestRootlessOutboundSandbox, run by TestRootlessOutbound as an
// unprivileged user: a rootless machine does not reach the host's
// services without host access, and with it reaches the host's loopback
// through the gateway (TCP and UDP; UDP through the IPv6 one too), resolves a name through fdaa::3 (the
// driver forwarding to the test's resolver), does not reach a port the
// driver's own process listens on, is reset past its connection bound
// while its other traffic flows, and leaves no goroutine of its stack and
// no descriptor of its packet socket once stopped.
func TestRootlessOutboundSandbox(t *testing.T) {
	data := os.Getenv(rootlessDirEnv)
	if data == "" {
		t.Skip("run by TestRootlessOutbound as an unprivileged user")
	}
	srv := outServers(t)
	d, _ := rootlessDriver(t, data)
	d.rl.resolvers = []netip.AddrPort{srv["dns"]}
	const maxTCP = 4
	d.rl.limits = outLimits{tcp: maxTCP, pending: maxTCP, udp: 8}
	// A port of this process's own stands for Flame's API.
	own, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer own.Close()
	go func() {
		for {
			c, err := own.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("flame\n"))
			c.Close()
		}
	}()
	ctx := context.Background()
	gw := outGateway4.String()
	port := func(k string) string { return fmt.Sprint(srv[k].Port()) }

	spec := testSpec(t, "busybox", "-c", "exec sleep 1000")
	p := start(t, d, spec)
	exec := func(argv ...string) string {
		t.Helper()
		res, err := d.Exec(ctx, spec, argv, nil)
		if err != nil {
			t.Fatalf("exec %v: %v", argv, err)
		}
		return strings.TrimSpace(string(res.Stdout) + string(res.Stderr))
	}
	// (busybox's wget, static, crashes resolving: nc sends the request.)
	get := func() string {
		return exec("sh", "-c", `printf 'GET / HTTP/1.0\r\n\r\n' | busybox nc `+gw+" "+port("http"))
	}
	// Without HostAccess (a Flame with tenants other than the user: a
	// flame agent run by a user), the host's services are out of reach.
	if got := probe(t, d, spec, "tcp", gw, port("http")); !strings.Contains(got, "refused") {
		t.Errorf("the gateway without host access: %q, want refused", got)
	}
	d.rl.hostAccess.Store(true) // flame dev's: the user's own services
	if got := get(); !strings.HasSuffix(got, "\r\n\r\noutbound ok") {
		t.Errorf("HTTP GET through the gateway: %q", got)
	}
	if got := probe(t, d, spec, "udp", gw, port("udp")); got != "ok" {
		t.Errorf("UDP round trip through the gateway: %q", got)
	}
	if got := probe(t, d, spec, "dns", "A", outName); got != "NOERROR "+outNameAddr {
		t.Errorf("DNS through fdaa::3: %q", got)
	}
	if got := probe(t, d, spec, "udp", outGateway6.String(), port("udp6")); got != "ok" {
		t.Errorf("UDP round trip through the IPv6 gateway: %q", got)
	}
	if got := exec("busybox", "nslookup", outName); !strings.Contains(got, outNameAddr) {
		t.Errorf("nslookup through resolv.conf: %q", got)
	}
	ownPort := fmt.Sprint(own.Addr().(*net.TCPAddr).Port)
	if got := probe(t, d, spec, "tcp", gw, ownPort); !strings.Contains(got, "refused") {
		t.Errorf("the driver's own port through the gateway: %q, want refused", got)
	}

	// maxTCP connections held open take every slot: the next is reset,
	// UDP and DNS still flow, and a slot freed is taken again.
	held := make([]string, maxTCP)
	for i := range held {
		held[i] = "sleep 1000 | busybox nc " + gw + " " + port("hold") + " & echo $! >> /tmp/held;"
	}
	res, err := d.Exec(ctx, spec, []string{"sh", "-c", strings.Join(held, " ") + " echo started"}, nil)
	if err != nil || !strings.Contains(string(res.Stdout), "started") {
		t.Fatalf("hold connections: %v %+v", err, res)
	}
	d.rl.fwdMu.Lock()
	o := d.rl.fwds[spec.MachineID].out
	d.rl.fwdMu.Unlock()
	if o == nil {
		log, _ := os.ReadFile(spec.LogPath)
		t.Fatalf("the machine has no outbound traffic; its log:\n%s", log)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(o.link.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	link := fmt.Sprintf("socket:[%d]", st.Ino)
	deadline := time.Now().Add(10 * time.Second)
	for len(o.tcpSlots) < maxTCP && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := len(o.tcpSlots); n != maxTCP {
		t.Fatalf("held connections: %d, want %d", n, maxTCP)
	}
	if got := probe(t, d, spec, "tcp", gw, port("http")); !strings.Contains(got, "refused") && !strings.Contains(got, "reset") {
		t.Errorf("connection past the bound: %q, want refused", got)
	}
	if got := probe(t, d, spec, "udp", gw, port("udp")); got != "ok" {
		t.Errorf("UDP past the TCP bound: %q", got)
	}
	if got := probe(t, d, spec, "dns", "A", outName); got != "NOERROR "+outNameAddr {
		t.Errorf("DNS past the TCP bound: %q", got)
	}
	exec("sh", "-c", "kill $(cat /tmp/held)")
	deadline = time.Now().Add(10 * time.Second)
	for len(o.tcpSlots) > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := len(o.tcpSlots); n != 0 {
		t.Errorf("connections closed inside still held: %d", n)
	}
	if got := get(); !strings.HasSuffix(got, "\r\n\r\noutbound ok") {
		t.Errorf("HTTP GET once the held connections closed: %q", got)
	}

	// UDP flows past their bound are dropped (each probe is a flow of
	// its own, kept until idle), while TCP flows.
	for len(o.udpSlots) < cap(o.udpSlots) {
		if got := probe(t, d, spec, "udp", gw, port("udp")); got != "ok" {
			t.Fatalf("UDP flow %d: %q", len(o.udpSlots), got)
		}
	}
	if got := probe(t, d, spec, "udp", gw, port("udp")); !strings.Contains(got, "timeout") {
		t.Errorf("UDP flow past the bound: %q, want a timeout", got)
	}
	if got := get(); !strings.HasSuffix(got, "\r\n\r\noutbound ok") {
		t.Errorf("HTTP GET past the UDP bound: %q", got)
	}

	// Stopped, nothing of its outbound traffic is left in this process.
	if _, err := p.Stop(ctx, syscall.SIGKILL, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for {
		g, fds := stackGoroutines(), fdsOf(link)
		if g == 0 && fds == 0 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("after stop: %d goroutines of the stack, %d descriptors of its packet socket\n%s", g, fds, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// stackGoroutines counts this process's goroutines running the outbound
// stack or its forwarding.
func stackGoroutines() int {
	buf := make([]byte, 4<<20)
	n := 0
	for _, g := range strings.Split(string(buf[:runtime.Stack(buf, true)]), "\n\n") {
		if strings.Contains(g, "gvisor.dev/gvisor/") || strings.Contains(g, "sandbox.(*outbound)") || strings.Contains(g, "sandbox.splice") {
			n++
		}
	}
	return n
}

// fdsOf counts this process's descriptors whose link is target.
func fdsOf(target string) int {
	n := 0
	ents, _ := os.ReadDir("/proc/self/fd")
	for _, e := range ents {
		if l, _ := os.Readlink("/proc/self/fd/" + e.Name()); l == target {
			n++
		}
	}
	return n
}

// BenchmarkRootlessOutbound measures a rootless machine's outbound TCP
// through the gateway against the same measure run directly on the host:
// the median and 99th percentile of one-byte round trips (µs) and the
// throughput of sending 256 MiB (MB/s), to an echo server on the host's
// loopback. As root it runs itself again as an unprivileged user (run it
// with -test.benchtime=1x) and reports that run's figures.
func BenchmarkRootlessOutbound(b *testing.B) {
	if os.Getenv(rootlessDirEnv) == "" {
		if os.Geteuid() != 0 {
			b.Skip("run as root: it runs itself as an unprivileged user")
		}
		requireSandboxes(b)
		env := outServersEnv + "=" + hostServers(b)
		out := runUnprivilegedEnv(b, []string{env}, "-test.run=^$", "-test.bench=^BenchmarkRootlessOutbound$", "-test.benchtime=1x", "-test.timeout=60s")
		for _, line := range strings.Split(out, "\n") {
			if !strings.HasPrefix(line, "BenchmarkRootlessOutbound") {
				continue
			}
			f := strings.Fields(line)
			for i := 2; i+1 < len(f); i += 2 {
				var v float64
				if _, err := fmt.Sscan(f[i], &v); err == nil && f[i+1] != "ns/op" {
					b.ReportMetric(v, f[i+1])
				}
			}
		}
		return
	}
	srv := outServers(b)
	d, _ := rootlessDriver(b, os.Getenv(rootlessDirEnv))
	spec := testSpec(b, "busybox", "-c", "exec sleep 1000")
	start(b, d, spec)
	echo := srv["echo"]
	const trips, mib = 2000, 256
	run := func(what string, n int) []float64 {
		res, err := d.Exec(context.Background(), spec, []string{"/bin/probe", netProbeCommand, what, outGateway4.String(), fmt.Sprint(echo.Port()), fmt.Sprint(n)}, nil)
		if err != nil {
			b.Fatal(err)
		}
		return parseFigures(b, string(res.Stdout))
	}
	for range b.N {
		in, direct := run("rtt", trips), parseFigures(b, measure("rtt", echo.String(), trips))
		b.ReportMetric(in[0], "rtt-p50-us")
		b.ReportMetric(in[1], "rtt-p99-us")
		b.ReportMetric(direct[0], "direct-rtt-p50-us")
		b.ReportMetric(direct[1], "direct-rtt-p99-us")
		in, direct = run("tput", mib), parseFigures(b, measure("tput", echo.String(), mib))
		b.ReportMetric(in[0], "MB/s")
		b.ReportMetric(direct[0], "direct-MB/s")
	}
}

func parseFigures(b *testing.B, s string) []float64 {
	var out []float64
	for _, f := range strings.Fields(s) {
		var v float64
		if _, err := fmt.Sscan(f, &v); err != nil {
			b.Fatalf("figures %q: %v", s, err)
		}
		out = append(out, v)
	}
	return out
}
