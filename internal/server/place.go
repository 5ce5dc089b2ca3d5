package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/place"
)

// maxAsks bounds how many hosts one create asks before it gives up (or
// waits in the queue for room).
const maxAsks = 8

// reservationTTL is how long a placed machine's share is held against its
// host before the host's own published facts must account for it.
const reservationTTL = 10 * time.Second

// hostCreateTimeout bounds a host's create (which may pull an image).
const hostCreateTimeout = 5 * time.Minute

// errNoRoom means no live host in the requested regions has room now.
var errNoRoom = errors.New("no room")

// refusedError is errNoRoom with what the hosts asked said when they
// refused: a refusal is not always for room (an image no host can pull
// now), and the caller is told which.
type refusedError struct{ refusals []string }

func (e *refusedError) Error() string { return "no room: " + strings.Join(e.refusals, "; ") }
func (e *refusedError) Unwrap() error { return errNoRoom }

// maxRefusalText bounds each host's refusal quoted back to the caller.
const maxRefusalText = 200

// placer turns the cluster snapshot into placement decisions and runs the
// market: ask the best host, take the next on a refusal. Hosts' published
// free capacity lags behind, so the placer holds each placed machine's share
// against its host (a reservation) until the host's facts show the machine;
// concurrent creates thus spread instead of all asking the same host.
type placer struct {
	placerDeps

	mu       sync.Mutex
	rng      *rand.Rand
	reserved map[string]map[string]reservation // host → machine → share

	// The queue of creates waiting for room, served fairly (see queue.go).
	queue queue
}

type reservation struct {
	app   string
	share place.Resources
	at    time.Time
	// placed is set once the host has taken the machine; seen is the
	// version of the host's facts known then. Facts of a later version
	// were published after the machine existed, so they count it (or its
	// end) and the reservation is no longer needed.
	placed bool
	seen   uint64
}

// placerDeps is what the placer works with; the server gives it.
type placerDeps struct {
	now      func() time.Time
	cluster  ClusterView
	rtt      place.RTT
	weights  place.Weights
	seed     uint64
	pending  time.Duration // how long a create waits for room
	machines catalog.Bucket
	// hostClient returns a client for a host's API.
	hostClient func(hostID string) (*api.Client, error)
	log        *slog.Logger
	// goOwned runs fn in a goroutine its owner waits for on close.
	goOwned func(fn func())
	// callable reports whether the control plane may call a host (it is
	// enrolled and not revoked); nil: every host.
	callable func(hostID string) bool
}

func newPlacer(d placerDeps) *placer {
	return &placer{
		placerDeps: d,
		rng:        rand.New(rand.NewPCG(d.seed, d.seed^0x9e3779b97f4a7c15)),
		reserved:   map[string]map[string]reservation{},
		queue:      newQueue(),
	}
}

// guestOf is what a machine of cfg takes from a host (as the agent counts).
func guestOf(cfg *api.MachineConfig) place.Resources {
	cpus, mem := cfg.Size()
	return place.Resources{CPUs: cpus, MemoryMB: mem}
}

// health is a host's fitness in [0,1]: zero for hosts that are not up, lower
// for suspect and busy ones.
func health(h *cluster.Host) float64 {
	switch h.Status {
	case cluster.StatusAlive:
		return 1 - 0.5*min(max(h.Load, 0), 1)
	case cluster.StatusSuspect:
		return 0.1
	}
	return 0
}

// hostsLocked is the snapshot's hosts as placement sees them: free capacity
// less what is reserved, reservations the facts now cover dropped.
func (p *placer) hostsLocked(snap *cluster.Snapshot, now time.Time) []place.Host {
	for hostID, rs := range p.reserved {
		h := snap.Host(hostID)
		for id, r := range rs {
			m := snap.Machine(id)
			if (m != nil && m.Host == hostID) || (r.placed && h != nil && h.Version > r.seen) || now.Sub(r.at) > reservationTTL {
				delete(rs, id)
			}
		}
		if len(rs) == 0 {
			delete(p.reserved, hostID)
		}
	}
	hs := snap.Hosts()
	out := make([]place.Host, 0, len(hs))
	for _, h := range hs {
		if h.Capacity.CPUs == 0 && h.Capacity.MemoryMB == 0 {
			continue // a member that runs no machines (a control plane)
		}
		if p.callable != nil && !p.callable(h.ID) {
			continue // a member that never enrolled, or a revoked host
		}
		free := place.Resources{CPUs: h.Free.CPUs, MemoryMB: h.Free.MemoryMB}
		for _, r := range p.reserved[h.ID] {
			free = free.Sub(r.share)
		}
		out = append(out, place.Host{
			ID: h.ID, Region: h.Region, Health: health(h),
			Capacity: place.Resources{CPUs: h.Capacity.CPUs, MemoryMB: h.Capacity.MemoryMB},
			Free:     place.Resources{CPUs: max(free.CPUs, 0), MemoryMB: max(free.MemoryMB, 0)},
		})
	}
	return out
}

// choose ranks the hosts for req and reserves the best one's share for the
// machine: one step under the lock, so concurrent creates see each other.
func (p *placer) choose(req place.Request, id string) (place.Host, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	snap := p.cluster.Snapshot()
	hosts := p.hostsLocked(snap, now)
	req.AppHosts = map[string]int{}
	for _, m := range snap.AppMachines(req.App) {
		req.AppHosts[m.Host]++
	}
	for hostID, rs := range p.reserved {
		for _, r := range rs {
			if r.app == req.App {
				req.AppHosts[hostID]++
			}
		}
	}
	cands := place.NewIndex(hosts, p.rtt).Rank(req, p.weights, p.rng, 1)
	if len(cands) == 0 {
		return place.Host{}, false
	}
	h := cands[0].Host
	if p.reserved[h.ID] == nil {
		p.reserved[h.ID] = map[string]reservation{}
	}
	p.reserved[h.ID][id] = reservation{app: req.App, share: req.Guest, at: now}
	return h, true
}

// placed marks a reservation as taken by its host.
func (p *placer) placed(hostID, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r, ok := p.reserved[hostID][id]
	if !ok {
		return
	}
	r.placed = true
	if h := p.cluster.Snapshot().Host(hostID); h != nil {
		r.seen = h.Version
	}
	p.reserved[hostID][id] = r
}

// fits reports whether some host would take req now.
func (p *placer) fits(req place.Request) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	hosts := p.hostsLocked(p.cluster.Snapshot(), p.now())
	return len(place.NewIndex(hosts, p.rtt).Rank(req, p.weights, nil, 1)) > 0
}

func (p *placer) unreserve(hostID, id string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.reserved[hostID], id)
}

// place runs the market for one machine and, when no host has room, waits
// in the fair queue for some (up to PendingTimeout).
func (p *placer) place(ctx context.Context, a app, in api.LaunchMachineInput, regions []string, it intent) (*api.Machine, error) {
	guest := guestOf(in.Config)
	if in.SkipLaunch && !it.Standby {
		// A created, stopped machine takes nothing yet. A standby does not
		// either, but it must find room to start when it is needed: place
		// it where its guest fits now.
		guest = place.Resources{}
	}
	var deadline time.Time
	if p.pending > 0 {
		deadline = p.now().Add(p.pending)
	}
	for {
		m, err := p.market(ctx, a, in, regions, guest, it)
		if !errors.Is(err, errNoRoom) {
			return m, err
		}
		if deadline.IsZero() || !p.now().Before(deadline) {
			msg := fmt.Sprintf("no host in %s has room for %d cpus and %d MB", strings.Join(regions, ","), guest.CPUs, guest.MemoryMB)
			if re, ok := errors.AsType[*refusedError](err); ok {
				msg = fmt.Sprintf("no host in %s took the machine (%d cpus, %d MB); the hosts asked answered: %s",
					strings.Join(regions, ","), guest.CPUs, guest.MemoryMB, strings.Join(re.refusals, "; "))
			}
			return nil, api.Errorf(http.StatusServiceUnavailable, "%s", msg)
		}
		req := place.Request{Org: a.Org, App: a.Name, Regions: regions, Guest: guest}
		if err := p.queue.wait(ctx, req, deadline); err != nil {
			return nil, err
		}
	}
}

// market asks the best hosts in turn until one creates the machine.
func (p *placer) market(ctx context.Context, a app, in api.LaunchMachineInput, regions []string, guest place.Resources, it intent) (*api.Machine, error) {
	req := place.Request{Org: a.Org, App: a.Name, Regions: regions, Guest: guest, Exclude: map[string]bool{}}
	key := machineKey(a.Name, in.ID)
	written := false
	var refusals []string
	for range maxAsks {
		h, ok := p.choose(req, in.ID)
		if !ok {
			break
		}
		// The entry first: a crash after the host creates the machine must
		// not leave a machine nobody knows where to find.
		g := guestOf(in.Config)
		me := machineEntry{ID: in.ID, App: a.Name, AppID: a.ID, Org: a.Org, Host: h.ID, Region: h.Region,
			Created: p.now().UTC(), Group: it.Group, Standby: it.Standby, For: it.For, CPUs: g.CPUs, MemoryMB: g.MemoryMB}
		if _, err := p.machines.Put(ctx, key, mustJSON(me)); err != nil {
			p.unreserve(h.ID, in.ID)
			return nil, fmt.Errorf("record machine %s: %w", in.ID, err)
		}
		written = true
		c, err := p.hostClient(h.ID)
		var m *api.Machine
		if err == nil {
			// Not cancelled with the client's request: a host half-way
			// through a create finishes it either way, and the entry must
			// stay true to that. Given up when the cluster declares the
			// host dead, though: a silent host must not hold the caller
			// (the reconciler, which works through groups one at a time)
			// for the whole timeout.
			cctx, cancel := p.untilHostDies(context.WithoutCancel(ctx), h.ID, hostCreateTimeout)
			m, err = c.Create(cctx, a.Name, in)
			cancel()
			var ae *api.Error
			if err != nil && !errors.As(err, &ae) {
				// No answer: the host may have created it. Keep the
				// entry; the machine shows up, or the reconciler forgets
				// the entry when the host never shows it. Asking another
				// host could run it twice.
				p.log.Warn("host did not answer a create", "host", h.ID, "machine", in.ID, "err", err)
				return nil, api.Errorf(http.StatusServiceUnavailable,
					"host %s did not answer; machine %s may still appear: %v", h.ID, in.ID, err)
			}
		}
		if err == nil {
			p.placed(h.ID, in.ID)
			p.log.Info("machine placed", "app", a.Name, "machine", in.ID, "host", h.ID, "region", h.Region)
			return m, nil
		}
		p.unreserve(h.ID, in.ID)
		var ae *api.Error
		if errors.As(err, &ae) && ae.Status != http.StatusServiceUnavailable {
			p.machines.Delete(context.WithoutCancel(ctx), key, 0)
			return nil, ae
		}
		if ctx.Err() != nil {
			p.machines.Delete(context.WithoutCancel(ctx), key, 0)
			return nil, ctx.Err()
		}
		p.log.Info("host refused machine", "host", h.ID, "machine", in.ID, "err", err)
		req.Exclude[h.ID] = true
		why := err.Error()
		if ae != nil {
			why = ae.Message
		}
		if len(why) > maxRefusalText {
			why = why[:maxRefusalText] + "…"
		}
		refusals = append(refusals, h.ID+": "+why)
	}
	if written {
		p.machines.Delete(context.WithoutCancel(ctx), key, 0)
	}
	if len(refusals) > 0 {
		return nil, &refusedError{refusals: refusals}
	}
	return nil, errNoRoom
}

// knownRegion reports whether code names a region of geo's table.
func knownRegion(code string) bool {
	_, ok := geo.Lookup(code)
	return ok
}

func mustJSON(v any) []byte {
	b, err := jsonMarshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

// untilHostDies is ctx bounded by timeout and by the life of host: it ends
// when the cluster shows the host dead or gone.
func (p *placer) untilHostDies(ctx context.Context, hostID string, timeout time.Duration) (context.Context, context.CancelFunc) {
	ctx, cancelTimeout := context.WithTimeout(ctx, timeout)
	ctx, cancel := context.WithCancelCause(ctx)
	changes, unsubscribe := p.cluster.Subscribe()
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer unsubscribe()
		for {
			if h := p.cluster.Snapshot().Host(hostID); h == nil || !h.Up() {
				cancel(fmt.Errorf("host %s is dead", hostID))
				return
			}
			select {
			case <-ctx.Done():
				return
			case <-changes:
			}
		}
	}()
	return ctx, func() {
		cancel(nil)
		cancelTimeout()
		<-done
	}
}
