package dns

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fakeSource is a fixed view of the cluster.
type fakeSource struct {
	ins  []Instance
	apps []string
	rtt  map[string]time.Duration
}

func (f *fakeSource) Instances(app string) []Instance {
	var out []Instance
	for _, in := range f.ins {
		if in.App == app {
			out = append(out, in)
		}
	}
	return out
}

// View returns the source itself: it never changes.
func (f *fakeSource) View() View { return f }

func (f *fakeSource) Apps() []string { return f.apps }

func (f *fakeSource) RTT(region string) (time.Duration, bool) {
	d, ok := f.rtt[region]
	return d, ok
}

func ip(s string) netip.Addr { return netip.MustParseAddr(s) }

// testSource: app "web" in three regions (ams local, fra near, syd far, and
// sin with no known RTT), plus a stopped machine and an app with none started.
func testSource() *fakeSource {
	return &fakeSource{
		apps: []string{"web", "db", "idle"},
		rtt:  map[string]time.Duration{"ams": 0, "fra": 10 * time.Millisecond, "syd": 250 * time.Millisecond},
		ins: []Instance{
			{ID: "e2865013", App: "web", Region: "syd", ProcessGroup: "app", IP: ip("fdaa:0:1:a7b:3::2"), Started: true},
			{ID: "a1000001", App: "web", Region: "fra", ProcessGroup: "app", IP: ip("fdaa:0:1:a7b:2::2"), Started: true},
			{ID: "b2000002", App: "web", Region: "ams", ProcessGroup: "worker", IP: ip("fdaa:0:1:a7b:1::3"), Started: true},
			{ID: "a2000001", App: "web", Region: "ams", ProcessGroup: "app", IP: ip("fdaa:0:1:a7b:1::2"), Started: true},
			{ID: "c3000003", App: "web", Region: "sin", ProcessGroup: "app", IP: ip("fdaa:0:1:a7b:4::2"), Started: true},
			{ID: "d4000004", App: "web", Region: "lhr", ProcessGroup: "cron", IP: ip("fdaa:0:1:a7b:5::2"), Started: false},
			{ID: "f5000005", App: "db", Region: "ams", ProcessGroup: "app", IP: ip("fdaa:0:1:b00:1::2"), Started: true},
			{ID: "f6000006", App: "idle", Region: "ams", ProcessGroup: "app", IP: ip("fdaa:0:1:c00:1::2"), Started: false},
		},
	}
}

func query(name string, t uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(name, t)
	m.Id = 4242
	return m
}

// result summarises an answer: rcode, then each answer's data.
func result(r *dns.Msg) string {
	var parts []string
	for _, rr := range r.Answer {
		switch rr := rr.(type) {
		case *dns.AAAA:
			parts = append(parts, rr.AAAA.String())
		case *dns.A:
			parts = append(parts, rr.A.String())
		case *dns.TXT:
			parts = append(parts, strings.Join(rr.Txt, ""))
		default:
			parts = append(parts, rr.String())
		}
	}
	return dns.RcodeToString[r.Rcode] + " " + strings.Join(parts, " ")
}

func TestAnswerNames(t *testing.T) {
	src := testSource()
	const (
		ams1 = "fdaa:0:1:a7b:1::2" // a2000001, group app
		ams2 = "fdaa:0:1:a7b:1::3" // b2000002, group worker
		fra  = "fdaa:0:1:a7b:2::2"
		syd  = "fdaa:0:1:a7b:3::2"
		sin  = "fdaa:0:1:a7b:4::2"
	)
	all := strings.Join([]string{ams1, ams2, fra, syd, sin}, " ")
	tests := []struct {
		name string
		t    uint16
		want string
	}{
		{"web.internal.", dns.TypeAAAA, "NOERROR " + all},
		{"global.web.internal.", dns.TypeAAAA, "NOERROR " + all},
		{"WeB.InTeRnAl.", dns.TypeAAAA, "NOERROR " + all},
		{"web.internal", dns.TypeAAAA, "NOERROR " + all}, // not fully qualified
		{"ams.web.internal.", dns.TypeAAAA, "NOERROR " + ams1 + " " + ams2},
		{"FRA.web.internal.", dns.TypeAAAA, "NOERROR " + fra},
		{"lhr.web.internal.", dns.TypeAAAA, "NOERROR "}, // only a stopped machine there
		{"jnb.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"top1.nearest.of.web.internal.", dns.TypeAAAA, "NOERROR " + ams1},
		{"top3.nearest.of.web.internal.", dns.TypeAAAA, "NOERROR " + ams1 + " " + ams2 + " " + fra},
		{"top4.nearest.of.web.internal.", dns.TypeAAAA, "NOERROR " + ams1 + " " + ams2 + " " + fra + " " + syd},
		{"top99.nearest.of.web.internal.", dns.TypeAAAA, "NOERROR " + all},
		{"TOP2.Nearest.Of.web.internal.", dns.TypeAAAA, "NOERROR " + ams1 + " " + ams2},
		{"top0.nearest.of.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"top.nearest.of.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"top-1.nearest.of.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"top99999.nearest.of.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"top2.nearest.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"e2865013.vm.web.internal.", dns.TypeAAAA, "NOERROR " + syd},
		{"E2865013.VM.web.internal.", dns.TypeAAAA, "NOERROR " + syd},
		{"d4000004.vm.web.internal.", dns.TypeAAAA, "NOERROR "}, // stopped
		{"ffffffff.vm.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"f5000005.vm.web.internal.", dns.TypeAAAA, "NXDOMAIN "}, // another app's machine
		{"app.process.web.internal.", dns.TypeAAAA, "NOERROR " + ams1 + " " + fra + " " + syd + " " + sin},
		{"worker.process.web.internal.", dns.TypeAAAA, "NOERROR " + ams2},
		{"cron.process.web.internal.", dns.TypeAAAA, "NOERROR "},
		{"nope.process.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"vms.web.internal.", dns.TypeTXT, "NOERROR a1000001 fra,a2000001 ams,b2000002 ams,c3000003 sin,e2865013 syd"},
		{"regions.web.internal.", dns.TypeTXT, "NOERROR ams,fra,sin,syd"},
		{"_apps.internal.", dns.TypeTXT, "NOERROR db,idle,web"},
		{"_APPS.internal.", dns.TypeTXT, "NOERROR db,idle,web"},
		{"db.internal.", dns.TypeAAAA, "NOERROR fdaa:0:1:b00:1::2"},
		{"idle.internal.", dns.TypeAAAA, "NOERROR "},
		{"vms.idle.internal.", dns.TypeTXT, "NOERROR "},
		{"regions.idle.internal.", dns.TypeTXT, "NOERROR "},
		{"nope.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"vms.nope.internal.", dns.TypeTXT, "NXDOMAIN "},
		{"a.b.c.d.e.web.internal.", dns.TypeAAAA, "NXDOMAIN "},
		{"internal.", dns.TypeAAAA, "NOERROR "},
		// The wrong type on an existing name is NODATA.
		{"web.internal.", dns.TypeA, "NOERROR "},
		{"web.internal.", dns.TypeTXT, "NOERROR "},
		{"vms.web.internal.", dns.TypeAAAA, "NOERROR "},
		{"e2865013.vm.web.internal.", dns.TypeA, "NOERROR "},
		{"e2865013.vm.web.internal.", dns.TypeANY, "NOERROR " + syd},
		// Outside the zone.
		{"example.com.", dns.TypeA, "REFUSED "},
		{"internal.example.com.", dns.TypeA, "REFUSED "},
		{"xinternal.", dns.TypeA, "REFUSED "},
		{".", dns.TypeNS, "REFUSED "},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%s", tt.name, dns.TypeToString[tt.t]), func(t *testing.T) {
			q := query(tt.name, tt.t)
			r := Answer(q, src)
			if got := result(r); got != tt.want {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
			if r.Id != q.Id || !r.Response {
				t.Errorf("reply header %+v does not answer query %d", r.MsgHdr, q.Id)
			}
			for _, rr := range r.Answer {
				if rr.Header().Name != tt.name && rr.Header().Name != dns.Fqdn(tt.name) {
					t.Errorf("answer owner %q, want the question's %q", rr.Header().Name, tt.name)
				}
				if rr.Header().Ttl != 5 {
					t.Errorf("ttl %d, want 5", rr.Header().Ttl)
				}
			}
			if r.Rcode != dns.RcodeRefused && !r.Authoritative {
				t.Error("answer for the zone is not authoritative")
			}
			if (r.Rcode == dns.RcodeNameError || (r.Rcode == dns.RcodeSuccess && len(r.Answer) == 0)) &&
				(len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != dns.TypeSOA) {
				t.Errorf("negative answer without the SOA: %v", r.Ns)
			}
		})
	}
}

func TestAnswerNearestTies(t *testing.T) {
	// Equal RTTs are ordered by region, then ID; unknown RTTs come last.
	src := &fakeSource{
		apps: []string{"a"},
		rtt:  map[string]time.Duration{"fra": 5 * time.Millisecond, "ams": 5 * time.Millisecond, "cdg": 6 * time.Millisecond},
		ins: []Instance{
			{ID: "02", App: "a", Region: "fra", IP: ip("fd00::2"), Started: true},
			{ID: "01", App: "a", Region: "fra", IP: ip("fd00::1"), Started: true},
			{ID: "09", App: "a", Region: "ams", IP: ip("fd00::9"), Started: true},
			{ID: "03", App: "a", Region: "aaa", IP: ip("fd00::3"), Started: true}, // unknown RTT
			{ID: "04", App: "a", Region: "cdg", IP: ip("fd00::4"), Started: true},
		},
	}
	want := "NOERROR fd00::9 fd00::1 fd00::2 fd00::4 fd00::3"
	if got := result(Answer(query("top5.nearest.of.a.internal.", dns.TypeAAAA), src)); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	want = "NOERROR fd00::9 fd00::1"
	if got := result(Answer(query("top2.nearest.of.a.internal.", dns.TypeAAAA), src)); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

func TestAnswerIPv4AndDuplicates(t *testing.T) {
	src := &fakeSource{ins: []Instance{
		{ID: "1", App: "a", Region: "ams", IP: ip("127.0.0.2"), Started: true},
		{ID: "2", App: "a", Region: "ams", IP: ip("::ffff:127.0.0.3"), Started: true},
		{ID: "3", App: "a", Region: "ams", IP: ip("fd00::3"), Started: true},
		{ID: "4", App: "a", Region: "ams", IP: ip("fd00::3"), Started: true}, // same address twice
		{ID: "5", App: "a", Region: "ams", Started: true},                    // no address yet
	}}
	for _, tt := range []struct {
		t    uint16
		want string
	}{
		{dns.TypeA, "NOERROR 127.0.0.2 127.0.0.3"},
		{dns.TypeAAAA, "NOERROR fd00::3"},
	} {
		if got := result(Answer(query("a.internal.", tt.t), src)); got != tt.want {
			t.Errorf("%s: got %q, want %q", dns.TypeToString[tt.t], got, tt.want)
		}
	}
}

func TestAnswerLongTXT(t *testing.T) {
	src := &fakeSource{}
	var want []string
	for i := range 100 {
		id := fmt.Sprintf("%014x", i)
		src.ins = append(src.ins, Instance{ID: id, App: "big", Region: "ams", IP: ip(fmt.Sprintf("fd00::%x", i+1)), Started: true})
		want = append(want, id+" ams")
	}
	r := Answer(query("vms.big.internal.", dns.TypeTXT), src)
	if len(r.Answer) != 1 {
		t.Fatalf("want one TXT record, got %d", len(r.Answer))
	}
	txt := r.Answer[0].(*dns.TXT).Txt
	for _, s := range txt {
		if len(s) > 255 {
			t.Fatalf("character-string of %d bytes", len(s))
		}
	}
	if got := strings.Join(txt, ""); got != strings.Join(want, ",") {
		t.Errorf("joined TXT = %q", got)
	}
	if _, err := r.Pack(); err != nil {
		t.Fatal(err)
	}
}

func TestAnswerMalformed(t *testing.T) {
	src := testSource()
	two := query("web.internal.", dns.TypeAAAA)
	two.Question = append(two.Question, two.Question[0])
	notify := query("web.internal.", dns.TypeAAAA)
	notify.Opcode = dns.OpcodeNotify
	none := query("web.internal.", dns.TypeAAAA)
	none.Question = nil
	chaos := query("web.internal.", dns.TypeTXT)
	chaos.Question[0].Qclass = dns.ClassCHAOS
	badVers := query("web.internal.", dns.TypeAAAA)
	badVers.SetEdns0(4096, false)
	badVers.IsEdns0().SetVersion(1)

	for _, tt := range []struct {
		name string
		q    *dns.Msg
		want int
	}{
		{"nil", nil, dns.RcodeFormatError},
		{"two questions", two, dns.RcodeFormatError},
		{"no question", none, dns.RcodeFormatError},
		{"notify", notify, dns.RcodeNotImplemented},
		{"chaos", chaos, dns.RcodeRefused},
		{"edns version 1", badVers, dns.RcodeBadVers},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := Answer(tt.q, src)
			if r.Rcode != tt.want {
				t.Errorf("rcode %s, want %s", dns.RcodeToString[r.Rcode], dns.RcodeToString[tt.want])
			}
			if len(r.Answer) != 0 {
				t.Errorf("answers %v", r.Answer)
			}
			if _, err := r.Pack(); err != nil {
				t.Errorf("pack: %v", err)
			}
		})
	}
}

func TestAnswerEDNS(t *testing.T) {
	q := query("web.internal.", dns.TypeAAAA)
	q.SetEdns0(4096, false)
	r := Answer(q, testSource())
	opt := r.IsEdns0()
	if opt == nil || opt.UDPSize() != ednsSize {
		t.Fatalf("reply OPT = %v, want one advertising %d", opt, ednsSize)
	}
	if r := Answer(query("web.internal.", dns.TypeAAAA), testSource()); r.IsEdns0() != nil {
		t.Error("OPT in reply to a query without one")
	}
}

func TestAnswerTTL(t *testing.T) {
	r := answer(query("web.internal.", dns.TypeAAAA), testSource(), 30*time.Second)
	if len(r.Answer) == 0 || slices.ContainsFunc(r.Answer, func(rr dns.RR) bool { return rr.Header().Ttl != 30 }) {
		t.Errorf("answers %v, want TTL 30", r.Answer)
	}
}
