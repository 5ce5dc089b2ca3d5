package devcluster

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/proxy/route"
)

// The chaos run and its invariants. Checked after each step, once its
// faults are undone, and at the end:
//
//  1. no request failed: every GET for the app, which runs in at least
//     two whole regions throughout, through the global entry or an edge
//     whose host the step left alive, was answered by the app;
//  2. views converge: within ConvergeBound of the last undo, every live
//     member of the cluster (hosts and control plane) holds every host
//     alive, at the version of its facts the host itself holds;
//  3. routes converge: within ConvergeBound, every edge routes the app to
//     exactly its machines that are started, with passing checks, on live
//     hosts, as their own hosts publish them;
//  4. counts: sampled every 100 ms throughout from the hosts themselves,
//     a group never has more started machines in a region than it
//     declares (not counting those the catalog holds lost or doomed,
//     which the reconciler destroys when their host returns; a shrunk
//     declaration is allowed the reconciler's pass to take effect); once
//     converged, exactly as many;
//  5. machines: once converged, every machine a host holds is in the
//     catalog on that host, every catalog entry is on its host, none is
//     held by two hosts or runs as two processes, and none is left lost or
//     doomed;
//  6. API writes: every acknowledged create, update, destroy and group
//     declaration holds (a failed call may or may not have taken effect,
//     and a machine the ledger never heard of is one a failed create may
//     have made).
//
// Bounds. The views' bound is derived from the cluster's timers: after a
// heal every host tries to join a host it holds dead every
// ReconnectInterval, so a first join comes within one; the merge may turn
// hosts suspect, which are refuted or declared within the longest
// suspicion (SuspicionMaxTimeoutMult·SuspicionMult·ProbeInterval); facts
// the flood missed come with the next anti-entropy exchange
// (AntiEntropyInterval). The sum is doubled, for timers that fire late on
// a loaded machine. The reconciler's bound adds to it what the control
// plane waits: the reconciler lock's TTL (6 s) for a restarted plane, the
// pass that settles machines left behind (every 5 s), three passes (every
// 2 s), and LostAfter (30 s) for an entry a crashed plane wrote whose
// machine was never made.

// ChaosConfig is what a chaos run does to a cluster with a control plane.
type ChaosConfig struct {
	Schedule ChaosSchedule
	// App is the app of the traffic: its group Group declares Declared
	// machines per region (every region of the cluster), serving HTTP on
	// public port Port; Host is its name at the edges.
	App, Group string
	Declared   map[string]int
	Port       int
	Host       string
	// Token is an org token that may manage App and Ledger.
	Token string
	// Ledger is the app the API workload creates, updates and destroys
	// machines of (created with skip_launch), with LedgerConfig, and
	// declares LedgerGroup's counts in.
	Ledger       string
	LedgerGroup  string
	LedgerConfig *api.MachineConfig
	// Rate and Concurrency size the traffic; Work is each request's delay
	// on its machine.
	Rate, Concurrency int
	Work              time.Duration
	// Logf, when set, is told of the steps as they go.
	Logf func(format string, args ...any)
}

// ChaosStepReport is what one step measured.
type ChaosStepReport struct {
	Step       ChaosStep
	Views      time.Duration // from the last undo until views converged
	Routes     time.Duration
	Reconciled time.Duration
	Requests   int
	Failed     int
}

// ChaosReport is a run's record and the invariants it broke.
type ChaosReport struct {
	Schedule   ChaosSchedule
	Steps      []ChaosStepReport
	Requests   []ChaosSample
	Calls      []APICall
	Violations []string
	// ConvergeBound and ReconcileBound are the bounds the run held the
	// cluster to.
	ConvergeBound, ReconcileBound time.Duration
}

// ConvergeBound is how long after a heal every view and route table must
// have converged (see above).
func (c *Cluster) ConvergeBound() time.Duration {
	cc := c.cfg.Cluster
	or := func(d, def time.Duration) time.Duration {
		if d == 0 {
			return def
		}
		return d
	}
	orInt := func(n, def int) int {
		if n == 0 {
			return def
		}
		return n
	}
	probe := or(cc.ProbeInterval, cluster.DefaultProbeInterval)
	susp := time.Duration(orInt(cc.SuspicionMaxTimeoutMult, cluster.DefaultSuspicionMaxTimeoutMult)*
		orInt(cc.SuspicionMult, cluster.DefaultSuspicionMult)) * probe
	b := or(cc.ReconnectInterval, cluster.DefaultReconnectInterval) + susp +
		or(cc.AntiEntropyInterval, cluster.DefaultAntiEntropyInterval)
	return 2 * b * time.Duration(max(1, cc.Dilation))
}

// reconcileBound is how long after a heal the reconciler must have put
// every group right (see above).
func (c *Cluster) reconcileBound() time.Duration {
	lost := c.cfg.Server.LostAfter
	if lost == 0 {
		lost = 30 * time.Second
	}
	every := c.cfg.Server.ReconcileInterval
	if every == 0 {
		every = 2 * time.Second
	}
	return c.ConvergeBound() + 6*time.Second + 5*time.Second + 3*every + lost
}

// chaosRun is one run in progress.
type chaosRun struct {
	c   *Cluster
	cfg ChaosConfig
	// hostsMu keeps readers of c.Hosts off it while Revive replaces hosts.
	hostsMu sync.RWMutex
	traffic *chaosTraffic
	api     *chaosAPI
	orgAPI  *api.Client

	mu         sync.Mutex
	violations []string
	seen       map[string]bool
	// outages are when the control plane was killed and restarted.
	outages [][2]time.Time
}

func (r *chaosRun) violate(format string, args ...any) {
	r.violateOnce("", format, args...)
}

// violateOnce records a violation once per key ("": its message).
func (r *chaosRun) violateOnce(key, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.mu.Lock()
	defer r.mu.Unlock()
	if key == "" {
		key = msg
	}
	if r.seen[key] || len(r.violations) >= 200 {
		return
	}
	r.seen[key] = true
	r.violations = append(r.violations, msg)
}

func (r *chaosRun) logf(format string, args ...any) {
	if r.cfg.Logf != nil {
		r.cfg.Logf(format, args...)
	}
}

// RunChaos applies the schedule to the cluster with its traffic and API
// workload running, checks the invariants and returns what it saw. The
// cluster must have a control plane, the apps and the group, converged. An
// error is a run that could not go on (a fault that could not be applied
// or undone); broken invariants are the report's Violations.
func (c *Cluster) RunChaos(ctx context.Context, cfg ChaosConfig) (*ChaosReport, error) {
	if c.Plane == nil {
		return nil, errors.New("devcluster: a chaos run needs a control plane")
	}
	if cfg.Rate <= 0 {
		cfg.Rate = 40
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 8
	}
	r := &chaosRun{c: c, cfg: cfg, seen: map[string]bool{}}
	rep := &ChaosReport{Schedule: cfg.Schedule, ConvergeBound: c.ConvergeBound(), ReconcileBound: c.reconcileBound()}
	hc := chaosHTTPClient(cfg.Concurrency)
	defer hc.CloseIdleConnections()

	// Clients in every region of the cluster and one beyond it.
	froms := slices.Clone(c.cfg.Regions)
	for _, g := range geo.All() {
		if !slices.Contains(froms, g.Code) {
			froms = append(froms, g.Code)
			break
		}
	}
	r.traffic = newChaosTraffic(LoadConfig{Host: cfg.Host, Work: cfg.Work, Client: hc}, cfg.Schedule.Seed, c.GlobalAddr, froms, c.Edges())
	r.orgAPI = api.NewClient(c.Plane.URL(), cfg.Token)
	r.orgAPI.HTTPClient = hc
	r.api = &chaosAPI{cl: r.orgAPI, app: cfg.Ledger, group: cfg.LedgerGroup, config: cfg.LedgerConfig,
		regions: slices.Clone(c.cfg.Regions), rng: newChaosRand(cfg.Schedule.Seed, 0x617069)}

	// The baseline: converged before anything happens, and every declared
	// machine serving at every edge (a machine just started fails its
	// checks until their first pass, and routes converged on fewer).
	if err := r.converge(ctx, &ChaosStepReport{}, 0); err != nil {
		return rep, err
	}
	if err := r.waitServing(ctx); err != nil {
		return rep, err
	}
	r.traffic.start(cfg.Rate, cfg.Concurrency)
	r.api.start(150 * time.Millisecond)
	sctx, stopSampler := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() { r.sampleLoop(sctx) })
	halt := func() {
		r.traffic.halt()
		r.api.halt()
		stopSampler()
		wg.Wait()
	}

	var runErr error
	for i, st := range cfg.Schedule.Steps {
		n := i + 1
		sr := ChaosStepReport{Step: st}
		r.logf("step %d: %s", n, st)
		r.traffic.setStep(n)
		r.api.setStep(n)
		var edges []string
		for _, id := range c.chaosDown(st) {
			if h := c.host(id); h != nil && h.EdgeAddr != "" {
				edges = append(edges, h.Region)
			}
		}
		r.traffic.withhold(edges)
		var undos []func(context.Context) error
		r.hostsMu.Lock()
		down := time.Now()
		for _, f := range st.Faults {
			undo, err := c.applyChaos(ctx, f, st.Hold, cfg.App)
			if err != nil {
				runErr = fmt.Errorf("step %d: %s: %w", n, f, err)
				break
			}
			undos = append(undos, undo)
		}
		r.hostsMu.Unlock()
		if runErr == nil {
			select {
			case <-ctx.Done():
				runErr = ctx.Err()
			case <-time.After(st.Hold):
			}
		}
		r.hostsMu.Lock()
		for j := len(undos) - 1; j >= 0; j-- {
			uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			if err := undos[j](uctx); err != nil && runErr == nil {
				runErr = fmt.Errorf("step %d: undo %s: %w", n, st.Faults[j], err)
			}
			cancel()
		}
		r.hostsMu.Unlock()
		if slices.ContainsFunc(st.Faults, func(f ChaosFault) bool { return f.Kind == FaultKillPlane }) {
			r.mu.Lock()
			r.outages = append(r.outages, [2]time.Time{down, time.Now()})
			r.mu.Unlock()
		}
		if runErr != nil {
			break
		}
		if err := r.converge(ctx, &sr, n); err != nil {
			runErr = err
			break
		}
		r.traffic.release(n)
		rep.Steps = append(rep.Steps, sr)
		r.logf("step %d: views %v, routes %v, reconciled %v", n, sr.Views.Round(time.Millisecond),
			sr.Routes.Round(time.Millisecond), sr.Reconciled.Round(time.Millisecond))
	}
	// A last stretch of calm, so the requests sent after the last heal
	// count too.
	time.Sleep(500 * time.Millisecond)
	halt()
	rep.Requests = r.traffic.requests()
	rep.Calls = r.api.history()
	for i := range rep.Steps {
		for _, q := range rep.Requests {
			if q.Step == i+1 {
				rep.Steps[i].Requests++
				if q.Failed() {
					rep.Steps[i].Failed++
				}
			}
		}
	}
	r.checkRequests(rep.Requests)
	if runErr == nil {
		// The ledger's last calls, once they have all returned.
		cctx, cancel := context.WithTimeout(ctx, time.Minute)
		r.checkMachinesUntil(cctx, 0, time.Now().Add(rep.ReconcileBound))
		r.checkLedger(cctx, rep.Calls, 0)
		cancel()
	}
	r.mu.Lock()
	rep.Violations = slices.Clone(r.violations)
	r.mu.Unlock()
	return rep, runErr
}

// converge waits for views, routes and the reconciler after a step's
// undo, within their bounds, and checks the machines and the ledger.
func (r *chaosRun) converge(ctx context.Context, sr *ChaosStepReport, step int) error {
	c := r.c
	begin := time.Now()
	bound := c.ConvergeBound()
	wait := func(what string, until time.Time, ok func() (bool, string)) (time.Duration, bool) {
		last := ""
		for {
			r.hostsMu.RLock()
			done, why := ok()
			r.hostsMu.RUnlock()
			if done {
				return time.Since(begin), true
			}
			last = why
			if time.Now().After(until) || ctx.Err() != nil {
				r.violate("step %d: %s did not converge within %v of the heal: %s", step, what, until.Sub(begin).Round(time.Millisecond), last)
				return time.Since(begin), false
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	var ok bool
	if sr.Views, ok = wait("views", begin.Add(bound), c.viewsConverged); !ok {
		return nil
	}
	if sr.Routes, ok = wait("routes", begin.Add(bound), func() (bool, string) { return c.routesConverged(r.cfg.App, r.cfg.Port) }); !ok {
		return nil
	}
	sr.Reconciled, _ = r.checkMachinesUntil(ctx, step, begin.Add(c.reconcileBound()))
	if step > 0 {
		// No call in flight while the ledger is read.
		r.api.gate.Lock()
		defer r.api.gate.Unlock()
		lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		r.checkLedger(lctx, r.api.history(), step)
	}
	return ctx.Err()
}

// servingMachines is the set of app's machines started with passing checks
// on live hosts, as those hosts publish them.
func (c *Cluster) servingMachines(app string) map[string]bool {
	want := map[string]bool{}
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			continue
		}
		self := h.Cluster.Snapshot().Host(h.ID)
		if self == nil {
			continue
		}
		for _, m := range self.Machines {
			if m.App == app && m.State == api.StateStarted && !m.Cordoned && m.Passing() {
				want[m.ID] = true
			}
		}
	}
	return want
}

// waitServing waits, within the views' bound, until every edge routes to
// every machine the app's group declares, started with passing checks.
func (r *chaosRun) waitServing(ctx context.Context) error {
	want := 0
	for _, n := range r.cfg.Declared {
		want += n
	}
	deadline := time.Now().Add(r.c.ConvergeBound())
	for {
		r.hostsMu.RLock()
		ok, why := r.c.routesConverged(r.cfg.App, r.cfg.Port)
		serving := len(r.c.servingMachines(r.cfg.App))
		r.hostsMu.RUnlock()
		switch {
		case ok && serving == want:
			return nil
		case ok:
			why = fmt.Sprintf("%d machine(s) of %s pass their checks, %d declared", serving, r.cfg.App, want)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("devcluster: the baseline never served: %s", why)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// viewsConverged reports whether every live member holds every live host
// alive at the version the host holds of itself.
func (c *Cluster) viewsConverged() (bool, string) {
	own := map[string]uint64{}
	var members []*cluster.Cluster
	var names []string
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			return false, h.ID + " is killed"
		}
		if self := h.Cluster.Snapshot().Host(h.ID); self != nil {
			own[h.ID] = self.Version
		}
		members, names = append(members, h.Cluster), append(names, h.ID)
	}
	if p := c.LivePlane(); p != nil {
		members, names = append(members, p.Cluster), append(names, controlID)
	}
	for i, m := range members {
		snap := m.Snapshot()
		for _, h := range c.Hosts {
			o := snap.Host(h.ID)
			switch {
			case o == nil:
				return false, fmt.Sprintf("%s does not know %s", names[i], h.ID)
			case o.Status != cluster.StatusAlive:
				return false, fmt.Sprintf("%s holds %s %s", names[i], h.ID, o.Status)
			case o.Version != own[h.ID]:
				return false, fmt.Sprintf("%s holds %s's facts at version %d, %s itself at %d", names[i], h.ID, o.Version, h.ID, own[h.ID])
			}
		}
	}
	return true, ""
}

// routesConverged reports whether every edge routes app's port to exactly
// the machines started with passing checks on live hosts, as those hosts
// publish them.
func (c *Cluster) routesConverged(app string, port int) (bool, string) {
	want := c.servingMachines(app)
	for _, h := range c.Hosts {
		if h.EdgeAddr == "" || c.Killed(h.ID) {
			continue
		}
		got := map[string]bool{}
		for _, tg := range h.Proxy.Table().Targets(app, port) {
			if tg.Excluded == route.Included {
				got[tg.MachineID] = true
			}
		}
		if !maps.Equal(got, want) {
			return false, fmt.Sprintf("the %s edge routes to %v, want %v", h.Region, slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
		}
	}
	return true, ""
}

// sampleLoop checks the counts every 100 ms until ctx ends.
func (r *chaosRun) sampleLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
		for _, app := range []string{r.cfg.App, r.cfg.Ledger} {
			r.hostsMu.RLock()
			ss, ok := r.c.sampleCounts(ctx, app)
			r.hostsMu.RUnlock()
			if ok {
				r.checkCounts(app, ss)
			}
		}
	}
}

// checkCounts reports a group with more machines started in a region than
// it may have.
func (r *chaosRun) checkCounts(app string, ss []countSample) {
	for _, s := range ss {
		for region, ids := range s.started {
			if allowed := r.allowed(app, s.group, region, s.at); len(ids) > allowed {
				slices.Sort(ids)
				var puts []string
				if app == r.cfg.Ledger {
					for _, call := range r.api.history() {
						if call.Op == "put-group" && !call.Sent.After(s.at) {
							puts = append(puts, fmt.Sprintf("%s–%s %s", call.Sent.Format("15:04:05.000"), call.Done.Format("15:04:05.000"), call))
						}
					}
					puts = puts[max(0, len(puts)-4):]
				}
				r.violateOnce("counts "+app+"/"+s.group+"/"+region, "counts: group %s/%s had %d machines started in %s at %s, more than the %d declared: %v; the last declarations: %s",
					app, s.group, len(ids), region, s.at.Format("15:04:05.000"), allowed, ids, strings.Join(puts, "; "))
			}
		}
	}
}

// shrinkGrace is how long a shrunk declaration gives the reconciler to
// destroy the extras: two passes.
const shrinkGrace = 5 * time.Second

// reconcilerLockTTL is how long a restarted control plane waits for the
// reconciler's lock its killed self held (server's lockTTL).
const reconcilerLockTTL = 6 * time.Second

// settled reports whether by t the reconciler has had its time to act on
// a declaration acknowledged at ack: shrinkGrace, or, when the control
// plane was killed within it, shrinkGrace after the restarted plane could
// take the reconciler's lock.
func (r *chaosRun) settled(ack, t time.Time) bool {
	until := ack.Add(shrinkGrace)
	r.mu.Lock()
	for _, o := range r.outages {
		if o[0].Before(ack.Add(shrinkGrace)) && o[1].After(ack) {
			until = later(until, o[1].Add(reconcilerLockTTL+shrinkGrace))
		}
	}
	r.mu.Unlock()
	return !t.Before(until)
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// allowed is the most machines a group may run in a region at t: its
// declared count, or for the ledger's group the most of the declarations
// that may be in force at t or were shortly before.
func (r *chaosRun) allowed(app, group, region string, t time.Time) int {
	if app == r.cfg.App && group == r.cfg.Group {
		return r.cfg.Declared[region]
	}
	if app != r.cfg.Ledger || group != r.cfg.LedgerGroup {
		return 0 // no group of ours
	}
	// Only declarations not replaced by an acknowledged one well before t.
	calls := r.api.history()
	var cur []APICall
	for _, call := range calls {
		if call.Op == "put-group" && !call.Sent.After(t) {
			cur = append(cur, call)
		}
	}
	most := 0
	for i, call := range cur {
		replaced := false
		for _, next := range cur[i+1:] {
			if next.acked() && r.settled(next.Done, t) {
				replaced = true
			}
		}
		if !replaced {
			most = max(most, call.Regions[region])
		}
	}
	return most
}

// checkMachinesUntil waits, until deadline, for the groups to run exactly
// their declared counts with nothing left lost or doomed and the catalog
// and hosts to agree; past it, each difference is a violation. It returns
// how long it waited.
func (r *chaosRun) checkMachinesUntil(ctx context.Context, step int, deadline time.Time) (time.Duration, bool) {
	begin := time.Now()
	told := false
	for {
		r.hostsMu.RLock()
		problems := r.machineProblems(ctx)
		r.hostsMu.RUnlock()
		if len(problems) == 0 {
			return time.Since(begin), true
		}
		if !told && time.Since(begin) > slowReconcile {
			told = true
			r.logf("step %d: the machines not converged %v on: %s", step, slowReconcile, strings.Join(problems, "; "))
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			for _, p := range problems {
				r.violate("step %d: machines: %s", step, p)
			}
			return time.Since(begin), false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// slowReconcile is when a wait for the machines is worth telling of.
const slowReconcile = 5 * time.Second

// machineProblems lists what keeps the machines from their converged
// state (none: converged).
func (r *chaosRun) machineProblems(ctx context.Context) []string {
	c := r.c
	var out []string
	apps := []string{r.cfg.App, r.cfg.Ledger}
	hms := c.hostMachines(apps...)
	onHost := map[string][]string{}
	for _, hm := range hms {
		onHost[hm.id] = append(onHost[hm.id], hm.host)
	}
	for id, hs := range onHost {
		if len(hs) > 1 {
			out = append(out, fmt.Sprintf("machine %s is held by hosts %v", id, hs))
		}
	}
	for _, app := range apps {
		entries, ok := c.catalogEntries(ctx, app)
		if !ok {
			return append(out, "the catalog cannot be read")
		}
		for _, hm := range hms {
			if hm.app != app {
				continue
			}
			e, known := entries[hm.id]
			switch {
			case !known:
				out = append(out, fmt.Sprintf("machine %s of %s (%s on %s) is not in the catalog", hm.id, app, hm.state, hm.host))
			case e.Host != hm.host:
				out = append(out, fmt.Sprintf("machine %s of %s is on %s, the catalog says %s", hm.id, app, hm.host, e.Host))
			}
		}
		for id, e := range entries {
			switch {
			case e.Lost || e.Doomed:
				out = append(out, fmt.Sprintf("machine %s of %s on %s is left lost %v, doomed %v", id, app, e.Host, e.Lost, e.Doomed))
			case !slices.Contains(onHost[id], e.Host):
				out = append(out, fmt.Sprintf("the catalog's machine %s of %s is not on its host %s", id, app, e.Host))
			}
		}
	}
	for _, app := range apps {
		ss, ok := c.sampleCounts(ctx, app)
		if !ok {
			return append(out, "the catalog cannot be read")
		}
		got := map[string]map[string]int{}
		for _, s := range ss {
			got[s.group] = map[string]int{}
			for region, ids := range s.started {
				got[s.group][region] = len(ids)
			}
		}
		want := map[string]map[string]int{}
		if app == r.cfg.App {
			want[r.cfg.Group] = r.cfg.Declared
		} else if g, err := r.orgAPI.GetGroup(ctx, app, r.cfg.LedgerGroup); err == nil {
			want[r.cfg.LedgerGroup] = g.Regions
		} else if !errors.Is(err, api.ErrNotFound) {
			return append(out, fmt.Sprintf("read group %s/%s: %v", app, r.cfg.LedgerGroup, err))
		}
		for g, regions := range want {
			for _, region := range c.cfg.Regions {
				if got[g][region] != regions[region] {
					out = append(out, fmt.Sprintf("group %s/%s runs %d in %s, declares %d", app, g, got[g][region], region, regions[region]))
				}
			}
		}
	}
	for id, n := range machineProcessCount(apps) {
		if n > 1 {
			out = append(out, fmt.Sprintf("machine %s runs as %d processes", id, n))
		}
	}
	slices.Sort(out)
	return out
}

// machineProcessCount counts, per machine id of apps, the live processes
// whose environment names it as their machine (zombies are gone: their
// parent reaps them).
func machineProcessCount(apps []string) map[string]int {
	out := map[string]int{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		env, err := os.ReadFile("/proc/" + e.Name() + "/environ")
		if err != nil {
			continue
		}
		var app, id string
		for _, kv := range strings.Split(string(env), "\x00") {
			if v, ok := strings.CutPrefix(kv, "FLY_APP_NAME="); ok {
				app = v
			} else if v, ok := strings.CutPrefix(kv, "FLY_MACHINE_ID="); ok {
				id = v
			}
		}
		if id == "" || !slices.Contains(apps, app) {
			continue
		}
		if st, err := os.ReadFile("/proc/" + e.Name() + "/stat"); err == nil && strings.Contains(string(st), ") Z ") {
			continue
		}
		out[id]++
	}
	return out
}

// checkRequests reports every failed request.
func (r *chaosRun) checkRequests(reqs []ChaosSample) {
	by := map[int][]ChaosSample{}
	for _, q := range reqs {
		if q.Failed() {
			by[q.Step] = append(by[q.Step], q)
		}
	}
	for _, step := range slices.Sorted(maps.Keys(by)) {
		fs := by[step]
		var first []string
		for _, q := range fs[:min(5, len(fs))] {
			first = append(first, fmt.Sprintf("%s via %s: status %d %s (%s)", q.Sent.Format("15:04:05.000"), q.Via, q.Status, q.Err, q.Cause))
		}
		r.violate("step %d: requests: %d failed; the first: %s", step, len(fs), strings.Join(first, "; "))
	}
}

// checkLedger checks that every acknowledged write of the API workload
// holds. Calls still in flight are not in calls; one made after the step
// converged may or may not show yet, so only calls sent before now count.
func (r *chaosRun) checkLedger(ctx context.Context, calls []APICall, step int) {
	app := r.cfg.Ledger
	type ledger struct {
		created                 bool
		destroyAcked, destroyed bool // an acknowledged destroy; any destroy
		seqs                    []string
	}
	machines := map[string]*ledger{}
	var ids []string
	failedCreates := 0
	var puts []APICall
	for _, call := range calls {
		switch call.Op {
		case "create":
			if !call.acked() {
				failedCreates++
				continue
			}
			machines[call.Machine] = &ledger{created: true, seqs: []string{""}}
			ids = append(ids, call.Machine)
		case "update":
			l := machines[call.Machine]
			if l == nil {
				continue
			}
			v := strconv.Itoa(call.Seq)
			if call.acked() {
				l.seqs = []string{v} // what came before is overwritten
			} else {
				l.seqs = append(l.seqs, v) // perhaps
			}
		case "destroy":
			if l := machines[call.Machine]; l != nil {
				l.destroyed = true
				l.destroyAcked = l.destroyAcked || call.acked()
			}
		case "put-group":
			if call.acked() {
				puts = []APICall{call}
			} else {
				puts = append(puts, call)
			}
		}
	}
	for _, id := range ids {
		l := machines[id]
		m, err := r.orgAPI.Get(ctx, app, id)
		gone := errors.Is(err, api.ErrNotFound) || err == nil && m.State == api.StateDestroyed
		switch {
		case err != nil && !errors.Is(err, api.ErrNotFound):
			r.violate("step %d: ledger: read machine %s: %v", step, id, err)
		case l.destroyAcked && !gone:
			r.violate("step %d: ledger: machine %s is %s after its destroy was acknowledged", step, id, m.State)
		case gone && !l.destroyed:
			r.violate("step %d: ledger: acknowledged machine %s is gone, never destroyed", step, id)
		case !gone && !l.destroyed || !gone && !l.destroyAcked:
			got := ""
			if m.Config != nil {
				got = m.Config.Env[chaosSeqVar]
			}
			if !slices.Contains(l.seqs, got) {
				r.violate("step %d: ledger: machine %s has %s=%q, want one of %q", step, id, chaosSeqVar, got, l.seqs)
			}
		}
	}
	ms, err := r.orgAPI.List(ctx, app, api.ListMachinesOptions{})
	if err != nil {
		r.violate("step %d: ledger: list: %v", step, err)
	} else {
		var unknown []string
		for _, m := range ms {
			if m.Config != nil && m.Config.Metadata[api.MetadataProcessGroup] == r.cfg.LedgerGroup {
				continue // the side group's, the reconciler's to make
			}
			if machines[m.ID] == nil {
				unknown = append(unknown, m.ID)
			}
		}
		if len(unknown) > failedCreates {
			r.violate("step %d: ledger: %d machines nobody created (%v), only %d creates failed", step, len(unknown), unknown, failedCreates)
		}
	}
	if len(puts) > 0 {
		g, err := r.orgAPI.GetGroup(ctx, app, r.cfg.LedgerGroup)
		switch {
		case err != nil && !(errors.Is(err, api.ErrNotFound) && !puts[0].acked()):
			r.violate("step %d: ledger: read group: %v", step, err)
		case err == nil:
			match := false
			for _, p := range puts {
				if sameCounts(p.Regions, g.Regions) {
					match = true
				}
			}
			if !match {
				r.violate("step %d: ledger: group %s declares %v; the acknowledged declaration and those after it: %v", step, r.cfg.LedgerGroup, g.Regions, puts)
			}
		}
	}
}

// sameCounts compares declarations, a missing region as 0.
func sameCounts(a, b map[string]int) bool {
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	return true
}
