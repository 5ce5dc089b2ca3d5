package dns

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// orgSource: apps web and api of org 1, secret of org 2, all in network 7,
// on two hosts.
func orgSource() *fakeSource {
	at := func(org layout.Org, host layout.Host, m uint64) netip.Addr {
		a, _ := layout.Place{Network: 7, Org: org, Host: host}.Addr(m)
		return a
	}
	return &fakeSource{
		apps: []string{"web", "api", "secret"},
		rtt:  map[string]time.Duration{"ams": 0},
		ins: []Instance{
			{ID: "w1", App: "web", Region: "ams", IP: at(1, 1, 2), Started: true},
			{ID: "w2", App: "web", Region: "ams", IP: at(1, 2, 2), Started: true},
			{ID: "a1", App: "api", Region: "ams", IP: at(1, 1, 3), Started: false},
			{ID: "s1", App: "secret", Region: "ams", IP: at(2, 1, 2), Started: true},
		},
	}
}

// TestOrgView: a machine of org 1 resolves its org's names, not org 2's
// (NXDOMAIN, as a name that does not exist), and _apps.internal lists its
// org's apps only; org 2 sees the other way round.
func TestOrgView(t *testing.T) {
	src := orgSource()
	org1, _ := layout.Place{Network: 7, Org: 1, Host: 1}.Addr(99)
	org2, _ := layout.Place{Network: 7, Org: 2, Host: 2}.Addr(99)
	otherNet, _ := layout.Place{Network: 8, Org: 1, Host: 1}.Addr(99)
	w1, w2, s1 := src.ins[0].IP, src.ins[1].IP, src.ins[3].IP
	for _, tc := range []struct {
		asker netip.Addr
		name  string
		qt    uint16
		want  string
	}{
		{org1, "web.internal.", dns.TypeAAAA, "NOERROR " + w1.String() + " " + w2.String()},
		{org1, "secret.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{org1, "s1.vm.secret.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{org1, "_apps.internal.", dns.TypeTXT, "NOERROR api,web"},
		{org2, "secret.internal.", dns.TypeAAAA, "NOERROR " + s1.String()},
		{org2, "web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{org2, "_apps.internal.", dns.TypeTXT, "NOERROR secret"},
		// The same org number in another network is another org.
		{otherNet, "web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{otherNet, "_apps.internal.", dns.TypeTXT, "NOERROR "},
	} {
		got := result(Answer(query(tc.name, tc.qt), OrgView(src, tc.asker)))
		if got != tc.want {
			t.Errorf("%s asks %s: %q, want %q", tc.asker, tc.name, got, tc.want)
		}
	}
}

// fakePacketConn delivers queries from chosen source addresses and keeps
// what the server sends back.
type fakePacketConn struct {
	in     chan packet
	mu     sync.Mutex
	out    map[string]chan []byte
	closed chan struct{}
	once   sync.Once
}

type packet struct {
	b    []byte
	from net.Addr
}

func newFakePacketConn() *fakePacketConn {
	return &fakePacketConn{in: make(chan packet, 16), out: map[string]chan []byte{}, closed: make(chan struct{})}
}

func (f *fakePacketConn) ReadFrom(b []byte) (int, net.Addr, error) {
	select {
	case p := <-f.in:
		return copy(b, p.b), p.from, nil
	case <-f.closed:
		return 0, nil, net.ErrClosed
	}
}

func (f *fakePacketConn) answers(from net.Addr) chan []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.out[from.String()] == nil {
		f.out[from.String()] = make(chan []byte, 16)
	}
	return f.out[from.String()]
}

func (f *fakePacketConn) WriteTo(b []byte, to net.Addr) (int, error) {
	f.answers(to) <- append([]byte(nil), b...)
	return len(b), nil
}

func (f *fakePacketConn) Close() error { f.once.Do(func() { close(f.closed) }); return nil }
func (f *fakePacketConn) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: layout.DNS.AsSlice(), Port: 53}
}
func (f *fakePacketConn) SetDeadline(time.Time) error      { return nil }
func (f *fakePacketConn) SetReadDeadline(time.Time) error  { return nil }
func (f *fakePacketConn) SetWriteDeadline(time.Time) error { return nil }

// ask sends q from src and waits for the answer; nil when none comes
// within wait.
func (f *fakePacketConn) ask(t *testing.T, src netip.Addr, q *dns.Msg, wait time.Duration) *dns.Msg {
	t.Helper()
	b, err := q.Pack()
	if err != nil {
		t.Fatal(err)
	}
	from := &net.UDPAddr{IP: src.AsSlice(), Port: 5353}
	f.in <- packet{b, from}
	select {
	case out := <-f.answers(from):
		r := new(dns.Msg)
		if err := r.Unpack(out); err != nil {
			t.Fatal(err)
		}
		return r
	case <-time.After(wait):
		return nil
	}
}

// TestMachinesServer: the machines' server answers .internal for the
// asker's org, forwards other names to the host's resolver, and answers
// nothing to a source that is not a machine of its network (no open
// resolver).
func TestMachinesServer(t *testing.T) {
	// The host's resolver: answers example.com.
	upstream, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	us := &dns.Server{PacketConn: upstream, Handler: dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		r := new(dns.Msg)
		r.SetReply(q)
		r.Answer = append(r.Answer, &dns.A{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 60}, A: net.IPv4(192, 0, 2, 7)})
		w.WriteMsg(r)
	})}
	go us.ActivateAndServe()
	defer us.Shutdown()
	fwd, err := ForwardTo(upstream.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	pc := newFakePacketConn()
	s, err := New(Config{Source: orgSource(), PacketConn: pc, Machines: &Machines{Network: 7, Forward: fwd}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	// Answers that must come come at once; the bound is only against a
	// hang (a loaded machine answers in milliseconds).
	const must = 10 * time.Second
	org1, _ := layout.Place{Network: 7, Org: 1, Host: 1}.Addr(99)
	if r := pc.ask(t, org1, query("_apps.internal.", dns.TypeTXT), must); r == nil || result(r) != "NOERROR api,web" {
		t.Errorf("_apps.internal from org 1: %v", r)
	}
	if r := pc.ask(t, org1, query("secret.internal.", dns.TypeAAAA), must); r == nil || r.Rcode != dns.RcodeNameError {
		t.Errorf("org 2's app from org 1: %v", r)
	}
	if r := pc.ask(t, org1, query("example.com.", dns.TypeA), must); r == nil || result(r) != "NOERROR 192.0.2.7" {
		t.Errorf("example.com from org 1: %v", r)
	}
	// Silence is the answer for strangers: a machine of another network,
	// the host's loopback. The wait is how long an answer would take at
	// most here (the same server answered the above within it).
	otherNet, _ := layout.Place{Network: 8, Org: 1, Host: 1}.Addr(99)
	for _, src := range []netip.Addr{otherNet, netip.MustParseAddr("::1"), netip.MustParseAddr("192.0.2.1")} {
		if r := pc.ask(t, src, query("example.com.", dns.TypeA), 500*time.Millisecond); r != nil {
			t.Errorf("%s was answered: %v", src, r)
		}
		if r := pc.ask(t, src, query("web.internal.", dns.TypeAAAA), 500*time.Millisecond); r != nil {
			t.Errorf("%s was answered: %v", src, r)
		}
	}
}
