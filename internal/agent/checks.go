package agent

import (
	"net/netip"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/check"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/machine"
)

// Addresser is implemented by drivers that give each machine its own
// address; the agent dials health checks there. Without it checks dial the
// host's loopback, where exec workloads listen.
type Addresser interface {
	PrivateIP(spec driver.Spec) (netip.Addr, bool)
}

// machineChecks runs the health checks of one started instance.
type machineChecks struct {
	instance string
	runner   *check.Runner

	mu       sync.Mutex
	statuses []check.Status
}

// syncChecks starts the checks of a machine that became started and stops
// them when it leaves started or changes version. It runs after every
// commit, under the machine's lock.
func (a *Agent) syncChecks(m *mach, r *record) {
	running := m.checks.Load()
	want := r.State == machine.Started
	if running != nil && (!want || running.instance != r.Instance) {
		running.runner.Close()
		m.checks.Store(nil)
		running = nil
		a.notify()
	}
	if !want || running != nil || a.ctx.Err() != nil {
		return
	}
	specs, err := check.Specs(r.Config)
	if err != nil {
		a.log.Warn("health checks", "machine", r.ID, "err", err)
		return
	}
	if len(specs) == 0 {
		return
	}
	mc := &machineChecks{instance: r.Instance}
	runner, err := check.New(check.RunnerConfig{
		Specs:  specs,
		Host:   a.privateIP(r),
		Now:    a.cfg.Now,
		Logger: a.cfg.Logger,
		OnChange: func(st []check.Status) {
			mc.mu.Lock()
			mc.statuses = st
			mc.mu.Unlock()
			a.notify()
		},
	})
	if err == nil {
		err = runner.Start(a.ctx)
	}
	if err != nil {
		a.log.Warn("health checks", "machine", r.ID, "err", err)
		return
	}
	mc.runner = runner
	mc.mu.Lock()
	if mc.statuses == nil {
		mc.statuses = runner.Statuses()
	}
	mc.mu.Unlock()
	m.checks.Store(mc)
}

// stopChecks stops every machine's checks (the agent is closing).
func (a *Agent) stopChecks() {
	for _, m := range a.all() {
		if mc := m.checks.Swap(nil); mc != nil {
			mc.runner.Close()
		}
	}
}

// checkStatuses renders the machine's current check results for the API.
func (m *mach) checkStatuses() []*api.CheckStatus {
	mc := m.checks.Load()
	if mc == nil {
		return nil
	}
	mc.mu.Lock()
	defer mc.mu.Unlock()
	out := make([]*api.CheckStatus, 0, len(mc.statuses))
	for _, s := range mc.statuses {
		var at *time.Time
		if !s.UpdatedAt.IsZero() {
			t := s.UpdatedAt.UTC()
			at = &t
		}
		out = append(out, &api.CheckStatus{Name: s.Name, Status: s.Status, Output: s.Output, UpdatedAt: at})
	}
	return out
}
