package dns

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

type testLogWriter struct{ t *testing.T }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

// startServer serves src on fresh loopback sockets and returns their
// addresses; the server is closed when the test ends.
func startServer(t *testing.T, src Source) (udp, tcp string, s *Server) {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s, err = New(Config{
		Source:     src,
		PacketConn: pc,
		Listener:   ln,
		Logger:     slog.New(slog.NewTextHandler(testLogWriter{t}, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return pc.LocalAddr().String(), ln.Addr().String(), s
}

func exchange(t *testing.T, network, addr string, q *dns.Msg) *dns.Msg {
	t.Helper()
	c := &dns.Client{Net: network, Timeout: 5 * time.Second}
	r, _, err := c.Exchange(q, addr)
	if err != nil {
		t.Fatalf("%s exchange: %v", network, err)
	}
	return r
}

func TestServerUDPAndTCP(t *testing.T) {
	udp, tcp, _ := startServer(t, testSource())
	for _, tt := range []struct {
		network, addr string
	}{{"udp", udp}, {"tcp", tcp}} {
		t.Run(tt.network, func(t *testing.T) {
			r := exchange(t, tt.network, tt.addr, query("e2865013.vm.web.internal.", dns.TypeAAAA))
			if got, want := result(r), "NOERROR fdaa:0:1:a7b:3::2"; got != want {
				t.Errorf("got %q, want %q", got, want)
			}
			r = exchange(t, tt.network, tt.addr, query("vms.web.internal.", dns.TypeTXT))
			if !strings.HasPrefix(result(r), "NOERROR a1000001 fra,") {
				t.Errorf("vms: %q", result(r))
			}
			r = exchange(t, tt.network, tt.addr, query("missing.internal.", dns.TypeAAAA))
			if r.Rcode != dns.RcodeNameError {
				t.Errorf("rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
			}
			r = exchange(t, tt.network, tt.addr, query("example.com.", dns.TypeA))
			if r.Rcode != dns.RcodeRefused {
				t.Errorf("rcode %s, want REFUSED", dns.RcodeToString[r.Rcode])
			}
		})
	}
}

func TestServerTCPManyQueriesOneConn(t *testing.T) {
	_, tcp, _ := startServer(t, testSource())
	c := &dns.Client{Net: "tcp", Timeout: 5 * time.Second}
	conn, err := c.Dial(tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	for i := range 5 {
		q := query("ams.web.internal.", dns.TypeAAAA)
		q.Id = uint16(i + 1)
		r, _, err := c.ExchangeWithConn(q, conn)
		if err != nil {
			t.Fatal(err)
		}
		if r.Id != q.Id || len(r.Answer) != 2 {
			t.Fatalf("query %d: %v", i, r)
		}
	}
}

// bigSource has an app with more machines than one UDP answer can hold.
func bigSource() *fakeSource {
	src := &fakeSource{}
	for i := range 200 {
		src.ins = append(src.ins, Instance{
			ID: fmt.Sprintf("%014x", i), App: "big", Region: "ams",
			IP: ip(fmt.Sprintf("fdaa:0:1:a7b:%x::2", i+1)), Started: true,
		})
	}
	return src
}

func TestServerTruncation(t *testing.T) {
	udp, tcp, _ := startServer(t, bigSource())
	for _, name := range []string{"big.internal.", "vms.big.internal."} {
		qt := dns.TypeAAAA
		if strings.HasPrefix(name, "vms.") {
			qt = dns.TypeTXT
		}
		t.Run(name, func(t *testing.T) {
			// Plain UDP: 512 bytes, truncated.
			r := exchange(t, "udp", udp, query(name, qt))
			if !r.Truncated {
				t.Errorf("udp answer of %d records not truncated", len(r.Answer))
			}
			r.Compress = true // as sent
			if n := r.Len(); n > dns.MinMsgSize {
				t.Errorf("udp answer of %d bytes", n)
			}
			// EDNS with a large buffer: capped at ednsSize, still truncated.
			q := query(name, qt)
			q.SetEdns0(65000, false)
			r = exchange(t, "udp", udp, q)
			if !r.Truncated {
				t.Error("edns udp answer not truncated")
			}
			// TCP: everything.
			r = exchange(t, "tcp", tcp, query(name, qt))
			if r.Truncated {
				t.Error("tcp answer truncated")
			}
			if qt == dns.TypeAAAA && len(r.Answer) != 200 {
				t.Errorf("tcp answer has %d records, want 200", len(r.Answer))
			}
			if qt == dns.TypeTXT && strings.Count(strings.Join(r.Answer[0].(*dns.TXT).Txt, ""), ",") != 199 {
				t.Error("tcp TXT answer incomplete")
			}
		})
	}
}

func TestServerMalformed(t *testing.T) {
	udp, tcp, _ := startServer(t, testSource())
	conn, err := net.Dial("udp", udp)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	// Garbage after a readable header: FORMERR with the query's ID.
	if _, err := conn.Write([]byte{0xab, 0xcd, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0xff}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(buf[:n]); err != nil {
		t.Fatal(err)
	}
	if r.Id != 0xabcd || r.Rcode != dns.RcodeFormatError || !r.Response {
		t.Errorf("reply %v, want FORMERR for id 0xabcd", r)
	}

	// Too short for a header, and a response: no reply. The next proper
	// query is answered, so the server still runs.
	conn.Write([]byte{1, 2, 3})
	resp := query("web.internal.", dns.TypeAAAA)
	resp.Response = true
	b, _ := resp.Pack()
	conn.Write(b)
	q := query("web.internal.", dns.TypeAAAA)
	q.Id = 7
	b, _ = q.Pack()
	conn.Write(b)
	n, err = conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Unpack(buf[:n]); err != nil || r.Id != 7 {
		t.Fatalf("after junk: reply %v, %v; want the answer to query 7", r, err)
	}

	// TCP: a bogus frame closes the connection, the server goes on.
	tc, err := net.Dial("tcp", tcp)
	if err != nil {
		t.Fatal(err)
	}
	tc.Write([]byte{0, 3, 1, 2, 3})
	tc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := tc.Read(buf); err == nil {
		t.Error("tcp connection still open after a frame without a header")
	}
	tc.Close()
	exchange(t, "tcp", tcp, query("web.internal.", dns.TypeAAAA))
}

func TestServerCloseWaits(t *testing.T) {
	_, tcp, s := startServer(t, testSource())
	// An idle open connection must not hold Close up.
	c, err := net.Dial("tcp", tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	exchange(t, "tcp", tcp, query("web.internal.", dns.TypeAAAA))
	done := make(chan struct{})
	go func() {
		s.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	if err := s.Start(context.Background()); err == nil {
		t.Error("Start after Close succeeded")
	}
	s.Close() // twice is fine
}

func TestServerContextEnds(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Source: testSource(), PacketConn: pc})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	cancel()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("server goroutines still running after the context ended")
	}
	s.Close()
}

func TestConfigValidate(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for _, cfg := range []Config{
		{PacketConn: pc},
		{Source: testSource()},
		{Source: testSource(), PacketConn: pc, TTL: -time.Second},
	} {
		if _, err := New(cfg); err == nil {
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
}
