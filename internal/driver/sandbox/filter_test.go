package sandbox

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/dns"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// netProbeCommand makes the test binary (/bin/probe in the test image) a
// tenant's network tool inside a sandbox:
//
//	serve                 a TCP server on :8080 and a UDP echo on :8081
//	tcp <addr> <port>     connect, print "ok" or the error
//	udp <addr> <port>     send, wait for the echo, print "ok" or the error
const netProbeCommand = "sandbox-netprobe"

// probeWait bounds a probe's wait for an answer that must not come: a drop
// is silence, so a refusal takes this long to show. Answers that must come
// arrive in well under it on a loaded machine (a round trip on one bridge).
const probeWait = 2 * time.Second

func netProbeMain(args []string) int {
	if len(args) == 0 {
		return 2
	}
	switch args[0] {
	case "serve":
		ln, err := net.Listen("tcp", "[::]:8080")
		if err != nil {
			fmt.Println("serve:", err)
			return 1
		}
		pc, err := net.ListenPacket("udp", "[::]:8081")
		if err != nil {
			fmt.Println("serve:", err)
			return 1
		}
		go func() {
			b := make([]byte, 512)
			for {
				n, from, err := pc.ReadFrom(b)
				if err != nil {
					return
				}
				pc.WriteTo(b[:n], from)
			}
		}()
		// :8082 echoes what it reads, for round trips and throughput.
		echo, err := net.Listen("tcp", "[::]:8082")
		if err != nil {
			fmt.Println("serve:", err)
			return 1
		}
		go echoServe(echo)
		fmt.Println("serving")
		for {
			c, err := ln.Accept()
			if err != nil {
				return 1
			}
			c.Write([]byte("hello\n"))
			c.Close()
		}
	case "dns":
		if len(args) != 3 {
			return 2
		}
		fmt.Println(askDNS(args[1], args[2]))
		return 0
	case "rtt", "tput":
		if len(args) != 4 {
			return 2
		}
		n, _ := strconv.Atoi(args[3])
		fmt.Println(measure(args[0], net.JoinHostPort(args[1], args[2]), n))
		return 0
	case "tcp", "udp":
		if len(args) != 3 {
			return 2
		}
		fmt.Println(dialProbe(args[0], net.JoinHostPort(args[1], args[2]), nil))
		return 0
	}
	return 2
}

// measure connects to a probe's echo server at addr and reports, for rtt,
// the median and 99th percentile of n one-byte round trips in µs, for tput,
// the MB/s of sending n MiB.
func measure(what, addr string, n int) string {
	c, err := net.DialTimeout("tcp", addr, probeWait)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	if what == "rtt" {
		c.(*net.TCPConn).SetNoDelay(true)
		rtts := make([]time.Duration, n)
		b := []byte{1}
		for i := range rtts {
			t0 := time.Now()
			if _, err := c.Write(b); err != nil {
				return "error: " + err.Error()
			}
			if _, err := c.Read(b); err != nil {
				return "error: " + err.Error()
			}
			rtts[i] = time.Since(t0)
		}
		slices.Sort(rtts)
		return fmt.Sprintf("%.1f %.1f", float64(rtts[n/2].Nanoseconds())/1e3, float64(rtts[n*99/100].Nanoseconds())/1e3)
	}
	b := make([]byte, 1<<20)
	t0 := time.Now()
	for range n {
		if _, err := c.Write(b); err != nil {
			return "error: " + err.Error()
		}
	}
	c.(*net.TCPConn).CloseWrite()
	io.Copy(io.Discard, c) // the echo ends when it has read everything
	return fmt.Sprintf("%.0f", float64(n)/time.Since(t0).Seconds())
}

// askDNS asks layout.DNS, over UDP, for name's records of type qt and
// returns the rcode and the answers' data.
func askDNS(qt, name string) string {
	q := new(mdns.Msg)
	q.SetQuestion(mdns.Fqdn(name), mdns.StringToType[qt])
	c := mdns.Client{Net: "udp", Timeout: probeWait}
	r, _, err := c.Exchange(q, netip.AddrPortFrom(layout.DNS, 53).String())
	if err != nil {
		return "error: " + err.Error()
	}
	out := mdns.RcodeToString[r.Rcode]
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *mdns.AAAA:
			out += " " + rr.AAAA.String()
		case *mdns.A:
			out += " " + rr.A.String()
		case *mdns.TXT:
			out += " " + strings.Join(rr.Txt, "")
		}
	}
	return out
}

// dialProbe connects to addr and waits for an answer; from, when set, is
// the local address to send from.
func dialProbe(network, addr string, from net.Addr) string {
	d := net.Dialer{Timeout: probeWait, LocalAddr: from}
	c, err := d.Dial(network, addr)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeWait))
	if network == "udp" {
		if _, err := c.Write([]byte("ping")); err != nil {
			return "error: " + err.Error()
		}
	}
	b := make([]byte, 16)
	if _, err := c.Read(b); err != nil {
		return "error: " + err.Error()
	}
	return "ok"
}

// probe runs the net probe in spec's sandbox and returns what it printed.
func probe(t *testing.T, d *Driver, spec driver.Spec, args ...string) string {
	t.Helper()
	res, err := d.Exec(context.Background(), spec, append([]string{"/bin/probe", netProbeCommand}, args...), nil)
	if err != nil {
		t.Fatalf("probe %v: %v", args, err)
	}
	return strings.TrimSpace(string(res.Stdout) + string(res.Stderr))
}

// serving starts a machine of org running the probe's servers.
func serving(t *testing.T, d *Driver, org layout.Org) (driver.Spec, netip.Addr) {
	t.Helper()
	spec := testSpec(t, "busybox", "-c", "exec /bin/probe "+netProbeCommand+" serve")
	spec.Org = org
	start(t, d, spec)
	waitLog(t, spec.LogPath, "serving")
	addr, ok := d.PrivateIP(spec)
	if !ok {
		t.Fatal("no private IP")
	}
	return spec, addr
}

// TestOrgIsolation attacks from inside real sandboxes: a machine of org 1
// reaches its org's other machine on the host (TCP and UDP), and not org
// 2's machine, nor the host's own services on the bridge (its org's
// gateway address); the host still reaches the machines (the proxy's way);
// and a machine that takes over its network namespace (a second address, a
// spoofed source) gets no packet through.
func TestOrgIsolation(t *testing.T) {
	d := newDriver(t, testConfig(t))
	a1, addrA1 := serving(t, d, 1)
	_, addrA2 := serving(t, d, 1)
	_, addrB1 := serving(t, d, 2)

	expect := func(what, got string, ok bool) {
		t.Helper()
		if (got == "ok") != ok {
			t.Errorf("%s: %s, want %s", what, got, map[bool]string{true: "ok", false: "no answer"}[ok])
		}
	}
	for _, proto := range []string{"tcp", "udp"} {
		port := map[string]string{"tcp": "8080", "udp": "8081"}[proto]
		expect("org 1 → org 1 over "+proto, probe(t, d, a1, proto, addrA2.String(), port), true)
		expect("org 1 → org 2 over "+proto, probe(t, d, a1, proto, addrB1.String(), port), false)
	}

	// A service of the host on the bridge: on org 1's gateway.
	gw := layout.Place{Network: d.cfg.Network, Org: 1, Host: d.cfg.Host}.Gateway()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(gw, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("host\n"))
			c.Close()
		}
	}()
	pc, err := net.ListenPacket("udp", netip.AddrPortFrom(gw, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	go func() {
		b := make([]byte, 512)
		for {
			n, from, err := pc.ReadFrom(b)
			if err != nil {
				return
			}
			pc.WriteTo(b[:n], from)
		}
	}()
	tcpPort := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	udpPort := fmt.Sprint(pc.LocalAddr().(*net.UDPAddr).Port)
	expect("org 1 → the host's TCP service on its gateway", probe(t, d, a1, "tcp", gw.String(), tcpPort), false)
	expect("org 1 → the host's UDP service on its gateway", probe(t, d, a1, "udp", gw.String(), udpPort), false)

	// The host opens connections to machines (the proxy, health checks),
	// and their replies come back.
	expect("host → org 1", dialProbe("tcp", netip.AddrPortFrom(addrA1, 8080).String(), nil), true)
	expect("host → org 2", dialProbe("udp", netip.AddrPortFrom(addrB1, 8081).String(), nil), true)

	// A tenant with its namespace in hand (as root of a user namespace
	// would be) adds an address it does not own and sends from it.
	spoofed, _ := layout.Place{Network: d.cfg.Network, Org: 1, Host: d.cfg.Host}.Addr(0xbad)
	inSandbox(t, d, a1, func(h *netlink.Handle) {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: ipNet(spoofed, 80), Flags: unix.IFA_F_NODAD}); err != nil {
			t.Fatal(err)
		}
		for _, proto := range []string{"tcp", "udp"} {
			port := map[string]string{"tcp": "8080", "udp": "8081"}[proto]
			var from net.Addr = &net.TCPAddr{IP: spoofed.AsSlice()}
			if proto == "udp" {
				from = &net.UDPAddr{IP: spoofed.AsSlice()}
			}
			expect("spoofed source "+spoofed.String()+" → org 1 over "+proto,
				dialProbe(proto, net.JoinHostPort(addrA2.String(), port), from), false)
		}
		// And from its own address it still gets through.
		expect("own source after the attempt", dialProbe("tcp", net.JoinHostPort(addrA2.String(), "8080"), &net.TCPAddr{IP: addrA1.AsSlice()}), true)
	})
}

// inSandbox runs f on a thread in spec's sandbox's network namespace, with
// a netlink handle there.
func inSandbox(t *testing.T, d *Driver, spec driver.Spec, f func(h *netlink.Handle)) {
	t.Helper()
	st, err := readState(spec.Dir)
	if err != nil {
		t.Fatal(err)
	}
	pid, _, _ := strings.Cut(st.Handle, ":")
	ns, err := netns.GetFromPath("/proc/" + pid + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := netns.Set(ns); err != nil {
			t.Error(err)
			return
		}
		f(h)
	}()
	<-done
}

// machineView is the cluster as the DNS test lays it out: each machine an
// app of its own.
type machineView map[string]netip.Addr

func (v machineView) Instances(app string) []dns.Instance {
	if a, ok := v[app]; ok {
		return []dns.Instance{{ID: app, App: app, Region: "local", IP: a, Started: true}}
	}
	return nil
}

func (v machineView) Apps() []string {
	var out []string
	for app := range v {
		out = append(out, app)
	}
	return out
}

func (v machineView) RTT(string) (time.Duration, bool) { return 0, true }
func (v machineView) View() dns.View                   { return v }

// TestMachineDNS asks fdaa::3 from inside sandboxes: a machine resolves its
// org's apps, not another org's (NXDOMAIN), _apps.internal lists its org's
// only, and names outside .internal come from the host's resolver.
func TestMachineDNS(t *testing.T) {
	d := newDriver(t, testConfig(t))
	web, addrWeb := serving(t, d, 1)
	_, addrAPI := serving(t, d, 1)
	secret, addrSecret := serving(t, d, 2)
	view := machineView{"web": addrWeb, "api": addrAPI, "secret": addrSecret}

	upstream, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	us := &mdns.Server{PacketConn: upstream, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, q *mdns.Msg) {
		r := new(mdns.Msg)
		r.SetReply(q)
		r.Answer = append(r.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: q.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)})
		w.WriteMsg(r)
	})}
	go us.ActivateAndServe()
	defer us.Shutdown()
	fwd, err := dns.ForwardTo(upstream.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	pc, ln, err := d.DNSSockets()
	if err != nil {
		t.Fatal(err)
	}
	s, err := dns.New(dns.Config{Source: view, PacketConn: pc, Listener: ln, Machines: &dns.Machines{Network: d.Network(), Forward: fwd}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	for _, tc := range []struct {
		from     driver.Spec
		qt, name string
		want     string
	}{
		{web, "AAAA", "api.internal", "NOERROR " + addrAPI.String()},
		{web, "AAAA", "secret.internal", "NXDOMAIN"},
		{web, "TXT", "_apps.internal", "NOERROR api,web"},
		{web, "A", "example.com", "NOERROR 192.0.2.7"},
		{secret, "AAAA", "secret.internal", "NOERROR " + addrSecret.String()},
		{secret, "AAAA", "web.internal", "NXDOMAIN"},
		{secret, "TXT", "_apps.internal", "NOERROR secret"},
	} {
		if got := probe(t, d, tc.from, "dns", tc.qt, tc.name); got != tc.want {
			t.Errorf("machine %s asks %s %s: %q, want %q", tc.from.MachineID, tc.qt, tc.name, got, tc.want)
		}
	}
}

// TestOrgsAcrossHosts runs two hosts of one network on this kernel, as
// `flame dev` does: a machine of org 1 reaches its org's machine on the
// other host's bridge (routed by the kernel between the bridges), and not
// org 2's machine there.
func TestOrgsAcrossHosts(t *testing.T) {
	cfg1 := testConfig(t)
	cfg2 := testConfig(t)
	cfg2.Network, cfg2.Host = cfg1.Network, 2
	d1, d2 := newDriver(t, cfg1), newDriver(t, cfg2)
	a1, _ := serving(t, d1, 1)
	_, a2 := serving(t, d2, 1)
	_, b2 := serving(t, d2, 2)
	for _, proto := range []string{"tcp", "udp"} {
		port := map[string]string{"tcp": "8080", "udp": "8081"}[proto]
		if got := probe(t, d1, a1, proto, a2.String(), port); got != "ok" {
			t.Errorf("org 1 on host 1 → org 1 on host 2 over %s: %s", proto, got)
		}
		if got := probe(t, d1, a1, proto, b2.String(), port); got == "ok" {
			t.Errorf("org 1 on host 1 → org 2 on host 2 over %s: answered", proto)
		}
	}
}

// TestFilterAcrossRestart closes a driver while its machines run, as an
// agent that stops does, and starts another on the same state: before the
// new one adopts anything, the machines are still kept apart.
func TestFilterAcrossRestart(t *testing.T) {
	cfg := testConfig(t)
	d1, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	a1, _ := serving(t, d1, 1)
	_, a2 := serving(t, d1, 1)
	_, b1 := serving(t, d1, 2)
	if err := d1.Close(); err != nil {
		t.Fatal(err)
	}
	d2 := newDriver(t, cfg)
	if got := probe(t, d2, a1, "tcp", a2.String(), "8080"); got != "ok" {
		t.Errorf("org 1 → org 1 after the restart: %s", got)
	}
	if got := probe(t, d2, a1, "tcp", b1.String(), "8080"); got == "ok" {
		t.Error("org 1 → org 2 after the restart: answered")
	}
}
