package dns

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Two moments of one cluster: between them a machine moved from fra to syd
// (new address) and the network changed so that fra, not ams, is now the
// nearest region to the asking host. Any mix of the two — one moment's
// machines with the other's RTTs, or its app list — answers differently
// from both, which is what the tests below look for.
func viewBefore() *fakeSource {
	return &fakeSource{
		apps: []string{"web"},
		rtt:  map[string]time.Duration{"ams": 0, "fra": 10 * time.Millisecond, "syd": 250 * time.Millisecond},
		ins: []Instance{
			{ID: "a1", App: "web", Region: "ams", ProcessGroup: "app", IP: ip("fdaa::a1"), Started: true},
			{ID: "f1", App: "web", Region: "fra", ProcessGroup: "app", IP: ip("fdaa::f1"), Started: true},
		},
	}
}

func viewAfter() *fakeSource {
	return &fakeSource{
		apps: []string{"web", "db"},
		rtt:  map[string]time.Duration{"ams": 20 * time.Millisecond, "fra": 0, "syd": 5 * time.Millisecond},
		ins: []Instance{
			{ID: "a1", App: "web", Region: "ams", ProcessGroup: "app", IP: ip("fdaa::a1"), Started: true},
			{ID: "f1", App: "web", Region: "syd", ProcessGroup: "app", IP: ip("fdaa::51"), Started: true},
			{ID: "d1", App: "db", Region: "fra", ProcessGroup: "app", IP: ip("fdaa::d1"), Started: true},
		},
	}
}

// mixedView answers with one view's machines and another's RTTs and apps:
// what a query reading the live cluster several times could see across a
// swap.
type mixedView struct{ machines, rest View }

func (m mixedView) Instances(app string) []Instance         { return m.machines.Instances(app) }
func (m mixedView) Apps() []string                          { return m.rest.Apps() }
func (m mixedView) RTT(region string) (time.Duration, bool) { return m.rest.RTT(region) }

var viewQueries = []*dns.Msg{
	query("web.internal.", dns.TypeAAAA),
	query("top1.nearest.of.web.internal.", dns.TypeAAAA),
	query("fra.web.internal.", dns.TypeAAAA),
	query("vms.web.internal.", dns.TypeTXT),
	query("regions.web.internal.", dns.TypeTXT),
	query("_apps.internal.", dns.TypeTXT),
}

// TestAnswerOfAFixedView: Answer is a function of the query and the view.
func TestAnswerOfAFixedView(t *testing.T) {
	before, after := viewBefore(), viewAfter()
	want := map[string][2]string{
		"web.internal.":                 {"NOERROR fdaa::a1 fdaa::f1", "NOERROR fdaa::51 fdaa::a1"},
		"top1.nearest.of.web.internal.": {"NOERROR fdaa::a1", "NOERROR fdaa::51"},
		"fra.web.internal.":             {"NOERROR fdaa::f1", "NXDOMAIN "},
		"vms.web.internal.":             {"NOERROR a1 ams,f1 fra", "NOERROR a1 ams,f1 syd"},
		"regions.web.internal.":         {"NOERROR ams,fra", "NOERROR ams,syd"},
		"_apps.internal.":               {"NOERROR web", "NOERROR db,web"},
	}
	for _, q := range viewQueries {
		name := q.Question[0].Name
		for i, v := range []View{before, after} {
			got := result(Answer(q, v))
			if got != want[name][i] {
				t.Errorf("%s in view %d = %q, want %q", name, i, got, want[name][i])
			}
			if again := result(Answer(q, v)); again != got {
				t.Errorf("%s in view %d answered %q, then %q", name, i, got, again)
			}
		}
	}
	// The views are chosen so that a mix is seen: a query reading the
	// machines of one and the rest of the other answers unlike both.
	mixes := 0
	for _, q := range viewQueries {
		for _, m := range []View{mixedView{before, after}, mixedView{after, before}} {
			got := result(Answer(q, m))
			w := want[q.Question[0].Name]
			if got != w[0] && got != w[1] {
				mixes++
			}
		}
	}
	if mixes == 0 {
		t.Fatal("no query tells a mixed view from the two real ones")
	}
}

// swappingSource is a cluster whose snapshot is replaced every time it is
// read: each View call returns the other moment.
type swappingSource struct {
	views [2]View
	calls atomic.Int64
}

func (s *swappingSource) View() View {
	return s.views[(s.calls.Add(1)-1)%2]
}

// TestQueryReadsOneView: the server asks its Source once per query and
// answers from that view alone, even when the cluster changes after every
// read.
func TestQueryReadsOneView(t *testing.T) {
	before, after := viewBefore(), viewAfter()
	src := &swappingSource{views: [2]View{before, after}}
	for round := range 2 {
		for _, q := range viewQueries {
			b, err := q.Pack()
			if err != nil {
				t.Fatal(err)
			}
			n := src.calls.Load()
			out := reply(b, src, DefaultTTL, false)
			if calls := src.calls.Load() - n; calls != 1 {
				t.Fatalf("%s: the source was read %d times for one query", q.Question[0].Name, calls)
			}
			r := new(dns.Msg)
			if err := r.Unpack(out); err != nil {
				t.Fatal(err)
			}
			want := result(Answer(q, src.views[n%2]))
			if got := result(r); got != want {
				t.Errorf("round %d, %s = %q, want %q (the view it read)", round, q.Question[0].Name, got, want)
			}
		}
	}
}

// TestConcurrentQueriesSeeWholeViews: queries answered while the cluster is
// swapped concurrently each see one whole view (and, under -race, share the
// views safely). A query that read the live cluster more than once would
// be caught here only by chance; TestQueryReadsOneView catches it always.
func TestConcurrentQueriesSeeWholeViews(t *testing.T) {
	before, after := viewBefore(), viewAfter()
	var cur atomic.Pointer[fakeSource]
	cur.Store(before)
	src := sourceFunc(func() View { return cur.Load() })
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if i%2 == 0 {
				cur.Store(after)
			} else {
				cur.Store(before)
			}
		}
	}()
	defer func() { close(stop); wg.Wait() }()
	errs := make(chan string, 100)
	var qs sync.WaitGroup
	for range 4 {
		qs.Add(1)
		go func() {
			defer qs.Done()
			for range 100 {
				for _, q := range viewQueries {
					b, _ := q.Pack()
					r := new(dns.Msg)
					if err := r.Unpack(reply(b, src, DefaultTTL, false)); err != nil {
						errs <- err.Error()
						return
					}
					got := result(r)
					if got != result(Answer(q, before)) && got != result(Answer(q, after)) {
						select {
						case errs <- q.Question[0].Name + " = " + got + ", of neither view":
						default:
						}
						return
					}
				}
			}
		}()
	}
	qs.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

type sourceFunc func() View

func (f sourceFunc) View() View { return f() }
