package agent

import (
	"cmp"
	"slices"
	"time"

	"github.com/flamehq/flame/internal/machine"
)

// Destroyed machines stay listed (include_deleted) for a while, with their
// events, and then are forgotten: a record past the retention, or past the
// newest DestroyedPerApp of its app or DestroyedPerHost of the host, is
// deleted from memory and from the store. Without a bound, every create a
// host refuses (an image that cannot be run) would keep its whole config
// for good.

// expiredDestroyed returns the ids of the destroyed records among recs to
// delete at now: those destroyed longer than retention ago, and beyond the
// newest perApp of their app and the newest perHost in all, oldest first.
// A record's destruction time is its last update.
func expiredDestroyed(recs []*record, now time.Time, retention time.Duration, perApp, perHost int) []string {
	var dead []*record
	for _, r := range recs {
		if r.State == machine.Destroyed {
			dead = append(dead, r)
		}
	}
	// Newest first; ties broken by id so the choice does not depend on
	// the order recs came in.
	slices.SortFunc(dead, func(x, y *record) int {
		if c := y.UpdatedAt.Compare(x.UpdatedAt); c != 0 {
			return c
		}
		return cmp.Compare(y.ID, x.ID)
	})
	var out []string
	kept, keptApp := 0, map[string]int{}
	for _, r := range dead {
		if now.Sub(r.UpdatedAt) > retention || kept >= perHost || keptApp[r.App] >= perApp {
			out = append(out, r.ID)
			continue
		}
		kept++
		keptApp[r.App]++
	}
	slices.Reverse(out)
	return out
}

// pruneDestroyed deletes the destroyed records expiredDestroyed picks,
// with their events. One whose lock is held (an operation is about to find
// it destroyed) is left to the next prune, so that a prune never waits on
// a machine: the caller may hold its own machine's lock.
func (a *Agent) pruneDestroyed() {
	a.pruneMu.Lock()
	defer a.pruneMu.Unlock()
	ms := a.all()
	recs := make([]*record, len(ms))
	for i, m := range ms {
		recs[i] = m.rec.Load()
	}
	ids := expiredDestroyed(recs, a.now(), a.cfg.DestroyedRetention, a.cfg.DestroyedPerApp, a.cfg.DestroyedPerHost)
	if len(ids) == 0 {
		return
	}
	var locked []*mach
	var gone []string
	for _, id := range ids {
		m := a.lookup(id)
		if m == nil || !m.opMu.TryLock() {
			continue
		}
		if m.rec.Load().State != machine.Destroyed {
			m.opMu.Unlock()
			continue
		}
		locked = append(locked, m)
		gone = append(gone, id)
	}
	defer func() {
		for _, m := range locked {
			m.opMu.Unlock()
		}
	}()
	if len(gone) == 0 {
		return
	}
	if err := a.store.delete(gone); err != nil {
		a.log.Warn("forget destroyed machines", "machines", len(gone), "err", err)
		return
	}
	a.mu.Lock()
	for i, id := range gone {
		if a.machines[id] == locked[i] {
			delete(a.machines, id)
		}
	}
	a.mu.Unlock()
	a.log.Debug("forgot destroyed machines", "machines", len(gone))
}
