package proxy

import (
	"context"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/proxy/route"
)

// attemptRecorder keeps the request ids of the edge's failed attempts by
// host (its "candidate failed" records) and passes every record on.
type attemptRecorder struct {
	next  slog.Handler
	mu    *sync.Mutex
	tried map[string][]string // host → request ids
}

func newAttemptRecorder(next slog.Handler) *attemptRecorder {
	return &attemptRecorder{next: next, mu: new(sync.Mutex), tried: map[string][]string{}}
}

func (h *attemptRecorder) Enabled(ctx context.Context, l slog.Level) bool { return true }

func (h *attemptRecorder) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "candidate failed" {
		var host, id string
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "host":
				host = a.Value.String()
			case "request_id":
				id = a.Value.String()
			}
			return true
		})
		h.mu.Lock()
		h.tried[host] = append(h.tried[host], id)
		h.mu.Unlock()
	}
	return h.next.Handle(ctx, r)
}

func (h *attemptRecorder) WithAttrs(as []slog.Attr) slog.Handler {
	return &attemptRecorder{next: h.next.WithAttrs(as), mu: h.mu, tried: h.tried}
}

func (h *attemptRecorder) WithGroup(g string) slog.Handler {
	return &attemptRecorder{next: h.next.WithGroup(g), mu: h.mu, tried: h.tried}
}

func (h *attemptRecorder) triedOn(host, id string) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Contains(h.tried[host], id)
}

// TestSilentHostSuspectedBeforeItsVerdict: fra-1 dies silent, 100 ms from
// the edge each way. A request that meets it waits its acknowledgement
// budget (50 ms plus two round trips: 450 ms) before the verdict; but the
// edge suspects fra-1 one round trip and a slack after that request was
// written, and a request sent then, preferring fra-1's machine, goes
// elsewhere without trying it (it would otherwise wait with the first for
// the verdict). The verdict opens fra-1's breaker, and its region-mate
// fra-2, alive, is neither suspected for it nor condemned: it serves.
func TestSilentHostSuspectedBeforeItsVerdict(t *testing.T) {
	const oneWay = 100 * time.Millisecond
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration {
		if from[:3] == to[:3] {
			return 0
		}
		return oneWay
	}})
	t.Cleanup(func() { n.Close() })
	for _, h := range []string{"ams-1", "fra-1", "fra-2"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	bh := map[string]string{}
	far := map[string]*Proxy{}
	for _, h := range []string{"fra-1", "fra-2"} {
		ln, err := n.Listen(h, 4380)
		if err != nil {
			t.Fatal(err)
		}
		bh[h] = ln.Addr().String()
		far[h] = startProxy(t, Config{HostID: h, Backhaul: ln, Dial: n.DialerFrom(h)})
	}
	hosts := []route.Host{
		{ID: "ams-1", Region: "ams", Status: route.HostAlive},
		{ID: "fra-1", Region: "fra", Status: route.HostAlive, RTT: 2 * oneWay},
		{ID: "fra-2", Region: "fra", Status: route.HostAlive, RTT: 2 * oneWay},
	}
	m1, m2, local := startBackend(t, "m-fra1"), startBackend(t, "m-fra2"), startBackend(t, "m-ams")
	ms := []route.Machine{machine("m-fra1", "fra-1", m1.addr), machine("m-fra2", "fra-2", m2.addr), machine("m-ams", "ams-1", local.addr)}
	rec := newAttemptRecorder(testLogger(t).Handler())
	edge := startProxy(t, Config{HostID: "ams-1", Dial: n.DialerFrom("ams-1"), Logger: slog.New(rec)})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: hosts, Machines: ms}, bh)
	for h, p := range far {
		p.setState(route.Facts{Self: h, Region: "fra", Hosts: hosts, Machines: ms}, bh)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	prefer := map[string]string{"Fly-Prefer-Instance-Id": "m-fra1"}
	type answer struct {
		status      int
		machine, id string
	}
	ask := func() answer {
		resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", prefer)
		a := answer{status: resp.StatusCode, id: resp.Header.Get("Fly-Request-Id")}
		if a.status == 200 {
			a.machine = decode(t, body).Machine
		}
		return a
	}
	// Warm: fra-1 answers, the edge pools a connection to it and learns
	// how long its acknowledgements take (steadily, a round trip).
	for range 12 {
		if a := ask(); a.status != 200 || a.machine != "m-fra1" {
			t.Fatalf("before fra-1 dies: %+v, want 200 from m-fra1", a)
		}
	}
	if allow := edge.words.allowance("fra-1", 2*oneWay); allow >= edge.ackBudget(&route.Target{Host: "fra-1", RTT: 2 * oneWay}) {
		t.Fatalf("after a dozen answers fra-1's allowance %v is not below its acknowledgement budget", allow)
	}

	n.Kill("fra-1")
	first := make(chan answer, 1)
	go func() { first <- ask() }()
	waitFor(t, "fra-1 suspect or its breaker open", func() bool {
		_, st := edge.strikes.states("", "fra-1")
		return edge.suspicion.has("fra-1") || st != stateClosed
	})
	if _, st := edge.strikes.states("", "fra-1"); st != stateClosed {
		t.Fatalf("fra-1's breaker %v before it was seen suspect: the verdict came first", st)
	}
	second := ask()
	if second.status != 200 || second.machine == "m-fra1" {
		t.Fatalf("request sent while fra-1 was suspect: %+v", second)
	}
	if rec.triedOn("fra-1", second.id) {
		t.Errorf("request %s sent while fra-1 was suspect tried fra-1 first", second.id)
	}
	if a := <-first; a.status != 200 || a.machine == "m-fra1" {
		t.Fatalf("request in flight when fra-1 died: %+v", a)
	}
	if rec.mu.Lock(); len(rec.tried["fra-1"]) == 0 {
		t.Error("the request that met fra-1 recorded no failed attempt on it")
	}
	rec.mu.Unlock()

	// The verdict: fra-1's breaker opens; its region-mate is not
	// suspected for it, and serves.
	waitHostBreaker(t, edge, "fra-1", stateOpen)
	if edge.suspicion.has("fra-2") {
		t.Error("fra-2 suspected for its region-mate's silence")
	}
	if _, st := edge.strikes.states("", "fra-2"); st != stateClosed {
		t.Errorf("fra-2, alive, has its breaker %v", st)
	}
	prefer = map[string]string{"Fly-Prefer-Instance-Id": "m-fra2"}
	if resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", prefer); resp.StatusCode != 200 || decode(t, body).Machine != "m-fra2" {
		t.Errorf("fra-2 after fra-1's verdict: %d %s, want 200 from m-fra2", resp.StatusCode, body)
	}
}

// TestSlowHostSuspectedNotCondemned: a live host whose round trip is far
// longer than the edge measured (20 ms measured, 60 ms real) is suspect
// while the first request waits for its acknowledgement (until the edge
// has learnt how long the host's words take), but it is heard from before
// any budget runs out: every request preferring its machine is answered
// by it, none moves, its breaker never opens, and no suspicion is left
// once the requests are answered.
func TestSlowHostSuspectedNotCondemned(t *testing.T) {
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return 30 * time.Millisecond }})
	t.Cleanup(func() { n.Close() })
	for _, h := range []string{"ams-1", "fra-1"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	ln, err := n.Listen("fra-1", 4380)
	if err != nil {
		t.Fatal(err)
	}
	bh := map[string]string{"fra-1": ln.Addr().String()}
	hosts := []route.Host{
		{ID: "ams-1", Region: "ams", Status: route.HostAlive},
		{ID: "fra-1", Region: "fra", Status: route.HostAlive, RTT: 20 * time.Millisecond},
	}
	mf, local := startBackend(t, "m-fra"), startBackend(t, "m-ams")
	ms := []route.Machine{machine("m-fra", "fra-1", mf.addr), machine("m-ams", "ams-1", local.addr)}
	// A budget no scheduling delay reaches: what is tested is that
	// suspicion alone moves nothing.
	edge := startProxy(t, Config{HostID: "ams-1", Dial: n.DialerFrom("ams-1"), AckTimeout: 5 * time.Second, ConnectTimeout: 10 * time.Second})
	fp := startProxy(t, Config{HostID: "fra-1", Backhaul: ln, Dial: n.DialerFrom("fra-1")})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: hosts, Machines: ms}, bh)
	fp.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: hosts, Machines: ms}, bh)
	client := &http.Client{Timeout: 30 * time.Second}
	prefer := map[string]string{"Fly-Prefer-Instance-Id": "m-fra"}
	suspected := false
	stop := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
			if edge.suspicion.has("fra-1") {
				suspected = true
			}
		}
	}()
	for i := range 5 {
		resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", prefer)
		if resp.StatusCode != 200 || decode(t, body).Machine != "m-fra" {
			t.Fatalf("request %d: %d %s, want 200 from m-fra", i, resp.StatusCode, body)
		}
	}
	close(stop)
	<-watched
	if !suspected {
		t.Error("fra-1 was never suspect, though each acknowledgement came two round trips late")
	}
	if _, st := edge.strikes.states("", "fra-1"); st != stateClosed {
		t.Errorf("fra-1's breaker %v", st)
	}
	waitFor(t, "fra-1's suspicion cleared", func() bool { return !edge.suspicion.has("fra-1") })
	if mf.hits.Load() != 5 {
		t.Errorf("m-fra took %d requests, want 5", mf.hits.Load())
	}
}

// TestHeartbeatSuspectsQuietRegionMate: the edge sends nothing to its
// region-mate ams-2 when ams-2 dies silent; its heartbeats (heartbeat.go)
// find it: ams-2 is suspect, then found silent by its probe, and the first
// request preferring ams-2's machine goes to ams-1's own without trying
// ams-2 — it never meets the dead host, though no request had before it.
// A region-mate that answers its heartbeats is never suspect for long: ams-3,
// alive throughout, ends the test unsuspected with its breaker closed.
func TestHeartbeatSuspectsQuietRegionMate(t *testing.T) {
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return 500 * time.Microsecond }})
	t.Cleanup(func() { n.Close() })
	for _, h := range []string{"ams-1", "ams-2", "ams-3"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	hosts := []route.Host{
		{ID: "ams-1", Region: "ams", Status: route.HostAlive},
		{ID: "ams-2", Region: "ams", Status: route.HostAlive, RTT: time.Millisecond},
		{ID: "ams-3", Region: "ams", Status: route.HostAlive, RTT: time.Millisecond},
	}
	m2, m3, local := startBackend(t, "m-2"), startBackend(t, "m-3"), startBackend(t, "m-1")
	ms := []route.Machine{machine("m-2", "ams-2", m2.addr), machine("m-3", "ams-3", m3.addr), machine("m-1", "ams-1", local.addr)}
	bh := map[string]string{}
	far := map[string]*Proxy{}
	for _, h := range []string{"ams-2", "ams-3"} {
		ln, err := n.Listen(h, 4380)
		if err != nil {
			t.Fatal(err)
		}
		bh[h] = ln.Addr().String()
		far[h] = startProxy(t, Config{HostID: h, Backhaul: ln, Dial: n.DialerFrom(h), HeartbeatInterval: -1})
	}
	rec := newAttemptRecorder(testLogger(t).Handler())
	edge := startProxy(t, Config{HostID: "ams-1", Dial: n.DialerFrom("ams-1"), Logger: slog.New(rec)})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: hosts, Machines: ms}, bh)
	for h, p := range far {
		p.setState(route.Facts{Self: h, Region: "ams", Hosts: hosts, Machines: ms}, bh)
	}
	client := &http.Client{Timeout: 30 * time.Second}
	if resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": "m-2"}); resp.StatusCode != 200 || decode(t, body).Machine != "m-2" {
		t.Fatalf("before ams-2 dies: %d %s", resp.StatusCode, body)
	}
	n.Kill("ams-2")
	waitFor(t, "ams-2 suspect or its breaker open", func() bool {
		_, st := edge.strikes.states("", "ams-2")
		return edge.suspicion.has("ams-2") || st != stateClosed
	})
	resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": "m-2"})
	if resp.StatusCode != 200 || decode(t, body).Machine == "m-2" {
		t.Fatalf("after ams-2 died: %d %s", resp.StatusCode, body)
	}
	if id := resp.Header.Get("Fly-Request-Id"); rec.triedOn("ams-2", id) {
		t.Errorf("request %s tried the dead ams-2, which the heartbeats had found", id)
	}
	waitHostBreaker(t, edge, "ams-2", stateOpen) // the suspicion's probe: the verdict
	waitFor(t, "ams-3 unsuspected", func() bool { return !edge.suspicion.has("ams-3") })
	if _, st := edge.strikes.states("", "ams-3"); st != stateClosed {
		t.Errorf("ams-3, alive, has its breaker %v", st)
	}
	if resp, body := get(t, client, edge.EdgeAddr(), "demo.localhost", map[string]string{"Fly-Prefer-Instance-Id": "m-3"}); resp.StatusCode != 200 || decode(t, body).Machine != "m-3" {
		t.Errorf("ams-3: %d %s, want 200 from m-3", resp.StatusCode, body)
	}
}

// TestAllowanceLearnt: how long a host's first word may take is the
// larger of suspectAfter its measured round trip and what its words taught
// (RFC 6298's estimator: smoothed round trip plus four mean deviations plus
// the slack): steady answers keep it at the floor, late ones widen it, and
// it narrows again as answers come steadily; a host with no measured round
// trip is never suspected early.
func TestAllowanceLearnt(t *testing.T) {
	ms := time.Millisecond
	var w hostWords
	rtt := ms
	floor := suspectAfter(rtt)
	if got := w.allowance("ams-2", rtt); got != floor {
		t.Fatalf("allowance %v before any word, want %v", got, floor)
	}
	for range 50 {
		w.sample("ams-2", ms)
	}
	if got := w.allowance("ams-2", rtt); got != floor {
		t.Errorf("steady 1 ms words: allowance %v, want the floor %v", got, floor)
	}
	w.sample("ams-2", 40*ms) // this machine was busy
	late := w.allowance("ams-2", rtt)
	if late < floor+30*ms {
		t.Errorf("after a 40 ms word: allowance %v, want above %v", late, floor+30*ms)
	}
	if got := w.allowance("ams-3", rtt); got != floor {
		t.Errorf("another host's allowance %v, want %v", got, floor)
	}
	for range 50 {
		w.sample("ams-2", ms)
	}
	if got := w.allowance("ams-2", rtt); got >= late || got > floor+ms {
		t.Errorf("after steady words again: allowance %v, want back near %v", got, floor)
	}
	if got := w.allowance("ams-2", 0); got != 0 {
		t.Errorf("no measured round trip: allowance %v, want 0 (never early)", got)
	}
}

// TestSuspectClockRechecks: when a host's allowance runs out, the edge
// looks once more before it suspects the host (a word may wait unread on
// a busy machine); a clock stopped meanwhile — the word was read — never
// suspects, and one reset by a word starts its allowance again.
func TestSuspectClockRechecks(t *testing.T) {
	p := &Proxy{cfg: Config{HostID: "ams-1"}, log: slog.New(slog.DiscardHandler), probes: newProber()}
	c := p.suspectTimer("fra-1", time.Millisecond, "test")
	waitFor(t, "fra-1 suspect", func() bool { return p.suspicion.has("fra-1") })
	c.mu.Lock()
	if !c.rechecked {
		t.Error("suspected without looking again")
	}
	c.mu.Unlock()

	// The allowance ran out an hour ago, and this edge was stalled that
	// long: it looks again for as long before it suspects.
	c = p.suspectTimer("fra-2", time.Hour, "test")
	c.mu.Lock()
	c.due = time.Now().Add(-time.Hour)
	c.t.Reset(0)
	c.mu.Unlock()
	waitFor(t, "the recheck armed", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.rechecked
	})
	c.mu.Lock()
	if time.Until(c.due) < 59*time.Minute {
		t.Errorf("recheck due in %v, want the hour the edge was late", time.Until(c.due))
	}
	c.mu.Unlock()
	c.Stop() // the word is read during the recheck
	time.Sleep(20 * time.Millisecond)
	if p.suspicion.has("fra-2") {
		t.Error("fra-2 suspected though its word came during the recheck")
	}
	c = p.suspectTimer("fra-3", time.Hour, "test")
	c.Reset(time.Hour)
	if c.rechecked || p.suspicion.has("fra-3") || time.Until(c.due) < 59*time.Minute {
		t.Error("a reset clock did not start its allowance again")
	}
	c.Stop()
	if p.suspectTimer("fra-4", 0, "test") != nil {
		t.Error("a zero allowance (round trip unknown) still made a clock")
	}
}

// TestSuspicionCrossesRegionsOnlyWhenTheRegionLooksDead: at an iad edge
// preferring ams, a suspect ams host's machines go after the other ams
// host's, still before iad's: a doubt alone, which a busy machine raises
// now and then, never sends a request across the ocean. Once every ams
// host is suspect or found silent — the region looks dead — iad's
// machines go first — if they fell silent within one allowance of each
// other (a region dies at once), and unless the edge suspects a host of
// its own region too (the doubt is then its own). A region of one host
// never looks dead for a suspicion alone, and the edge's own region never
// looks dead to it.
func TestSuspicionCrossesRegionsOnlyWhenTheRegionLooksDead(t *testing.T) {
	b := startBackend(t, "any")
	hosts := []route.Host{
		{ID: "iad-1", Region: "iad", Status: route.HostAlive},
		{ID: "iad-2", Region: "iad", Status: route.HostAlive, RTT: time.Millisecond},
		{ID: "ams-1", Region: "ams", Status: route.HostAlive, RTT: 90 * time.Millisecond},
		{ID: "ams-2", Region: "ams", Status: route.HostAlive, RTT: 91 * time.Millisecond},
	}
	ms := []route.Machine{machine("a1", "ams-1", b.addr), machine("a2", "ams-2", b.addr), machine("i1", "iad-1", b.addr), machine("i2", "iad-2", b.addr)}
	edge := startProxy(t, Config{HostID: "iad-1", HeartbeatInterval: -1})
	edge.setState(route.Facts{Self: "iad-1", Region: "iad", Hosts: hosts, Machines: ms},
		map[string]string{"ams-1": "10.0.0.1:4380", "ams-2": "10.0.0.2:4380", "iad-2": "10.0.1.2:4380"})
	order := func(q route.Query) []string {
		var buf [route.MaxCandidates]*route.Target
		var out []string
		for _, tg := range edge.Table().Select("demo", q, routeInput{edge}, buf[:0]) {
			out = append(out, tg.MachineID)
		}
		return out
	}
	ams := route.Query{Port: 80, PreferRegion: "ams"}
	edge.suspicion.suspect("ams-1")
	if got := order(ams); !slices.Equal(got[:2], []string{"a2", "a1"}) {
		t.Errorf("ams-1 suspect: %v, want a2 then a1 before iad", got)
	}
	edge.strikes.fail("", "ams-2", weightConnect) // found silent
	if got := order(ams); got[0] == "a1" || got[0] == "a2" || !slices.Equal(got[2:], []string{"a1", "a2"}) && !slices.Equal(got[2:], []string{"a2", "a1"}) {
		t.Errorf("ams-1 suspect, ams-2 silent: %v, want iad's machines first", got)
	}
	// The edge doubts a host of its own region too: the doubt is its own.
	edge.suspicion.suspect("iad-2")
	if got := order(ams); got[0] != "a1" {
		t.Errorf("ams-1 and iad-2 suspect, ams-2 silent: %v, want a1 first", got)
	}
	edge.suspicion.heard("iad-2")
	edge.suspicion.heard("ams-1")
	if got := order(ams); got[0] != "a1" {
		t.Errorf("ams-1 heard from, ams-2 silent: %v, want a1 first", got)
	}
	// ams-2 fell silent ten seconds ago; ams-1 flickers now: no region
	// dies that slowly.
	edge.strikes.mu.Lock()
	edge.strikes.host["ams-2"].opened = time.Now().Add(-10 * time.Second)
	edge.strikes.mu.Unlock()
	edge.suspicion.suspect("ams-1")
	if got := order(ams); got[0] != "a1" {
		t.Errorf("ams-2 silent long ago, ams-1 suspect now: %v, want a1 first", got)
	}
	edge.suspicion.heard("ams-1")
	// A region of one host never looks dead for a suspicion alone.
	edge.setState(route.Facts{Self: "iad-1", Region: "iad", Hosts: hosts[:3], Machines: ms[:3]},
		map[string]string{"ams-1": "10.0.0.1:4380"})
	edge.suspicion.suspect("ams-1")
	if got := order(ams); got[0] != "a1" {
		t.Errorf("ams-1, alone in ams, suspect: %v, want a1 first", got)
	}
	edge.setState(route.Facts{Self: "iad-1", Region: "iad", Hosts: hosts, Machines: ms},
		map[string]string{"ams-1": "10.0.0.1:4380", "ams-2": "10.0.0.2:4380", "iad-2": "10.0.1.2:4380"})
	edge.suspicion.suspect("iad-2")
	if got := order(route.Query{Port: 80}); !slices.Equal(got[:2], []string{"i1", "i2"}) {
		t.Errorf("iad-2 suspect at its own region's edge: %v, want i1 then i2 before ams", got)
	}
}
