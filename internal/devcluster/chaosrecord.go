package devcluster

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
)

// What a chaos run records: every request its client sends (through the
// global entry, from every region of the cluster and one beyond it, and
// straight to every edge whose host the step leaves alone), every call its
// API workload makes with what it was told, and the group counts sampled
// from the hosts themselves.

// ChaosSample is one request of the run's traffic.
type ChaosSample struct {
	Sample
	// Via is what the client sent it to: "global from <region>" or
	// "edge <region>".
	Via  string
	Step int // 0 before the first step
}

// chaosTraffic sends GETs for the app at a steady rate, each to a target
// picked at random among those allowed now.
type chaosTraffic struct {
	cfg    LoadConfig
	rng    *rand.Rand // only the sending loop uses it
	global string
	froms  []string
	edges  map[string]string // region → edge address

	mu       sync.Mutex
	cond     *sync.Cond
	withheld map[string]bool // edges' regions not called now
	inflight map[string]int  // by via
	step     int
	reqs     []ChaosSample

	stop context.CancelFunc
	done chan struct{}
}

func newChaosTraffic(cfg LoadConfig, seed int64, global string, froms []string, edges map[string]string) *chaosTraffic {
	t := &chaosTraffic{cfg: cfg.withDefaults(), rng: rand.New(rand.NewPCG(uint64(seed), 0x7261666669)),
		global: global, froms: froms, edges: edges, withheld: map[string]bool{}, inflight: map[string]int{},
		done: make(chan struct{})}
	t.cond = sync.NewCond(&t.mu)
	return t
}

// start sends rate requests a second, concurrency at most in flight.
func (t *chaosTraffic) start(rate, concurrency int) {
	ctx, cancel := context.WithCancel(context.Background())
	t.stop = cancel
	go func() {
		defer close(t.done)
		var wg sync.WaitGroup
		defer wg.Wait()
		sem := make(chan struct{}, concurrency)
		interval := time.Second / time.Duration(max(1, rate))
		next := time.Now()
		for {
			next = next.Add(interval)
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(next)):
			}
			select {
			case <-ctx.Done():
				return
			case sem <- struct{}{}:
			}
			via, cfg := t.pick()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				s := cfg.Send()
				t.mu.Lock()
				t.reqs = append(t.reqs, ChaosSample{Sample: s, Via: via, Step: t.step})
				t.inflight[via]--
				t.cond.Broadcast()
				t.mu.Unlock()
			}()
		}
	}()
}

// pick chooses the next request's target and counts it in flight.
func (t *chaosTraffic) pick() (string, LoadConfig) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cfg := t.cfg
	var via string
	var edges []string
	for _, r := range slices.Sorted(maps.Keys(t.edges)) {
		if !t.withheld[r] {
			edges = append(edges, r)
		}
	}
	if len(edges) == 0 || t.rng.IntN(2) == 0 {
		from := t.froms[t.rng.IntN(len(t.froms))]
		via, cfg.URL = "global from "+from, "http://"+t.global
		cfg.Header = map[string]string{ClientRegionHeader: from}
	} else {
		r := edges[t.rng.IntN(len(edges))]
		via, cfg.URL = "edge "+r, "http://"+t.edges[r]
	}
	t.inflight[via]++
	return via, cfg
}

// withhold stops calling the edges of these regions straight, and waits
// until no request to them is in flight: a client does not call an edge
// it is about to see die.
func (t *chaosTraffic) withhold(regions []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, r := range regions {
		t.withheld[r] = true
	}
	for {
		busy := false
		for _, r := range regions {
			if t.inflight["edge "+r] > 0 {
				busy = true
			}
		}
		if !busy {
			return
		}
		t.cond.Wait()
	}
}

// release calls every edge again, and counts what follows for step.
func (t *chaosTraffic) release(step int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	clear(t.withheld)
	t.step = step
}

func (t *chaosTraffic) setStep(step int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.step = step
}

func (t *chaosTraffic) halt() {
	t.stop()
	<-t.done
}

func (t *chaosTraffic) requests() []ChaosSample {
	t.mu.Lock()
	defer t.mu.Unlock()
	return slices.Clone(t.reqs)
}

// APICall is one call of the API workload and what it was told. A call
// that failed may have taken effect or not: only an acknowledged one (Err
// empty) is a promise.
type APICall struct {
	Op      string // create, update, destroy, put-group
	Machine string `json:",omitempty"`
	// Seq is the value an update wrote (the machine's CHAOS_SEQ), or a
	// declaration's counts for put-group.
	Seq     int            `json:",omitempty"`
	Regions map[string]int `json:",omitempty"`
	Sent    time.Time
	Done    time.Time
	Err     string `json:",omitempty"`
	Step    int
}

func (c APICall) acked() bool { return c.Err == "" }

func (c APICall) String() string {
	s := c.Op
	if c.Machine != "" {
		s += " " + c.Machine
	}
	if c.Op == "put-group" {
		s += fmt.Sprintf(" %v", c.Regions)
	} else if c.Seq != 0 {
		s += " seq " + strconv.Itoa(c.Seq)
	}
	if c.Err != "" {
		return s + " failed: " + c.Err
	}
	return s + " acknowledged"
}

// chaosAPI is the API workload: one call at a time, at random, on the
// ledger app's machines and its side group.
type chaosAPI struct {
	cl         *api.Client
	app, group string
	config     *api.MachineConfig
	regions    []string
	rng        *rand.Rand
	// gate is held for each call: the checks hold it to read the ledger
	// with no call in flight.
	gate sync.Mutex

	mu    sync.Mutex
	step  int
	calls []APICall
	live  []string // machines created and not destroyed, as far as the workload knows
	seq   int

	stop context.CancelFunc
	done chan struct{}
}

// maxLedgerMachines bounds the machines the workload keeps.
const maxLedgerMachines = 6

func (a *chaosAPI) start(every time.Duration) {
	ctx, cancel := context.WithCancel(context.Background())
	a.stop, a.done = cancel, make(chan struct{})
	go func() {
		defer close(a.done)
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(every):
			}
			a.one(ctx)
		}
	}()
}

// one makes one call and records it.
func (a *chaosAPI) one(ctx context.Context) {
	a.gate.Lock()
	defer a.gate.Unlock()
	a.mu.Lock()
	call := APICall{Step: a.step}
	n := len(a.live)
	switch x := a.rng.IntN(10); {
	case x < 3 && n < maxLedgerMachines || n == 0:
		call.Op = "create"
	case x < 6:
		call.Op, call.Machine = "update", a.live[a.rng.IntN(n)]
		a.seq++
		call.Seq = a.seq
	case x < 8:
		call.Op, call.Machine = "destroy", a.live[a.rng.IntN(n)]
	default:
		call.Op, call.Regions = "put-group", map[string]int{}
		for _, r := range a.regions {
			call.Regions[r] = a.rng.IntN(2)
		}
	}
	a.mu.Unlock()

	cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	call.Sent = time.Now()
	var err error
	switch call.Op {
	case "create":
		var m *api.Machine
		if m, err = a.cl.Create(cctx, a.app, api.LaunchMachineInput{Config: a.config, SkipLaunch: true}); err == nil {
			call.Machine = m.ID
		}
	case "update":
		cfg := *a.config
		cfg.Env = maps.Clone(cfg.Env)
		if cfg.Env == nil {
			cfg.Env = map[string]string{}
		}
		cfg.Env[chaosSeqVar] = strconv.Itoa(call.Seq)
		_, err = a.cl.Update(cctx, a.app, call.Machine, api.LaunchMachineInput{Config: &cfg, SkipLaunch: true})
	case "destroy":
		err = a.cl.Destroy(cctx, a.app, call.Machine, true)
	case "put-group":
		_, err = a.cl.PutGroup(cctx, a.app, api.Group{Name: a.group, Regions: call.Regions, Config: a.config})
	}
	call.Done = time.Now()
	if err != nil {
		// Perhaps done: also a call cut short by the run's end, which the
		// service may have carried out.
		call.Err = err.Error()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, call)
	switch {
	case call.Op == "create" && call.acked():
		a.live = append(a.live, call.Machine)
	case call.Op == "destroy":
		// Gone or perhaps gone: not touched again.
		a.live = slices.DeleteFunc(a.live, func(id string) bool { return id == call.Machine })
	}
}

// chaosSeqVar is the variable a ledger machine's updates write.
const chaosSeqVar = "CHAOS_SEQ"

func (a *chaosAPI) setStep(step int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.step = step
}

func (a *chaosAPI) halt() {
	a.stop()
	<-a.done
}

func (a *chaosAPI) history() []APICall {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls)
}

// catalogEntry is what the chaos checks read of the control plane's
// machine entries (server's machineEntry, as stored).
type catalogEntry struct {
	ID      string    `json:"id"`
	App     string    `json:"app"`
	Host    string    `json:"host"`
	Region  string    `json:"region"`
	Group   string    `json:"group"`
	For     string    `json:"for"`
	Lost    bool      `json:"lost"`
	Doomed  bool      `json:"doomed"`
	Created time.Time `json:"created_at"`
}

// catalogEntries reads the live control plane's machine entries of app
// (nil, false while the plane is down or the catalog cannot answer).
func (c *Cluster) catalogEntries(ctx context.Context, app string) (map[string]catalogEntry, bool) {
	p := c.LivePlane()
	if p == nil {
		return nil, false
	}
	b, err := p.Catalog.Bucket("machines")
	if err != nil {
		return nil, false
	}
	es, err := b.List(ctx, app+".")
	if err != nil {
		return nil, false
	}
	out := map[string]catalogEntry{}
	for _, e := range es {
		var me catalogEntry
		if json.Unmarshal(e.Value, &me) == nil && me.App == app {
			out[me.ID] = me
		}
	}
	return out, true
}

// hostMachine is one machine as its live host holds it.
type hostMachine struct {
	host, app, id, region, state string
}

// hostMachines lists the machines (not destroyed) of the live hosts.
func (c *Cluster) hostMachines(apps ...string) []hostMachine {
	var out []hostMachine
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			continue
		}
		for _, am := range h.Agent.AllMachines() {
			if slices.Contains(apps, am.App) {
				out = append(out, hostMachine{host: h.ID, app: am.App, id: am.Machine.ID, region: am.Machine.Region, state: am.Machine.State})
			}
		}
	}
	return out
}

// countSample is one reading of a group's started machines per region.
type countSample struct {
	at      time.Time
	group   string
	started map[string][]string // region → machine ids
}

// sampleCounts reads, per group of app, the machines started on live
// hosts that the catalog does not hold lost or doomed (those the
// reconciler replaced and will destroy). The hosts are read before the
// catalog: a machine the reconciler marks lost and replaces between the
// two reads shows as lost, never as one more.
func (c *Cluster) sampleCounts(ctx context.Context, app string) ([]countSample, bool) {
	at := time.Now()
	hms := c.hostMachines(app)
	entries, ok := c.catalogEntries(ctx, app)
	if !ok {
		return nil, false
	}
	by := map[string]*countSample{}
	for _, hm := range hms {
		e, known := entries[hm.id]
		if hm.state != api.StateStarted || !known || e.Lost || e.Doomed || e.Group == "" {
			continue
		}
		cs := by[e.Group]
		if cs == nil {
			cs = &countSample{at: at, group: e.Group, started: map[string][]string{}}
			by[e.Group] = cs
		}
		r := e.For
		if r == "" {
			r = e.Region
		}
		cs.started[r] = append(cs.started[r], hm.id+" (on "+hm.host+", recorded "+e.Created.Format("15:04:05.000")+")")
	}
	var out []countSample
	for _, g := range slices.Sorted(maps.Keys(by)) {
		out = append(out, *by[g])
	}
	return out, true
}

// newChaosRand is a generator of the run's choices, from its seed and a
// stream of its own per use.
func newChaosRand(seed int64, stream uint64) *rand.Rand {
	return rand.New(rand.NewPCG(uint64(seed), stream))
}

// httpClient is the chaos client's: keep-alive, bounded waits.
func chaosHTTPClient(concurrency int) *http.Client {
	return &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: concurrency * 2},
		Timeout:   20 * time.Second,
	}
}
