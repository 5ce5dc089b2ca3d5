package agent

import (
	"net/http"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/place"
)

// Capacity is how much a host may run at once: the guests of its running
// machines (and of those on their way up) must fit in it. Zero fields are
// unlimited. It is placement's amount of compute.
type Capacity = place.Resources

// guest is what one machine of config cfg takes from its host (the config's
// size, defaulted as the API defines).
func guest(cfg *api.MachineConfig) Capacity {
	cpus, mem := cfg.Size()
	return Capacity{CPUs: cpus, MemoryMB: mem}
}

// occupies reports whether a machine in state s holds its guest's share of
// the host: it runs, or is on its way up or down.
func occupies(s machine.State, skipLaunch bool) bool {
	switch s {
	case machine.Creating:
		return !skipLaunch
	case machine.Starting, machine.Started, machine.Restarting, machine.Updating,
		machine.Stopping, machine.Suspending, machine.Replacing:
		return true
	}
	return false
}

// Used is what the machines on this host hold of its capacity now.
func (a *Agent) Used() Capacity {
	var u Capacity
	for _, m := range a.all() {
		r := m.rec.Load()
		if occupies(r.State, r.SkipLaunch) {
			g := guest(r.Config)
			u.CPUs += g.CPUs
			u.MemoryMB += g.MemoryMB
		}
	}
	return u
}

// admit refuses a machine that needs more than the host has left, with 503
// so a control plane asks another host. except is a machine whose share is
// already counted and is being replaced by need (an update), or nil. The
// caller holds a.capMu until the machine's state shows that it occupies
// its share, so two admissions cannot both take the last of it.
func (a *Agent) admit(need Capacity, except *mach) error {
	c := a.cfg.Capacity
	if c.CPUs == 0 && c.MemoryMB == 0 {
		return nil
	}
	u := a.Used()
	if except != nil {
		if r := except.rec.Load(); occupies(r.State, r.SkipLaunch) {
			g := guest(r.Config)
			u.CPUs -= g.CPUs
			u.MemoryMB -= g.MemoryMB
		}
	}
	if (c.CPUs > 0 && u.CPUs+need.CPUs > c.CPUs) || (c.MemoryMB > 0 && u.MemoryMB+need.MemoryMB > c.MemoryMB) {
		return api.Errorf(http.StatusServiceUnavailable,
			"insufficient capacity: %d cpus and %d MB needed, %d cpus and %d MB free on this host",
			need.CPUs, need.MemoryMB, max(c.CPUs-u.CPUs, 0), max(c.MemoryMB-u.MemoryMB, 0))
	}
	return nil
}

// register admits a new machine, records it and makes it known, in one step
// under capMu: two creates cannot both take the last of the host, and an id
// the control plane chose twice is refused.
func (a *Agent) register(m *mach, r *record) error {
	a.capMu.Lock()
	defer a.capMu.Unlock()
	a.mu.RLock()
	_, dup := a.machines[r.ID]
	a.mu.RUnlock()
	if dup {
		return api.Errorf(http.StatusConflict, "machine %s already exists", r.ID)
	}
	if !r.SkipLaunch {
		if err := a.admit(guest(r.Config), nil); err != nil {
			return err
		}
	}
	if err := a.commit(m, r, newEvent(api.EventLaunch, string(machine.Creating), sourceUser)); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return api.Errorf(http.StatusServiceUnavailable, "agent is shutting down")
	}
	a.machines[r.ID] = m
	return nil
}
