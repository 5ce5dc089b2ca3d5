package server

import (
	"context"
	"slices"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/place"
)

// queue holds the creates that found no room. Whenever room may have
// appeared (the cluster changed, or a second passed) the placer serves them
// one at a time in Dominant Resource Fairness order: the org with the least
// dominant share first. An org may hold more than its share while capacity
// is idle (nobody waits); when an org below its share waits and nothing is
// free, the orgs above theirs give back first: the newest of their machines
// that make up the claim are stopped (reclaimed), never destroyed.
type queue struct {
	mu      sync.Mutex
	seq     uint64
	waiting []*waiter
	kick    chan struct{}
}

type waiter struct {
	p     place.Pending
	req   place.Request // what it asks of placement, to see if it fits now
	turn  chan struct{} // closed when it is this waiter's turn to try
	claim bool          // a reclaim was already made on its behalf
}

func newQueue() queue { return queue{kick: make(chan struct{}, 1)} }

// wait queues a request and returns when it is its turn to try again, at the
// deadline, or when ctx ends.
func (q *queue) wait(ctx context.Context, req place.Request, deadline time.Time) error {
	q.mu.Lock()
	q.seq++
	w := &waiter{p: place.Pending{Org: req.Org, Demand: req.Guest, Seq: q.seq}, req: req, turn: make(chan struct{})}
	q.waiting = append(q.waiting, w)
	q.mu.Unlock()
	q.poke()
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-w.turn:
		return nil
	case <-ctx.Done():
		q.remove(w)
		return ctx.Err()
	case <-t.C:
		q.remove(w)
		return nil
	}
}

func (q *queue) poke() {
	select {
	case q.kick <- struct{}{}:
	default:
	}
}

func (q *queue) remove(w *waiter) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.waiting = slices.DeleteFunc(q.waiting, func(x *waiter) bool { return x == w })
}

// run serves the queue until ctx ends.
func (p *placer) run(ctx context.Context) {
	changes, unsubscribe := p.cluster.Subscribe()
	defer unsubscribe()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-changes:
		case <-tick.C:
		case <-p.queue.kick:
		}
		p.serve(ctx)
	}
}

// serve takes the waiting requests in Dominant Resource Fairness order (the
// org with the least dominant share first) and gives the turn to the first
// that placement says fits now. When none fits, the first in that order may
// have bursting orgs give back room for it, once.
func (p *placer) serve(ctx context.Context) {
	q := &p.queue
	q.mu.Lock()
	waiting := slices.Clone(q.waiting)
	q.mu.Unlock()
	if len(waiting) == 0 {
		return
	}
	fair, byOrg := p.fairness(ctx)
	pending := make([]place.Pending, len(waiting))
	for i, w := range waiting {
		pending[i] = w.p
	}
	var first *waiter
	for len(waiting) > 0 {
		i := fair.Next(pending)
		w := waiting[i]
		if first == nil {
			first = w
		}
		if p.fits(w.req) {
			q.mu.Lock()
			n := len(q.waiting)
			q.waiting = slices.DeleteFunc(q.waiting, func(x *waiter) bool { return x == w })
			gone := len(q.waiting) == n // it gave up meanwhile
			q.mu.Unlock()
			if !gone {
				close(w.turn)
			}
			return
		}
		waiting = slices.Delete(waiting, i, i+1)
		pending = slices.Delete(pending, i, i+1)
	}
	q.mu.Lock()
	claimed := first.claim
	first.claim = true
	active := make([]string, 0, len(q.waiting))
	for _, w := range q.waiting {
		active = append(active, w.p.Org)
	}
	q.mu.Unlock()
	if claimed {
		return
	}
	claims := fair.Reclaim(first.p, active)
	if len(claims) == 0 {
		return
	}
	// Stopping waits for workloads to exit: not on the queue's loop.
	p.goOwned(func() {
		for _, c := range claims {
			p.reclaim(ctx, c, byOrg[c.Org])
		}
		q.poke()
	})
}

// fairness is the cluster's capacity and each org's running share of it,
// from the machine entries (which know guests' sizes) and the snapshot
// (which knows what runs).
func (p *placer) fairness(ctx context.Context) (*place.Fair, map[string][]machineEntry) {
	snap := p.cluster.Snapshot()
	var total place.Resources
	for _, h := range snap.Hosts() {
		if h.Up() {
			total = total.Add(place.Resources{CPUs: h.Capacity.CPUs, MemoryMB: h.Capacity.MemoryMB})
		}
	}
	f := place.NewFair(total)
	byOrg := map[string][]machineEntry{}
	es, err := p.machines.List(ctx, "")
	if err != nil {
		p.log.Warn("fairness: list machines", "err", err)
		return f, byOrg
	}
	for _, e := range es {
		var me machineEntry
		if decodeJSON(e.Value, &me) != nil {
			continue
		}
		m := snap.Machine(me.ID)
		if m == nil || !runs(m.State) {
			continue
		}
		if h := snap.Host(me.Host); h == nil || !h.Up() {
			continue
		}
		f.Allocate(me.Org, place.Resources{CPUs: me.CPUs, MemoryMB: me.MemoryMB})
		byOrg[me.Org] = append(byOrg[me.Org], me)
	}
	return f, byOrg
}

// runs reports whether a machine in state s holds its share of a host.
func runs(s string) bool {
	switch s {
	case api.StateStarted, api.StateStarting, api.StateCreating, api.StateRestarting, api.StateUpdating:
		return true
	}
	return false
}

// reclaim stops the newest running machines of c.Org until c.Amount is given
// back.
func (p *placer) reclaim(ctx context.Context, c place.Claim, ms []machineEntry) {
	slices.SortFunc(ms, func(a, b machineEntry) int { return b.Created.Compare(a.Created) })
	var got place.Resources
	for _, me := range ms {
		if got.CPUs >= c.Amount.CPUs && got.MemoryMB >= c.Amount.MemoryMB {
			return
		}
		hc, err := p.hostClient(me.Host)
		if err != nil {
			continue
		}
		if err := hc.Stop(ctx, me.App, me.ID, api.StopMachineInput{}); err != nil {
			p.log.Warn("reclaim: stop machine", "org", c.Org, "machine", me.ID, "err", err)
			continue
		}
		p.log.Info("reclaimed a bursting org's machine", "org", c.Org, "app", me.App, "machine", me.ID)
		got = got.Add(place.Resources{CPUs: me.CPUs, MemoryMB: me.MemoryMB})
	}
}
