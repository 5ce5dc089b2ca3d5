package devcluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"syscall"

	"github.com/flamehq/flame/api"
)

// Faults, as a crash would cause them. A killed machine's processes die
// at once (SIGKILL, no stop signal, no grace): its host sees the exit and
// applies the machine's restart policy, as it would after a crash. A
// killed host goes silent at once — the simulated network drops what it
// sends and holds what is sent to it, so its peers see no close, no reset
// and no goodbye, only silence, as from a server whose power was cut —
// and its machines' processes die with it, once its agent is closed (so
// nothing records their exits or restarts them); its proxy, gossip, API
// and DNS are then closed in the background, out of sight of the rest of
// the cluster, until Revive starts the host again (chaos.go). When the
// host had its region's edge, the global entry stops handing requests to
// that edge at once (as anycast withdraws the route of a dead point of
// presence) and moves the idempotent requests in flight through it to the
// next nearest edge; a client of the edge's real address may still be
// answered until the background close reaches it.

// ErrHostKilled is returned for a host that was already killed.
var ErrHostKilled = errors.New("devcluster: host already killed")

// faults is what the cluster knows of the faults injected into it.
type faults struct {
	mu     sync.Mutex
	killed map[string]bool // host ids
	wg     sync.WaitGroup  // the background closes of killed hosts
	// The network's faults (chaos.go).
	links  []LinkFault       // as asked for, in order
	stalls map[string]*stall // by host id
	closed bool              // no stall resumes
	// gone is closed, per killed host, once its background close is over.
	gone map[string]chan struct{}
}

// Killed reports whether the host was killed.
func (c *Cluster) Killed(hostID string) bool {
	c.faults.mu.Lock()
	defer c.faults.mu.Unlock()
	return c.faults.killed[hostID]
}

// KillMachine kills the processes of a started machine with SIGKILL, on
// whichever live host runs it, and returns that host. The host is not
// told beforehand: it learns of the exit as of a crash.
func (c *Cluster) KillMachine(ctx context.Context, app, machineID string) (*Host, error) {
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			continue
		}
		for _, am := range h.Agent.AllMachines() {
			if am.App != app || am.Machine.ID != machineID {
				continue
			}
			if err := h.Agent.SignalMachine(ctx, refOf(ctx, h, app, machineID), "SIGKILL"); err != nil {
				return nil, fmt.Errorf("devcluster: kill machine %s on %s: %w", machineID, h.ID, err)
			}
			return h, nil
		}
	}
	return nil, fmt.Errorf("devcluster: no live host runs machine %s of app %q", machineID, app)
}

// KillHost kills a host as a crash would: see the comment above. It
// returns once the host is silent and its machines' processes are gone;
// the host's components close in the background (Close waits for them).
func (c *Cluster) KillHost(ctx context.Context, hostID string) error {
	return c.kill(ctx, []string{hostID})
}

// KillRegion kills every live host of a region at once, and returns the
// ids of those it killed.
func (c *Cluster) KillRegion(ctx context.Context, region string) ([]string, error) {
	var ids []string
	for _, h := range c.Hosts {
		if h.Region == region && !c.Killed(h.ID) {
			ids = append(ids, h.ID)
		}
	}
	if len(ids) == 0 {
		return nil, fmt.Errorf("devcluster: no live host in region %q", region)
	}
	return ids, c.kill(ctx, ids)
}

// kill silences the hosts together first, then kills their machines and
// closes them.
func (c *Cluster) kill(ctx context.Context, ids []string) error {
	var hosts []*Host
	for _, id := range ids {
		h := c.host(id)
		if h == nil {
			return fmt.Errorf("devcluster: no host %q", id)
		}
		hosts = append(hosts, h)
	}
	c.faults.mu.Lock()
	for _, h := range hosts {
		if c.faults.killed[h.ID] {
			c.faults.mu.Unlock()
			return fmt.Errorf("%w: %s", ErrHostKilled, h.ID)
		}
	}
	if c.faults.killed == nil {
		c.faults.killed = map[string]bool{}
	}
	for _, h := range hosts {
		c.faults.killed[h.ID] = true
	}
	c.faults.mu.Unlock()

	// Silence first, all together: from here on nothing the hosts do is
	// seen by the rest of the cluster.
	for _, h := range hosts {
		c.Net.Kill(h.ID)
		if h.EdgeAddr != "" && c.global != nil {
			c.global.edgeDown(h.Region)
		}
	}
	var errs []error
	for _, h := range hosts {
		errs = append(errs, c.crash(ctx, h))
	}
	return errors.Join(errs...)
}

// crash kills a silenced host's machines and closes the host in the
// background. The agent is closed before the processes are listed and
// killed, so it neither records their exits nor restarts them, and a start
// it had under way has finished: the host's record of its machines stays
// as a crash leaves it.
func (c *Cluster) crash(ctx context.Context, h *Host) error {
	var errs []error
	if err := h.Agent.Close(); err != nil {
		errs = append(errs, fmt.Errorf("devcluster: close agent of %s: %w", h.ID, err))
	}
	for _, am := range h.Agent.AllMachines() {
		ps, err := h.Agent.MachineProcesses(ctx, refOf(ctx, h, am.App, am.Machine.ID))
		if err != nil {
			errs = append(errs, fmt.Errorf("devcluster: processes of machine %s on %s: %w", am.Machine.ID, h.ID, err))
			continue
		}
		for _, p := range ps {
			if err := syscall.Kill(int(p.Pid), syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
				errs = append(errs, fmt.Errorf("devcluster: kill process %d of machine %s on %s: %w", p.Pid, am.Machine.ID, h.ID, err))
			}
		}
	}
	c.faults.mu.Lock()
	if c.faults.gone == nil {
		c.faults.gone = map[string]chan struct{}{}
	}
	gone := make(chan struct{})
	c.faults.gone[h.ID] = gone
	c.faults.mu.Unlock()
	c.faults.wg.Add(1)
	go func() {
		defer c.faults.wg.Done()
		defer close(gone)
		if err := h.Close(); err != nil {
			c.cfg.Logger.Debug("closing a killed host", "host", h.ID, "err", err)
		}
	}()
	return errors.Join(errs...)
}

// refOf names a machine of a host's with the nonce of its lease, if one
// is held: a crash does not ask the lease's holder.
func refOf(ctx context.Context, h *Host, app, id string) api.MachineRef {
	ref := api.MachineRef{App: app, ID: id}
	if l, err := h.Agent.MachineLease(ctx, ref); err == nil && l.Data != nil {
		ref.LeaseNonce = l.Data.Nonce
	}
	return ref
}

// host finds a host by id.
func (c *Cluster) host(id string) *Host {
	for _, h := range c.Hosts {
		if h.ID == id {
			return h
		}
	}
	return nil
}
