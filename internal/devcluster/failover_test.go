package devcluster

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/proxy/route"
)

// Failover under load. One cluster of two regions, ams and iad, three hosts
// each (the first of each has the region's edge), two demo machines on
// every host, none restarted by its host when it dies. Three clients send
// GETs at a steady rate with bounded concurrency, each request doing a
// little work on its machine (?delay), and record every answer:
//
//   - "ams edge": straight to the ams edge;
//   - "global": through the global entry, from a client in ams;
//   - "iad edge, prefer ams": to the iad edge with fly-prefer-region: ams,
//     so the iad edge delivers to ams over the backhaul, 94 ms away.
//
// Then, a phase apart and with the load running throughout: one machine of
// ams-2 is killed (SIGKILL); the host ams-3 is killed (silent, its machines
// gone); the "ams edge" client stops (its edge is about to die) and every
// host of ams is killed. No request may fail.
//
// What is measured, per fault and client (failoverReport):
//
//   - the fault's instant F: when the fault began (before the first
//     process was killed or host silenced);
//   - "last touch": from F to the last attempt an edge made on a dead
//     target (the killed machine, a machine of a killed host) and saw fail
//     — a refused or reset connection, the far host saying the machine is
//     gone, a connect or acknowledgement that timed out. Every request sent
//     after it is served elsewhere on its first attempt. It is read from the
//     edges' own record of failed attempts (the proxy's "candidate failed"
//     log record), over all edges, so it is per fault, not per client;
//   - "first touch": from F to the first such failed attempt — when an
//     edge first met the fault and moved a request on;
//   - p50/p99 latency of the requests sent and answered in the second
//     before F (before), sent in the second after F (during), and sent
//     from then on (after), each answered before the next fault (a
//     request in flight at a fault counts for that fault).

// failoverOpts sizes a failover run.
type failoverOpts struct {
	rate        int           // requests per second, per client
	concurrency int           // requests in flight at most, per client
	work        time.Duration // each request's delay on its machine
	phase       time.Duration // from one fault to the next
}

// loadClient is one client of the run: a load with a name.
type loadClient struct {
	name   string
	url    string
	header map[string]string
	opts   failoverOpts
	load   *Load
}

func (lc *loadClient) start(client *http.Client) {
	lc.load = StartLoad(LoadConfig{URL: lc.url, Header: lc.header, Rate: lc.opts.rate,
		Concurrency: lc.opts.concurrency, Work: lc.opts.work, Client: client})
}

// halt stops sending and waits for the requests in flight.
func (lc *loadClient) halt() { lc.load.Halt() }

func (lc *loadClient) all() []Sample { return lc.load.Samples() }

// attemptLog records the edges' failed attempts (the proxy's "candidate
// failed" records) and passes warnings on to the test's log.
type attemptLog struct {
	next  slog.Handler
	attrs []slog.Attr
	rec   *attempts
}

type attempts struct {
	mu     sync.Mutex
	failed []failedAttempt
	// suspected are the edges' suspicions of hosts (the proxy's "host
	// suspect" records): host is the suspect, err why.
	suspected []failedAttempt
}

type failedAttempt struct {
	at                  time.Time
	edge, machine, host string // the edge's host, the machine, its host
	request             string // the request's Fly-Request-Id
	err                 string
}

func (h *attemptLog) Enabled(ctx context.Context, l slog.Level) bool { return true }

func (h *attemptLog) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "candidate failed" || r.Message == "host suspect" {
		fa := failedAttempt{at: r.Time}
		for _, a := range h.attrs {
			if a.Key == "host" && fa.edge == "" {
				fa.edge = a.Value.String()
			}
		}
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "machine":
				fa.machine = a.Value.String()
			case "host":
				fa.host = a.Value.String()
			case "request_id":
				fa.request = a.Value.String()
			case "err", "why":
				fa.err = a.Value.String()
			}
			return true
		})
		h.rec.mu.Lock()
		if r.Message == "host suspect" {
			h.rec.suspected = append(h.rec.suspected, fa)
		} else {
			h.rec.failed = append(h.rec.failed, fa)
		}
		h.rec.mu.Unlock()
	}
	if r.Level >= slog.LevelWarn {
		return h.next.WithAttrs(h.attrs).Handle(ctx, r)
	}
	return nil
}

func (h *attemptLog) WithAttrs(as []slog.Attr) slog.Handler {
	return &attemptLog{next: h.next, attrs: append(slices.Clone(h.attrs), as...), rec: h.rec}
}

func (h *attemptLog) WithGroup(string) slog.Handler { return h }

// fault is one fault of the run: when it began and what it killed.
type fault struct {
	name     string
	at       time.Time       // when the fault began
	over     time.Time       // when it was complete: every process gone, every host silent
	machines map[string]bool // dead machines
	hosts    []string        // the hosts it killed
	clients  []*loadClient   // the clients running through it
}

// tableWatch records, per edge, when its route table stopped offering
// each machine (excluded, or its host declared dead), and when its
// cluster view first saw each host otherwise than alive: where the time
// goes between a fault and the gossip that tells the edges of it.
type tableWatch struct {
	mu   sync.Mutex
	gone map[[2]string]time.Time // edge, machine → first seen out of rotation
	host map[[2]string]struct {  // edge, host → first seen suspect, dead
		suspect, dead time.Time
	}
	stop func()
}

func watchTables(edges []*Host) *tableWatch {
	w := &tableWatch{gone: map[[2]string]time.Time{}, host: map[[2]string]struct{ suspect, dead time.Time }{}}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	w.stop = func() { cancel(); <-done }
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			now := time.Now()
			for _, e := range edges {
				tab := e.Proxy.Table()
				snap := e.Cluster.Snapshot()
				w.mu.Lock()
				for _, tg := range tab.Targets("demo", 80) {
					k := [2]string{e.ID, tg.MachineID}
					if _, seen := w.gone[k]; !seen && tg.Excluded != route.Included {
						w.gone[k] = now
					}
				}
				for _, h := range snap.Hosts() {
					k := [2]string{e.ID, h.ID}
					v := w.host[k]
					if v.suspect.IsZero() && h.Status == cluster.StatusSuspect {
						v.suspect = now
					}
					if v.dead.IsZero() && h.Status == cluster.StatusDead {
						v.dead = now
					}
					w.host[k] = v
				}
				w.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(2 * time.Millisecond):
			}
		}
	}()
	return w
}

// failoverRun is what a run leaves to check and report.
type failoverRun struct {
	clients  []*loadClient
	faults   []*fault
	tables   *tableWatch
	attempts *attempts
	machines map[string]string // machine id → host id
	opts     failoverOpts
	verbose  func(format string, args ...any) // when set, report lists every touch
}

// runFailover starts the cluster and the machines, runs the load and the
// faults, and returns what was recorded.
func runFailover(t testing.TB, opts failoverOpts) *failoverRun {
	ctx := context.Background()
	run := &failoverRun{attempts: &attempts{}, machines: map[string]string{}, opts: opts}
	// The cluster's log: warnings to the test, failed attempts recorded.
	over := new(atomic.Bool)
	t.Cleanup(func() { over.Store(true) })
	logger := slog.New(&attemptLog{rec: run.attempts,
		next: slog.NewTextHandler(tWriter{t, over}, &slog.HandlerOptions{Level: slog.LevelWarn})})
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 3, Logger: logger}, nil)
	byHost := map[string]*Host{}
	for _, h := range c.Hosts {
		byHost[h.ID] = h
	}
	for _, h := range c.Hosts {
		for range 2 {
			port := freePort(t)
			m, err := c.HostClient(h).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
				Image:   host.DemoImage,
				Env:     map[string]string{"PORT": strconv.Itoa(port)},
				Restart: &api.MachineRestart{Policy: api.RestartNo},
				Services: []api.MachineService{{
					Protocol: "tcp", InternalPort: port,
					Ports:  []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
					Checks: []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
				}},
			}})
			if err != nil {
				t.Fatalf("create on %s: %v", h.ID, err)
			}
			run.machines[m.ID] = h.ID
		}
	}
	edges := c.Edges()
	amsEdge, iadEdge := byHost["ams-1"], byHost["iad-1"]
	waitUntil(t, "every machine routable at both edges", func() bool {
		for _, e := range []*Host{amsEdge, iadEdge} {
			n := 0
			for _, tg := range e.Proxy.Table().Targets("demo", 80) {
				if tg.Excluded == route.Included {
					n++
				}
			}
			if n != len(run.machines) {
				return false
			}
		}
		return true
	})
	waitUntil(t, "RTTs measured from both edges", func() bool {
		a, i := amsEdge.Cluster.Snapshot(), iadEdge.Cluster.Snapshot()
		for _, h := range c.Hosts {
			if h != amsEdge && a.RTT(h.ID) <= 0 || h != iadEdge && i.RTT(h.ID) <= 0 {
				return false
			}
		}
		return true
	})

	run.tables = watchTables([]*Host{amsEdge, iadEdge})
	t.Cleanup(run.tables.stop)

	tr := &http.Transport{MaxIdleConnsPerHost: opts.concurrency * 3, MaxConnsPerHost: 0}
	t.Cleanup(tr.CloseIdleConnections)
	client := &http.Client{Transport: tr, Timeout: 20 * time.Second}
	direct := &loadClient{name: "ams edge", url: "http://" + edges["ams"], opts: opts}
	global := &loadClient{name: "global", url: "http://" + c.GlobalAddr, opts: opts}
	remote := &loadClient{name: "iad edge, prefer ams", url: "http://" + edges["iad"],
		header: map[string]string{"fly-prefer-region": "ams"}, opts: opts}
	run.clients = []*loadClient{direct, global, remote}
	for _, lc := range run.clients {
		lc.start(client)
	}
	t.Cleanup(func() { // before the cluster closes
		for _, lc := range run.clients {
			lc.halt()
		}
	})
	time.Sleep(opts.phase)

	onHost := func(ids ...string) map[string]bool {
		out := map[string]bool{}
		for m, h := range run.machines {
			if slices.Contains(ids, h) {
				out[m] = true
			}
		}
		return out
	}
	// One machine of ams-2.
	var victim string
	for m := range onHost("ams-2") {
		victim = m
		break
	}
	f := &fault{name: "machine killed (ams-2)", at: time.Now(), machines: map[string]bool{victim: true}, clients: run.clients}
	if _, err := c.KillMachine(ctx, "demo", victim); err != nil {
		t.Fatal(err)
	}
	f.over = time.Now()
	run.faults = append(run.faults, f)
	time.Sleep(opts.phase)

	f = &fault{name: "host killed (ams-3)", at: time.Now(), machines: onHost("ams-3"), hosts: []string{"ams-3"}, clients: run.clients}
	if err := c.KillHost(ctx, "ams-3"); err != nil {
		t.Fatal(err)
	}
	f.over = time.Now()
	run.faults = append(run.faults, f)
	time.Sleep(opts.phase)

	// The ams edge dies with its region: its own client stops first.
	direct.halt()
	f = &fault{name: "region killed (ams)", at: time.Now(), machines: onHost("ams-1", "ams-2", "ams-3"),
		hosts: []string{"ams-1", "ams-2", "ams-3"}, clients: []*loadClient{global, remote}}
	for m := range run.faults[0].machines {
		f.machines[m] = true
	}
	if _, err := c.KillRegion(ctx, "ams"); err != nil {
		t.Fatal(err)
	}
	f.over = time.Now()
	run.faults = append(run.faults, f)
	time.Sleep(opts.phase)
	global.halt()
	remote.halt()
	return run
}

// check fails the test for every failed request and every answer from a
// machine after it died, and checks where the requests went after the
// region died.
func (run *failoverRun) check(t testing.TB) {
	for _, lc := range run.clients {
		ss := lc.all()
		if len(ss) == 0 {
			t.Errorf("%s: no request sent", lc.name)
		}
		var failed []string
		for _, s := range ss {
			if s.Failed() {
				failed = append(failed, fmt.Sprintf("sent %s: status %d: %s", s.Sent.Format("15:04:05.000"), s.Status, s.Err))
			}
		}
		if len(failed) > 0 {
			t.Errorf("%s: %d of %d requests failed; the first: %s", lc.name, len(failed), len(ss), strings.Join(failed[:min(5, len(failed))], "; "))
		}
		for _, f := range run.faults {
			for _, s := range ss {
				if f.machines[s.Machine] && s.Sent.After(f.over) {
					t.Errorf("%s: a request sent %v after %s answered by machine %s, which it killed",
						lc.name, s.Sent.Sub(f.at), f.name, s.Machine)
					break
				}
			}
		}
	}
	// After the region died, both remaining clients are served from iad.
	last := run.faults[len(run.faults)-1]
	for _, lc := range last.clients {
		n := 0
		for _, s := range lc.all() {
			if s.Sent.After(last.over) && !s.Failed() {
				n++
				if s.Region != "iad" {
					t.Errorf("%s: after ams died, answered from %q", lc.name, s.Region)
					break
				}
			}
		}
		if n == 0 {
			t.Errorf("%s: no request answered after ams died", lc.name)
		}
	}
}

// failoverReport is one line of the measurement: one fault, one client.
type failoverReport struct {
	fault, client         string
	requests, failed      int
	touches               int
	firstTouch, lastTouch time.Duration
	// onIt counts the requests sent at or after the fault that tried a
	// dead target first; lastOnIt is when the last of them was sent: from
	// then on every request was served elsewhere without trying one.
	onIt                  int
	lastOnIt              time.Duration
	before, during, after [2]time.Duration
}

func (run *failoverRun) report() []failoverReport {
	run.attempts.mu.Lock()
	failedAttempts := slices.Clone(run.attempts.failed)
	run.attempts.mu.Unlock()
	sent := map[string]time.Time{} // request id → when its client sent it
	for _, lc := range run.clients {
		for _, s := range lc.all() {
			if s.RequestID != "" {
				sent[s.RequestID] = s.Sent
			}
		}
	}
	var out []failoverReport
	for i, f := range run.faults {
		end := time.Now()
		if i+1 < len(run.faults) {
			end = run.faults[i+1].at
		}
		// The attempts of live edges on what the fault killed (a dead
		// edge's own attempts reach no client).
		deadEdge := map[string]bool{}
		for _, g := range run.faults[:i+1] {
			for _, h := range g.hosts {
				deadEdge[h] = true
			}
		}
		tf := touchesOf(failedAttempts, sent, f, end, deadEdge)
		if run.verbose != nil {
			for i, a := range tf.attempts {
				run.verbose("%s: +%v at the %s edge: request %s (sent %+v) on %s on %s: %s", f.name, a.at.Sub(f.at).Round(time.Millisecond),
					a.edge, a.request, tf.sent[i].Sub(f.at).Round(time.Millisecond), a.machine, a.host, a.err)
			}
		}
		firstTouch, lastTouch, touches, lastOnIt := tf.first, tf.last, len(tf.attempts), tf.lastOnIt
		onIt := tf.onIt
		if run.verbose != nil && run.tables != nil {
			run.tables.mu.Lock()
			for k, at := range run.tables.gone {
				if f.machines[k[1]] && !at.Before(f.at) && at.Before(end) {
					run.verbose("%s: +%v at the %s edge: machine %s out of its route table", f.name, at.Sub(f.at).Round(time.Millisecond), k[0], k[1])
				}
			}
			for k, v := range run.tables.host {
				if slices.Contains(f.hosts, k[1]) && !v.dead.IsZero() {
					run.verbose("%s: at the %s edge, host %s suspect at %+v, dead at %+v", f.name, k[0], k[1],
						v.suspect.Sub(f.at).Round(time.Millisecond), v.dead.Sub(f.at).Round(time.Millisecond))
				}
			}
			run.tables.mu.Unlock()
		}
		for _, lc := range f.clients {
			r := failoverReport{fault: f.name, client: lc.name, firstTouch: firstTouch, lastTouch: lastTouch, touches: touches,
				onIt: onIt, lastOnIt: lastOnIt}
			// A request still in flight when the next fault comes is the
			// next fault's.
			ss := lc.all()
			ph := LatencyPhases(ss, f.at, end)
			r.before, r.during, r.after = ph.Before, ph.During, ph.After
			for _, s := range ss {
				if s.Done.After(f.at) && s.Done.Before(end) {
					r.requests++
					if s.Failed() {
						r.failed++
					}
				}
			}
			out = append(out, r)
		}
	}
	return out
}

// touchFigures are a fault's touches: the failed attempts of live edges on
// what it killed, and the requests sent at or after it that made them.
type touchFigures struct {
	attempts    []failedAttempt
	sent        []time.Time // when each attempt's request was sent
	first, last time.Duration
	// onIt counts the requests sent at or after the fault that tried a
	// dead target; lastOnIt is when the last of them was sent.
	onIt     int
	lastOnIt time.Duration
}

// touchesOf reads a fault's touches from the edges' failed attempts made
// from f on and before end; sent gives, by request id, when its client
// sent each request (one no client recorded counts as sent when its attempt
// failed: the latest it can have been). A dead edge's attempts reach no
// client and do not count.
func touchesOf(failed []failedAttempt, sent map[string]time.Time, f *fault, end time.Time, deadEdge map[string]bool) touchFigures {
	var tf touchFigures
	onIt := map[string]bool{}
	for _, a := range failed {
		if a.at.Before(f.at) || !a.at.Before(end) || !f.machines[a.machine] || deadEdge[a.edge] {
			continue
		}
		d := a.at.Sub(f.at)
		if len(tf.attempts) == 0 || d < tf.first {
			tf.first = d
		}
		tf.last = max(tf.last, d)
		at, known := sent[a.request]
		if !known || a.request == "" {
			at = a.at
		}
		tf.attempts, tf.sent = append(tf.attempts, a), append(tf.sent, at)
		if !at.Before(f.at) {
			key := a.request
			if !known || key == "" {
				key = fmt.Sprintf("unknown %d", len(tf.attempts))
			}
			onIt[key] = true
			tf.lastOnIt = max(tf.lastOnIt, at.Sub(f.at))
		}
	}
	tf.onIt = len(onIt)
	return tf
}

// awayBefore counts, per client, the requests answered from another region
// than ams while ams lived (sent and answered before the region died):
// every client prefers ams, and ams had live machines throughout, so each
// is a request moved across the ocean for a false alarm.
func (run *failoverRun) awayBefore() map[string]int {
	last := run.faults[len(run.faults)-1]
	out := map[string]int{}
	for _, lc := range run.clients {
		out[lc.name] = 0
		for _, s := range lc.all() {
			if !s.Failed() && s.Done.Before(last.at) && s.Region != "ams" {
				out[lc.name]++
				// and by phase: before the first fault, after the nth
				phase := "before any fault"
				for _, f := range run.faults {
					if !s.Sent.Before(f.at) {
						phase = "after " + f.name
					}
				}
				out[phase]++
			}
		}
	}
	return out
}

// liveSuspicions lists the suspicions of hosts that were alive then (not
// killed by a fault begun before), which moved requests from a live host
// for a moment: heartbeats or acknowledgements late on a busy machine, or
// the region-mates of a host found silent.
func (run *failoverRun) liveSuspicions() []failedAttempt {
	run.attempts.mu.Lock()
	defer run.attempts.mu.Unlock()
	var out []failedAttempt
	for _, s := range run.attempts.suspected {
		dead := false
		for _, f := range run.faults {
			if !s.at.Before(f.at) && slices.Contains(f.hosts, s.host) {
				dead = true
			}
		}
		if !dead {
			out = append(out, s)
		}
	}
	return out
}

func formatReport(rs []failoverReport) string {
	var b strings.Builder
	ms := func(d time.Duration) string {
		return strconv.FormatFloat(float64(d)/float64(time.Millisecond), 'f', 1, 64)
	}
	pq := func(p [2]time.Duration) string { return ms(p[0]) + " / " + ms(p[1]) }
	fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", "fault", "client", "requests", "failed",
		"failed attempts on it", "first touch ms", "last touch ms", "requests sent after it that tried it", "last of them sent ms",
		"before p50 / p99 ms", "during p50 / p99 ms", "after p50 / p99 ms")
	b.WriteString("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range rs {
		fmt.Fprintf(&b, "| %s | %s | %d | %d | %d | %s | %s | %d | %s | %s | %s | %s |\n", r.fault, r.client, r.requests, r.failed,
			r.touches, ms(r.firstTouch), ms(r.lastTouch), r.onIt, ms(r.lastOnIt), pq(r.before), pq(r.during), pq(r.after))
	}
	return b.String()
}

// TestFailoverUnderLoad: with GETs arriving steadily at the ams edge,
// through the global entry and at the iad edge preferring ams, a machine,
// then a host, then every host of ams are killed — and no request fails.
// The figures are printed, for the record; BenchmarkFailover is the
// measurement (docs/BENCHMARKS.md).
func TestFailoverUnderLoad(t *testing.T) {
	run := runFailover(t, failoverOpts{rate: 50, concurrency: 8, work: 5 * time.Millisecond, phase: 2500 * time.Millisecond})
	run.check(t)
	if testing.Verbose() {
		run.verbose = t.Logf
		for _, s := range run.liveSuspicions() {
			t.Logf("live host %s suspected by the %s edge at %s: %s", s.host, s.edge, s.at.Format("15:04:05.000"), s.err)
		}
	}
	t.Logf("\n%s", formatReport(run.report()))
	t.Logf("answered from iad while ams lived: %v; suspicions of live hosts: %d", run.awayBefore(), len(run.liveSuspicions()))
}

// BenchmarkFailover runs the failover scenarios at a few hundred requests
// a second per client and prints, per fault and client, the failed
// requests, the time until every request was served elsewhere and the
// latencies before, during and after. One run, whatever b.N.
func BenchmarkFailover(b *testing.B) {
	for range b.N {
	}
	run := runFailover(b, failoverOpts{rate: 300, concurrency: 96, work: 5 * time.Millisecond, phase: 5 * time.Second})
	run.check(b)
	rs := run.report()
	fmt.Printf("\n%s", formatReport(rs))
	live := run.liveSuspicions()
	why := map[string]int{}
	for _, s := range live {
		why[s.edge+" of "+s.host+": "+s.err]++
	}
	away := run.awayBefore()
	fmt.Printf("answered from iad while ams lived: %v\n", away)
	n := 0
	for _, lc := range run.clients {
		n += away[lc.name]
	}
	b.ReportMetric(float64(n), "away-before")
	fmt.Printf("suspicions of live hosts: %d\n", len(live))
	for _, k := range slices.Sorted(maps.Keys(why)) {
		fmt.Printf("  %4d by the %s\n", why[k], k)
	}
	b.ReportMetric(float64(len(live)), "live-suspicions")
	for i, f := range run.faults {
		for _, r := range rs {
			if r.fault == f.name {
				b.ReportMetric(float64(r.lastTouch)/float64(time.Millisecond), fmt.Sprintf("ms-last-touch-%d", i+1))
				b.ReportMetric(float64(r.lastOnIt)/float64(time.Millisecond), fmt.Sprintf("ms-elsewhere-%d", i+1))
				break
			}
		}
	}
}

// TestFaultsAreCrashes: leased machines are killed all the same; a killed
// machine's processes are gone and its host
// records the exit (restart policy no: it stays down); a killed host's
// machines' processes are gone and nothing restarts them (restart policy
// always), and its peer sees it dead — silent — not left, as a host that
// says goodbye would be. A host is killed once.
func TestFaultsAreCrashes(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1}, nil)
	ams, iad := c.Hosts[0], c.Hosts[1]
	// Each machine is leased, as a deploy leases it: a crash does not ask.
	create := func(h *Host, policy string) string {
		t.Helper()
		m, err := c.HostClient(h).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(freePort(t))},
			Restart: &api.MachineRestart{Policy: policy},
		}})
		if err != nil {
			t.Fatalf("create on %s: %v", h.ID, err)
		}
		if _, err := h.Agent.AcquireMachineLease(ctx, api.MachineRef{App: "demo", ID: m.ID}, api.LeaseInput{TTL: 60}); err != nil {
			t.Fatalf("lease %s: %v", m.ID, err)
		}
		return m.ID
	}
	// A machine's processes are those carrying its id in their
	// environment (a zombie is gone: its parent reaps it).
	gone := func(id string) func() bool {
		return func() bool {
			ents, _ := os.ReadDir("/proc")
			for _, e := range ents {
				env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
				if err != nil || !strings.Contains(string(env), "FLY_MACHINE_ID="+id+"\x00") {
					continue
				}
				if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil && !strings.Contains(string(st), ") Z ") {
					return false
				}
			}
			return true
		}
	}

	m := create(ams, api.RestartNo)
	if gone(m)() {
		t.Fatalf("no process of machine %s found", m)
	}
	if h, err := c.KillMachine(ctx, "demo", m); err != nil || h != ams {
		t.Fatalf("kill machine %s: host %v, %v", m, h, err)
	}
	waitUntil(t, "the killed machine's processes gone", gone(m))
	waitUntil(t, "the killed machine recorded stopped by its host", func() bool {
		got, err := ams.Agent.GetMachine(ctx, api.MachineRef{App: "demo", ID: m})
		return err == nil && got.State == api.StateStopped
	})

	m = create(iad, api.RestartAlways)
	if err := c.KillHost(ctx, iad.ID); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the killed host's machine's processes gone", gone(m))
	var saw []string
	waitUntil(t, "ams seeing iad dead", func() bool {
		h := ams.Cluster.Snapshot().Host(iad.ID)
		if h == nil {
			return false
		}
		if len(saw) == 0 || saw[len(saw)-1] != string(h.Status) {
			saw = append(saw, string(h.Status))
		}
		return h.Status == cluster.StatusDead
	})
	if slices.Contains(saw, string(cluster.StatusLeft)) {
		t.Errorf("ams saw iad as %v: a killed host must not say goodbye", saw)
	}
	if !c.Killed(iad.ID) || c.Killed(ams.ID) {
		t.Errorf("killed: iad %v, ams %v", c.Killed(iad.ID), c.Killed(ams.ID))
	}
	if err := c.KillHost(ctx, iad.ID); !errors.Is(err, ErrHostKilled) {
		t.Errorf("killing iad again: %v, want ErrHostKilled", err)
	}
	if _, err := c.KillMachine(ctx, "demo", m); err == nil {
		t.Error("a machine of a killed host was killed again")
	}
	// Nothing restarted the machine (policy always, first restart after
	// 200 ms): its host's agent died with it.
	time.Sleep(time.Second)
	if !gone(m)() {
		t.Error("a process of the killed host's machine came back")
	}
}
