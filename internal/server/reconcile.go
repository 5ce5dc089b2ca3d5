package server

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
)

// The reconciler keeps every declared group true. It holds a lock in the
// catalog (a key with a TTL it refreshes) so that of several control planes
// one reconciles at a time; the others take over when the lock expires.
//
// Each pass reads the group, the app's machine entries and the cluster
// snapshot, and acts on the difference; it keeps no state of its own
// between passes, so a pass repeated, interrupted or run by another server
// after a restart converges to the same place:
//
//   - a machine whose host died is marked lost and replaced: first by
//     starting a standby of its region (milliseconds), else by placing a new
//     machine, same region first, then the nearest with room;
//   - a lost machine whose host comes back is destroyed (it was replaced);
//   - an entry whose live host has not shown its machine for LostAfter (the
//     control plane died between recording and creating it) is dropped;
//   - a region with too many machines destroys its newest extras;
//   - each region with machines keeps Standbys stopped machines ready.

const lockReconciler = "reconciler"

// lockTTL is how long the reconciler lock outlives its holder.
const lockTTL = 6 * time.Second

func (s *Server) pokeReconciler() {
	select {
	case s.reconcileKick <- struct{}{}:
	default:
	}
}

func (s *Server) reconcileLoop(ctx context.Context) {
	changes, unsubscribe := s.cfg.Cluster.Subscribe()
	defer unsubscribe()
	tick := time.NewTicker(s.cfg.ReconcileInterval)
	defer tick.Stop()
	ctx = asControlPlane(ctx)
	var lead atomic.Pointer[context.Context]
	s.wg.Go(func() { s.leadLoop(ctx, &lead) })
	for {
		if l := lead.Load(); l != nil && (*l).Err() == nil {
			s.ReconcileOnce(*l)
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-changes:
			// Changes come in bursts (every create is one): take them
			// together.
			select {
			case <-ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
		case <-s.reconcileKick:
		}
	}
}

// leadLoop keeps the reconciler lock while it can, refreshing it every third
// of its TTL, and publishes a context that lives while this server holds it:
// a pass under way when the lock is lost is cancelled, so two servers never
// reconcile at once for longer than a refresh takes.
func (s *Server) leadLoop(ctx context.Context, lead *atomic.Pointer[context.Context]) {
	var rev uint64
	cancel := context.CancelFunc(func() {})
	defer func() { cancel() }()
	t := time.NewTicker(lockTTL / 3)
	defer t.Stop()
	for {
		n, err := s.holdLock(ctx, rev)
		if err != nil && ctx.Err() == nil {
			s.log.Warn("reconciler lock", "err", err)
		}
		switch {
		case (err != nil || n == 0) && rev != 0:
			cancel()
			lead.Store(nil)
		case err == nil && n != 0 && rev == 0:
			var l context.Context
			l, cancel = leadContext(ctx)
			lead.Store(&l)
			s.pokeReconciler()
		}
		if err != nil {
			n = 0
		}
		rev = n
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// leadContext is the context of one stretch of holding the lock; leadLoop
// cancels it when the stretch ends, and at the latest when it returns.
func leadContext(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithCancel(ctx)
}

// holdLock takes or refreshes the reconciler lock. It returns the lock's
// revision while this server holds it, 0 while another does.
func (s *Server) holdLock(ctx context.Context, rev uint64) (uint64, error) {
	me := []byte(s.id)
	if rev != 0 {
		n, err := s.locks.Refresh(ctx, lockReconciler, me, rev, lockTTL)
		if err == nil {
			return n, nil
		}
		if !errors.Is(err, catalog.ErrConflict) && !errors.Is(err, catalog.ErrNotFound) {
			return 0, err
		}
		s.log.Info("reconciler lock lost")
	}
	n, err := s.locks.Create(ctx, lockReconciler, me, lockTTL)
	if errors.Is(err, catalog.ErrExists) {
		e, gerr := s.locks.Get(ctx, lockReconciler)
		if gerr == nil && string(e.Value) == s.id {
			// Ours from before a restart of this loop: carry on with it.
			return s.locks.Refresh(ctx, lockReconciler, me, e.Revision, lockTTL)
		}
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	s.log.Info("reconciler lock taken")
	return n, nil
}

// ReconcileOnce runs one pass over every declared group, then settles the
// machines left behind on hosts that were down.
func (s *Server) ReconcileOnce(ctx context.Context) {
	ctx = asControlPlane(ctx)
	if now := s.cfg.Now(); now.Sub(s.lastSettle) >= settleInterval {
		// It reads every entry of every app: not on every change.
		s.lastSettle = now
		defer s.settleLeftBehind(ctx)
	}
	gs, err := s.listAllGroups(ctx)
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("reconcile: list groups", "err", err)
		}
		return
	}
	for _, g := range gs {
		if ctx.Err() != nil {
			return
		}
		if err := s.reconcileGroup(ctx, g); err != nil && ctx.Err() == nil {
			s.log.Warn("reconcile group", "app", g.App, "group", g.Name, "err", err)
		}
	}
}

// settleInterval is how often the reconciler looks for machines left behind.
const settleInterval = 5 * time.Second

// forgetLeftBehind is how long a lost or doomed machine's entry is kept when
// the cluster no longer knows its host (it keeps dead hosts 72 h).
const forgetLeftBehind = 73 * time.Hour

// settleLeftBehind destroys the machines of apps that are gone, and the
// lost and doomed machines whose hosts are back; it forgets those whose
// hosts the cluster has long forgotten, and entries a live host has not
// shown for LostAfter (a control plane that died between recording a
// machine and asking the host for it).
func (s *Server) settleLeftBehind(ctx context.Context) {
	all, err := s.allEntries(ctx, "")
	if err != nil {
		return
	}
	apps := map[string]string{} // name → id, "" when gone
	appID := func(name string) (string, bool) {
		if id, ok := apps[name]; ok {
			return id, true
		}
		a, _, err := catalog.GetJSON[app](ctx, s.apps, name)
		if err != nil && !errors.Is(err, catalog.ErrNotFound) {
			return "", false // unknown now: leave it for the next pass
		}
		apps[name] = a.ID
		return a.ID, true
	}
	snap := s.cfg.Cluster.Snapshot()
	now := s.cfg.Now()
	for _, me := range all {
		if id, ok := appID(me.App); !ok {
			continue
		} else if id != me.AppID && !me.Doomed {
			me.Doomed, me.Marked = true, now.UTC() // its app is gone
		}
		if h := snap.Host(me.Host); !me.Lost && !me.Doomed && h != nil && h.Up() &&
			snap.Machine(me.ID) == nil && now.Sub(me.Created) > s.cfg.LostAfter {
			s.log.Warn("forgetting a machine its host never showed", "app", me.App, "machine", me.ID, "host", me.Host)
			s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
			continue
		}
		if !me.Lost && !me.Doomed {
			continue
		}
		h := snap.Host(me.Host)
		switch {
		case h == nil:
			if s.cfg.Now().Sub(me.Marked) > forgetLeftBehind {
				s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
			}
		case h.Up():
			s.log.Info("destroying a machine left behind on a host that returned", "app", me.App, "machine", me.ID, "host", me.Host)
			c, err := s.hostClient(me.Host, "")
			if err == nil {
				err = c.Destroy(ctx, me.App, me.ID, true)
				if errors.Is(err, api.ErrNotFound) {
					err = nil
				}
			}
			if err != nil {
				s.log.Warn("destroy machine left behind", "machine", me.ID, "err", hostError(err))
				continue
			}
			s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
		}
	}
}

// machineGone reports whether a machine is not doing its job: failed,
// destroyed, or not (or no longer) on its host.
func machineGone(m *cluster.Machine) bool {
	if m == nil {
		return true
	}
	switch m.State {
	case api.StateFailed, api.StateDestroyed, api.StateDestroying, api.StateLaunchFailed:
		return true
	}
	return false
}

func (s *Server) reconcileGroup(ctx context.Context, g group) error {
	a, _, err := catalog.GetJSON[app](ctx, s.apps, g.App)
	if errors.Is(err, catalog.ErrNotFound) {
		return s.groups.Delete(ctx, groupKey(g.App, g.Name), 0)
	}
	if err != nil {
		return err
	}
	if g.AppID != a.ID {
		// Declared for an earlier app of the same name.
		return s.groups.Delete(ctx, groupKey(g.App, g.Name), 0)
	}
	all, err := s.entries(ctx, a)
	if err != nil {
		return err
	}
	snap := s.cfg.Cluster.Snapshot()
	now := s.cfg.Now()
	running := map[string][]machineEntry{}
	standby := map[string][]machineEntry{}
	for _, me := range all {
		if me.Group != g.Name {
			continue
		}
		h := snap.Host(me.Host)
		m := snap.Machine(me.ID)
		switch {
		case lost(snap, me):
			me.Lost, me.Marked = true, now.UTC()
			if _, err := s.machines.Put(ctx, machineKey(me.App, me.ID), mustJSON(me)); err != nil {
				return err
			}
			s.log.Warn("machine lost with its host", "app", g.App, "machine", me.ID, "host", me.Host, "region", me.Region)
			continue
		case h != nil && h.Up() && machineGone(m) && now.Sub(me.Created) > s.cfg.LostAfter:
			s.log.Warn("machine missing from its host; replacing it", "app", g.App, "machine", me.ID, "host", me.Host)
			if err := s.destroy(ctx, me, true); err != nil {
				return err
			}
			continue
		}
		if me.Standby {
			standby[me.slot()] = append(standby[me.slot()], me)
		} else {
			running[me.slot()] = append(running[me.slot()], me)
		}
	}
	regions := make([]string, 0, len(g.Regions))
	for r := range g.Regions {
		regions = append(regions, r)
	}
	for _, m := range []map[string][]machineEntry{running, standby} {
		for r := range m {
			if _, ok := g.Regions[r]; !ok && !slices.Contains(regions, r) {
				regions = append(regions, r)
			}
		}
	}
	slices.Sort(regions)
	for _, region := range regions {
		want := g.Regions[region]
		have := running[region]
		ready := standby[region]
		for len(have) < want {
			if len(ready) > 0 {
				sb := ready[0]
				ready = ready[1:]
				if err := s.promote(ctx, sb); err != nil {
					s.log.Warn("start standby", "machine", sb.ID, "err", err)
					continue
				}
				have = append(have, sb)
				continue
			}
			in := api.LaunchMachineInput{Config: g.Config, Region: region}
			m, err := s.create(ctx, a, in, []string{region, "any"}, intent{Group: g.Name, For: region})
			if err != nil {
				return err
			}
			s.log.Info("reconciler created machine", "app", g.App, "group", g.Name, "machine", m.ID, "for", region, "region", m.Region)
			have = append(have, machineEntry{ID: m.ID})
		}
		// Too many: destroy the newest.
		slices.SortFunc(have, func(x, y machineEntry) int { return y.Created.Compare(x.Created) })
		for len(have) > want {
			if err := s.destroy(ctx, have[0], true); err != nil {
				return err
			}
			have = have[1:]
		}
		wantReady := 0
		if want > 0 {
			wantReady = g.Standbys
		}
		for len(ready) < wantReady {
			in := api.LaunchMachineInput{Config: g.Config, SkipLaunch: true}
			m, err := s.create(ctx, a, in, []string{region, "any"}, intent{Group: g.Name, Standby: true, For: region})
			if err != nil {
				return err
			}
			s.log.Info("reconciler created standby", "app", g.App, "group", g.Name, "machine", m.ID, "for", region)
			ready = append(ready, machineEntry{ID: m.ID})
		}
		for len(ready) > wantReady {
			if err := s.destroy(ctx, ready[len(ready)-1], true); err != nil {
				return err
			}
			ready = ready[:len(ready)-1]
		}
	}
	return nil
}

// promote starts a standby and records it as one of the running machines.
func (s *Server) promote(ctx context.Context, me machineEntry) error {
	c, err := s.hostClient(me.Host, "")
	if err != nil {
		return err
	}
	if _, err := c.Start(ctx, me.App, me.ID); err != nil && !errors.Is(err, api.ErrConflict) {
		return hostError(err)
	}
	_, _, err = catalog.UpdateJSON(ctx, s.machines, machineKey(me.App, me.ID), func(v *machineEntry, exists bool) error {
		if !exists {
			return catalog.ErrDelete
		}
		v.Standby = false
		return nil
	})
	if err == nil {
		s.log.Info("standby started in place of a lost machine", "app", me.App, "machine", me.ID, "host", me.Host)
	}
	return err
}
