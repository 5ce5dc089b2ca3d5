package proxy

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/proxy/autostop"
)

// Autostop defaults. Fly's proxy checks every few minutes.
const (
	DefaultAutostopInterval = 5 * time.Minute
	DefaultDrainGrace       = time.Second
	DefaultDrainTimeout     = 30 * time.Second
)

// AutostopConfig configures the autostop loop of a host's proxy: every
// Interval it asks autostop.Plan which machines to stop, from the cluster
// snapshot, and stops those of its own host. A machine to stop is first
// taken out of rotation (Draining: its host publishes it cordoned, so
// every edge stops routing to it), then its requests and connections in
// flight drain, then it stops.
type AutostopConfig struct {
	// Stop stops (suspend: suspends, or stops where the driver cannot
	// suspend) a machine of this host; nil: this host stops nothing.
	Stop func(ctx context.Context, app, machineID string, suspend bool) error
	// Interval between passes (default 5 min).
	Interval time.Duration
	// Idle: a machine this proxy delivered to less than Idle ago is not
	// stopped (default half the interval: one pass without a request).
	Idle time.Duration
	// Grace is how long a machine stays out of rotation before it may stop,
	// so every edge learns of it (default 1 s); DrainTimeout bounds the wait
	// for what is in flight (default 30 s), after which it stops anyway.
	Grace        time.Duration
	DrainTimeout time.Duration
	// OnDrain is called when the machines out of rotation change: the host
	// republishes its facts (see Proxy.Draining).
	OnDrain func()
}

func (c *AutostopConfig) setDefaults() {
	if c.Interval == 0 {
		c.Interval = DefaultAutostopInterval
	}
	if c.Idle == 0 {
		c.Idle = c.Interval / 2
	}
	if c.Grace == 0 {
		c.Grace = DefaultDrainGrace
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = DefaultDrainTimeout
	}
}

func (c *AutostopConfig) validate(src Source) error {
	switch {
	case c.Interval < 0 || c.Idle < 0 || c.Grace < 0 || c.DrainTimeout < 0:
		return errors.New("proxy: an autostop duration is negative")
	case c.Stop != nil && src == nil:
		return errors.New("proxy: autostop decides from the cluster: a source is required")
	}
	return nil
}

// draining is the set of this host's machines autostop took out of
// rotation. A machine is revived (its stop called off) when a request
// needs it before its stop began.
type draining struct {
	mu     sync.Mutex
	ids    map[string]*drainState
	passes atomic.Int64 // autostop passes run
}

type drainState struct{ stopping bool }

// begin marks a machine draining; nil when it already is.
func (d *draining) begin(id string) *drainState {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ids[id] != nil {
		return nil
	}
	if d.ids == nil {
		d.ids = map[string]*drainState{}
	}
	st := &drainState{}
	d.ids[id] = st
	return st
}

// toStop reports whether st's drain is still on, and if so marks it
// stopping: it can no longer be revived.
func (d *draining) toStop(id string, st *drainState) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ids[id] != st {
		return false
	}
	st.stopping = true
	return true
}

// end removes st's drain, if it is still the machine's.
func (d *draining) end(id string, st *drainState) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ids[id] == st {
		delete(d.ids, id)
	}
}

// revive calls off a drain whose stop has not begun.
func (d *draining) revive(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	st := d.ids[id]
	if st == nil || st.stopping {
		return false
	}
	delete(d.ids, id)
	return true
}

func (d *draining) has(id string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ids[id] != nil
}

// Draining returns the machines of this host autostop is stopping: the host
// publishes them cordoned.
func (p *Proxy) Draining() map[string]bool {
	p.drain.mu.Lock()
	defer p.drain.mu.Unlock()
	out := make(map[string]bool, len(p.drain.ids))
	for id := range p.drain.ids {
		out[id] = true
	}
	return out
}

// startAutostop runs the autostop loop until ctx ends, when this host
// stops machines at all.
func (p *Proxy) startAutostop(ctx context.Context) {
	if p.cfg.Autostop.Stop == nil || p.cfg.Source == nil {
		return
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(p.cfg.Autostop.Interval)
		defer t.Stop()
		seen := map[string]activity{}
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				p.autostopPass(ctx, seen)
			}
		}
	}()
}

// activity is what a pass saw of one of this host's machines.
type activity struct {
	total   int64
	running bool
	last    time.Time // when a pass last saw it busy, newly running, or first saw it
}

// autostopPass stops, in the background, the machines of this host the
// plan names.
func (p *Proxy) autostopPass(ctx context.Context, seen map[string]activity) {
	defer p.drain.passes.Add(1)
	snap := p.cfg.Source.Snapshot()
	if snap == nil {
		return
	}
	now := p.cfg.Now()
	ms := p.autostopInput(snap, now, seen)
	for _, d := range autostop.Plan(ms, now, p.cfg.Autostop.Idle) {
		if d.Host != p.cfg.HostID {
			continue
		}
		st := p.drain.begin(d.MachineID)
		if st == nil {
			continue
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.drainAndStop(ctx, d, st)
		}()
	}
}

// autostopInput is the plan's view of the snapshot. seen keeps, for this
// host's machines, the requests counted at the last pass: a machine that
// took any since (or has some in flight, or is new, or was started since)
// was active now.
func (p *Proxy) autostopInput(snap *cluster.Snapshot, now time.Time, seen map[string]activity) []autostop.Machine {
	var out []autostop.Machine
	mine := map[string]bool{}
	for _, m := range snap.Machines() {
		if snap.Machine(m.ID) != m {
			continue
		}
		h := snap.HostOf(m)
		am := autostop.Machine{
			ID: m.ID, App: m.App, Region: m.Region, Host: m.Host, PrimaryRegion: m.PrimaryRegion,
			Running: m.State == "started" && !m.Cordoned && h != nil && h.Up(),
			Load:    m.Load, Mode: autostop.Suspend,
		}
		if len(m.Services) == 0 {
			am.Mode = autostop.Off
		}
		for _, s := range m.Services {
			switch s.Autostop {
			case cluster.AutostopStop:
				am.Mode = min(am.Mode, autostop.Stop)
			case cluster.AutostopSuspend:
			default:
				am.Mode = autostop.Off
			}
			am.MinRunning = max(am.MinRunning, s.MinMachinesRunning)
			if sl := s.Concurrency.SoftLimit; sl > 0 && (am.SoftLimit == 0 || sl < am.SoftLimit) {
				am.SoftLimit = sl
			}
		}
		if m.Host == p.cfg.HostID {
			mine[m.ID] = true
			live := p.load.InFlight(m.ID)
			am.Load = max(am.Load, live)
			a, ok := seen[m.ID]
			if total := p.load.total(m.ID); !ok || total != a.total || live > 0 || am.Running && !a.running || p.drain.has(m.ID) {
				a.total, a.last = total, now
			}
			a.running = am.Running
			seen[m.ID] = a
			am.LastActive = a.last
		}
		out = append(out, am)
	}
	for id := range seen {
		if !mine[id] {
			delete(seen, id)
		}
	}
	return out
}

// drainAndStop takes a machine out of rotation, waits for what is in
// flight to it (bounded), and stops it. It is back in rotation afterwards
// (stopped, or started still if the stop failed).
func (p *Proxy) drainAndStop(ctx context.Context, d autostop.Decision, st *drainState) {
	cfg := p.cfg.Autostop
	p.log.Info("autostop: taking machine out of rotation", "app", d.App, "machine", d.MachineID, "reason", d.Reason)
	p.drained()
	defer func() {
		p.drain.end(d.MachineID, st)
		p.drained()
	}()
	began := time.Now()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		waited := time.Since(began)
		n := p.load.InFlight(d.MachineID)
		if waited >= cfg.Grace && n == 0 {
			break
		}
		if waited >= cfg.DrainTimeout {
			p.log.Warn("autostop: stopping with requests still in flight", "machine", d.MachineID, "in_flight", n, "waited", waited)
			break
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if !p.drain.has(d.MachineID) {
			break
		}
	}
	if !p.drain.toStop(d.MachineID, st) {
		p.log.Info("autostop: a request needed the machine; it stays", "app", d.App, "machine", d.MachineID)
		return
	}
	if err := cfg.Stop(ctx, d.App, d.MachineID, d.Suspend); err != nil {
		p.log.Warn("autostop: stop failed; the machine goes back into rotation", "machine", d.MachineID, "err", err)
		return
	}
	p.log.Info("autostop: stopped machine", "app", d.App, "machine", d.MachineID, "suspend", d.Suspend)
}

func (p *Proxy) drained() {
	if p.cfg.Autostop.OnDrain != nil {
		p.cfg.Autostop.OnDrain()
	}
}
