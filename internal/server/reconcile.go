package server

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/place"
	"github.com/flamehq/flame/internal/reconcile"
)

// The reconciler keeps every declared group true. It holds a lock in the
// catalog (a key with a TTL it refreshes) so that of several control planes
// one reconciles at a time; the others take over when the lock expires.
//
// Each pass reads the group, the app's machine entries, the cluster
// snapshot and the room in each region, asks reconcile.Decide for a plan
// (what a group promises is listed there) and applies it. It keeps no state
// of its own between passes — a group's failure backoff and pending reasons
// live on its record in the catalog — so a pass repeated, interrupted or run
// by another server after a restart converges to the same place. Around the
// groups' passes, settleLeftBehind destroys what was replaced while its host
// was away, and what is left of deleted apps.

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
	defer func() {
		cancel()
		s.leading.Store(false)
		if rev != 0 {
			s.releaseLock(rev)
		}
	}()
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
			s.leading.Store(false)
		case err == nil && n != 0 && rev == 0:
			var l context.Context
			l, cancel = leadContext(ctx)
			lead.Store(&l)
			s.leading.Store(true)
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

// Leading reports whether this server holds the reconciler lock now: of
// the control planes sharing a catalog, one at a time does.
func (s *Server) Leading() bool { return s.leading.Load() }

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

// releaseLock gives the reconciler lock up as this server stops, so that
// another takes over at once rather than when it expires. Only the
// revision this server wrote is deleted.
func (s *Server) releaseLock(rev uint64) {
	ctx, cancel := context.WithTimeout(context.Background(), lockTTL/3)
	defer cancel()
	if err := s.locks.Delete(ctx, lockReconciler, rev); err != nil && !errors.Is(err, catalog.ErrConflict) && !errors.Is(err, catalog.ErrNotFound) {
		s.log.Warn("reconciler lock: release", "err", err)
	}
}

// ReconcileOnce runs one pass over every declared group, then settles the
// machines left behind on hosts that were down.
func (s *Server) ReconcileOnce(ctx context.Context) {
	ctx = asControlPlane(ctx)
	if now := s.cfg.Now(); now.Sub(s.lastSettle) >= SettleInterval {
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

// SettleInterval is how often the reconciler looks for machines left behind.
const SettleInterval = 5 * time.Second

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
		if !me.Lost && !me.Doomed && hostStatus(snap.Host(me.Host), false) == reconcile.HostUp &&
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
		case h == nil || s.hostRevoked(me.Host): // gone, or never to be called again
			if s.cfg.Now().Sub(me.Marked) > forgetLeftBehind {
				s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
			}
		case h.Up():
			s.log.Info("destroying a machine left behind on a host that returned", "app", me.App, "machine", me.ID, "host", me.Host)
			// Recorded first, as every destroy is, so include_deleted shows it.
			err := s.bury(ctx, me)
			var c *api.Client
			if err == nil {
				c, err = s.hostClient(me.Host)
			}
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

// reconcileGroup runs one pass over a group: it reads the group's entries,
// the cluster's facts and the room there is, asks reconcile.Decide for a
// plan, applies it, and keeps the plan's backoff and pending reasons (with
// what applying it taught) on the group's record.
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
	now := s.cfg.Now().UTC().Round(0)
	guest := guestOf(g.Config)
	in := s.planInput(g, all, snap, now)
	in.Room = s.room(snap, now, guest)
	byID := map[string]machineEntry{}
	for _, me := range all {
		byID[me.ID] = me
	}
	s.howStopped(ctx, &in, byID)
	p := reconcile.Decide(in)
	// halted holds the regions that place nothing more this pass: no room
	// after all, or a failure (the backoff says when to try again).
	halted := map[string]bool{}
	failed := func(region, machineID, cause string, counted bool) {
		halted[region] = true
		b := p.Backoff[region]
		if counted {
			b.LastError = cause
		} else {
			b = b.Failed(now, machineID, cause, in.Policy)
		}
		p.Backoff[region] = b
		s.log.Warn("group machine failed; backing off", "app", g.App, "group", g.Name, "region", region,
			"machine", machineID, "failures", b.Failures, "retry_at", b.Until, "cause", cause)
	}
	var errs []error
	for _, act := range p.Actions {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		me := byID[act.Machine]
		log := s.log.With("app", g.App, "group", g.Name, "region", act.Region, "machine", act.Machine, "why", act.Why)
		switch act.Kind {
		case reconcile.MarkLost:
			me.Lost, me.Marked = true, now
			if _, err := s.machines.Put(ctx, machineKey(me.App, me.ID), mustJSON(me)); err != nil {
				errs = append(errs, err)
				continue
			}
			log.Warn("machine lost with its host; replacing it", "host", me.Host)
		case reconcile.Destroy:
			if err := s.destroy(ctx, me, true); err != nil {
				errs = append(errs, fmt.Errorf("destroy %s: %w", me.ID, err))
				continue
			}
			log.Info("reconciler destroyed machine", "host", me.Host)
		case reconcile.Start, reconcile.Promote:
			refused, err := s.startGroupMachine(ctx, me, act.Kind == reconcile.Promote)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				delete(p.Started, me.ID) // its failure is counted here
				failed(act.Region, me.ID, fmt.Sprintf("start machine %s: %v", me.ID, err), act.Retry)
				continue
			}
			if refused != nil {
				// No start happened: none is to be judged by how long it
				// lasts.
				if r, ok := g.Started[me.ID]; ok {
					p.Started[me.ID] = r
				} else {
					delete(p.Started, me.ID)
				}
				log.Info("reconciler did not start machine: its host refused; the next pass sees it again",
					"host", me.Host, "promoted", act.Kind == reconcile.Promote, "refusal", hostError(refused))
				continue
			}
			log.Info("reconciler started machine", "host", me.Host, "promoted", act.Kind == reconcile.Promote)
		case reconcile.Place:
			if halted[act.Region] {
				continue
			}
			m, err := s.placeForGroup(ctx, a, g, act)
			var ae *api.Error
			switch {
			case errors.As(err, &ae) && ae.Status == http.StatusServiceUnavailable:
				// No room after all, or a host that did not answer.
				halted[act.Region] = true
				p.Pending[act.Region] = ae.Message
			case errors.As(err, &ae):
				failed(act.Region, "", fmt.Sprintf("create: %v", ae), false)
			case err != nil:
				if ctx.Err() != nil {
					return ctx.Err()
				}
				errs = append(errs, fmt.Errorf("place a machine for %s: %w", act.Region, err))
			case m.State == api.StateFailed || m.State == api.StateLaunchFailed:
				failed(act.Region, m.ID, fmt.Sprintf("machine %s failed to launch: %s", m.ID, failureCause(m)), false)
			default:
				if !act.Standby {
					// Started by its create: judged as any start.
					p.Started[m.ID] = reconcile.Run{At: now}
				}
				log.Info("reconciler placed machine", "placed", m.ID, "in", m.Region, "standby", act.Standby)
			}
		}
	}
	if err := s.keepPlan(ctx, g, p); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// howStopped asks the hosts how the machines the reconciler started lately
// and that are stopped now ended: one stopped on request (by its user, or
// the fair queue) did not stop by itself, and its start is forgotten; for
// the others the plan's cause tells the exit. It asks at most once a pass
// per such start, until the plan judges it and forgets it.
func (s *Server) howStopped(ctx context.Context, in *reconcile.Input, byID map[string]machineEntry) {
	for i, m := range in.Machines {
		if _, ok := in.Group.Started[m.ID]; !ok || m.Host != reconcile.HostUp || m.State != machine.Stopped {
			continue
		}
		me := byID[m.ID]
		c, err := s.hostClient(me.Host)
		if err != nil {
			continue
		}
		am, err := c.Get(ctx, me.App, me.ID)
		if err != nil {
			continue
		}
		switch x := lastExit(am); {
		case x == nil:
		case x.RequestedStop:
			in.Group.Started = maps.Clone(in.Group.Started)
			delete(in.Group.Started, m.ID)
		case x.OOMKilled:
			in.Machines[i].Exit = "out of memory"
		case x.Signal != 0:
			in.Machines[i].Exit = fmt.Sprintf("killed by signal %d", x.Signal)
		default:
			in.Machines[i].Exit = fmt.Sprintf("exit code %d", x.ExitCode)
		}
	}
}

// lastExit is how a machine's last run ended, as its events say; nil when
// they do not.
func lastExit(m *api.Machine) *api.ExitEvent {
	for _, e := range m.Events { // newest first
		if e != nil && e.Request != nil && e.Request.ExitEvent != nil {
			return e.Request.ExitEvent
		}
	}
	return nil
}

// hostStatus is what the reconciler may conclude from the view of a
// machine's host h: down (dead or left, or revoked: its machines are
// lost), up (what it does not show it does not have), or unknown. A host
// up whose facts have not arrived is unknown: a view that knows it only as
// a member (a control plane just started, whose facts come by gossip after
// the membership) knows nothing of its machines, and must not take their
// absence for loss. (A revoked host's facts are refused for good: it is
// down however its membership looks.)
func hostStatus(h *cluster.Host, revoked bool) reconcile.HostStatus {
	switch {
	case revoked:
		return reconcile.HostDown
	case h == nil:
		return reconcile.HostUnknown
	case h.Status == cluster.StatusDead || h.Status == cluster.StatusLeft:
		return reconcile.HostDown
	case h.Up() && h.Version > 0:
		return reconcile.HostUp
	}
	return reconcile.HostUnknown
}

// hostRevoked reports whether the catalog's record of host id (as cached)
// says it is revoked.
func (s *Server) hostRevoked(id string) bool {
	if s.ident == nil {
		return false
	}
	r, ok := s.ident.cache.get(id)
	return ok && r.Revoked
}

// policy is the reconciler's timings.
func (s *Server) policy() reconcile.Policy {
	return reconcile.Policy{LostAfter: s.cfg.LostAfter, BackoffBase: s.cfg.FailureBackoff, BackoffMax: s.cfg.FailureBackoffMax}
}

// planInput is what the plan of group g reads, but the room: the group,
// and each of its machines' entries with what the cluster shows of it.
func (s *Server) planInput(g group, es []machineEntry, snap *cluster.Snapshot, now time.Time) reconcile.Input {
	in := reconcile.Input{Now: now, Policy: s.policy(), Group: reconcile.Group{
		Regions: g.Regions, Standbys: g.Standbys, Spill: g.Spill, Guest: guestOf(g.Config),
		Backoff: g.Backoff, Pending: g.Pending, Started: g.Started,
	}}
	for _, me := range es {
		if me.Group != g.Name {
			continue
		}
		m := reconcile.Machine{ID: me.ID, Slot: me.slot(), Created: me.Created, Standby: me.Standby}
		m.Host = hostStatus(snap.Host(me.Host), s.hostRevoked(me.Host))
		if cm := snap.Machine(me.ID); cm != nil && cm.Host == me.Host {
			m.State = machine.State(cm.State)
		}
		in.Machines = append(in.Machines, m)
	}
	return in
}

// room counts, per region, how many more machines of guest the hosts there
// have room for now, as the placer sees them (reservations included).
func (s *Server) room(snap *cluster.Snapshot, now time.Time, guest place.Resources) map[string]int {
	s.placer.mu.Lock()
	hosts := s.placer.hostsLocked(snap, now)
	s.placer.mu.Unlock()
	out := map[string]int{}
	for _, h := range hosts {
		if h.Health <= 0 {
			continue
		}
		n := h.Free.CPUs / max(guest.CPUs, 1)
		if guest.MemoryMB > 0 {
			n = min(n, h.Free.MemoryMB/guest.MemoryMB)
		}
		out[h.Region] += max(n, 0)
	}
	return out
}

// placeForGroup creates one machine of the group where the action allows.
// The plan places only where it counted room, so the create rarely waits
// for room in the fair queue; when it does, the answer after the wait says
// so.
func (s *Server) placeForGroup(ctx context.Context, a app, g group, act reconcile.Action) (*api.Machine, error) {
	in := api.LaunchMachineInput{Config: g.Config, SkipLaunch: act.Standby}
	return s.create(ctx, a, in, act.Regions, intent{Group: g.Name, Standby: act.Standby, For: act.Region})
}

// failureCause is what a failed machine's events say of why.
func failureCause(m *api.Machine) string {
	for i := len(m.Events) - 1; i >= 0; i-- {
		if e := m.Events[i]; e != nil && e.Request != nil && e.Request.Message != "" {
			return e.Request.Message
		}
	}
	return "state " + m.State
}

// errGroupChanged aborts keeping a plan for a group declared again since.
var errGroupChanged = errors.New("group declared again")

// keepPlan stores the plan's backoff, pending reasons and starts on the
// group's record, when they changed and the group was not declared again
// since.
func (s *Server) keepPlan(ctx context.Context, g group, p reconcile.Plan) error {
	if sameBackoff(g.Backoff, p.Backoff) && maps.Equal(g.Pending, p.Pending) &&
		maps.EqualFunc(g.Started, p.Started, func(x, y reconcile.Run) bool { return x.At.Equal(y.At) && x.Seen == y.Seen }) {
		return nil
	}
	_, _, err := catalog.UpdateJSON(ctx, s.groups, groupKey(g.App, g.Name), func(v *group, exists bool) error {
		if !exists || v.AppID != g.AppID || !v.Updated.Equal(g.Updated) {
			return errGroupChanged
		}
		v.Backoff, v.Pending, v.Started = p.Backoff, p.Pending, p.Started
		return nil
	})
	if errors.Is(err, errGroupChanged) {
		return nil
	}
	return err
}

func sameBackoff(a, b map[string]reconcile.Backoff) bool {
	return maps.EqualFunc(a, b, func(x, y reconcile.Backoff) bool {
		return x.Failures == y.Failures && x.Until.Equal(y.Until) && x.At.Equal(y.At) &&
			x.LastError == y.LastError && x.Machine == y.Machine
	})
}

// startGroupMachine starts a machine of a group; promote also records a
// standby as one of the group's machines. A start the host refuses with
// 409 (the machine is leased, or in a state that cannot start) started
// nothing and is no error either: it is returned as refused, and the next
// pass sees where the machine went.
func (s *Server) startGroupMachine(ctx context.Context, me machineEntry, promote bool) (refused, err error) {
	c, err := s.hostClient(me.Host)
	if err != nil {
		return nil, err
	}
	if _, err := c.Start(ctx, me.App, me.ID); errors.Is(err, api.ErrConflict) {
		refused = err
	} else if err != nil {
		return nil, hostError(err)
	}
	if !promote {
		return refused, nil
	}
	_, _, err = catalog.UpdateJSON(ctx, s.machines, machineKey(me.App, me.ID), func(v *machineEntry, exists bool) error {
		if !exists {
			return catalog.ErrDelete
		}
		v.Standby = false
		return nil
	})
	return refused, err
}
