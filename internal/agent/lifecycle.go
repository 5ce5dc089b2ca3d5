package agent

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/machine"
)

const (
	sourceUser = api.SourceUser
	sourceFlyd = api.SourceFlyd
)

// Every method here runs with m.opMu held.

// step moves the machine to state to, applying fn to the new record and
// recording ev, and stores the result before returning: the caller acts on
// the new state only once it is durable.
func (a *Agent) step(m *mach, to machine.State, ev *api.MachineEvent, fn func(*record)) error {
	cur := m.rec.Load()
	if err := machine.Transition(cur.State, to); err != nil {
		return api.Errorf(409, "machine %s: %v", cur.ID, err)
	}
	next := cur.clone()
	next.State = to
	if len(next.Versions) > 0 && next.Versions[0].Instance == next.Instance {
		next.Versions[0].State = to
	}
	if fn != nil {
		fn(next)
	}
	return a.commit(m, next, ev)
}

// commit stores next with ev prepended to its events and makes it visible.
func (a *Agent) commit(m *mach, next *record, ev *api.MachineEvent) error {
	now := a.now()
	next.UpdatedAt = now
	if ev != nil {
		ev.Timestamp = now.UnixMilli()
		ev.ID = ulid.Make().String()
		next.Events = append([]*api.MachineEvent{ev}, next.Events...)
		if len(next.Events) > maxEvents {
			next.Events = next.Events[:maxEvents]
		}
	}
	if err := a.store.put(next, ev); err != nil {
		return err
	}
	m.publish(next)
	a.syncChecks(m, next)
	a.notify()
	if ev != nil && a.cfg.OnEvent != nil {
		a.cfg.OnEvent(next.App, next.ID, ev)
	}
	return nil
}

// notify tells whoever watches the host that its machines changed.
func (a *Agent) notify() {
	if a.cfg.OnChange != nil {
		a.cfg.OnChange()
	}
}

func newEvent(typ, status, source string) *api.MachineEvent {
	return &api.MachineEvent{Type: typ, Status: status, Source: source}
}

// launch prepares and starts the current instance, from Creating, Updating,
// Starting or any state that may move to Starting. A driver that cannot
// resolve the image fails the launch with an event saying why.
func (a *Agent) launch(m *mach, source, evType string) error {
	r := m.rec.Load()
	spec := a.spec(r)
	first := r.State == machine.Creating || r.State == machine.Updating
	if !first && r.State != machine.Starting {
		if err := a.step(m, machine.Starting, nil, func(r *record) {
			r.Op = &op{Kind: "start"}
			r.RestartAt = time.Time{}
		}); err != nil {
			return err
		}
	}
	img, err := a.cfg.Driver.Prepare(a.ctx, spec)
	if err != nil {
		return a.launchFailed(m, source, evType, err)
	}
	return a.launchPrepared(m, spec, img, source, evType)
}

// launchPrepared starts the current instance once Prepare resolved its
// image: from Creating or Updating (a first launch), or Starting.
func (a *Agent) launchPrepared(m *mach, spec driver.Spec, img driver.Image, source, evType string) error {
	r := m.rec.Load()
	first := r.State == machine.Creating || r.State == machine.Updating
	var err error
	setImage := func(r *record) {
		r.Op = &op{Kind: "start"}
		r.ImageDigest = img.Digest
	}
	if first {
		err = a.step(m, machine.Starting, nil, setImage)
	} else if m.rec.Load().ImageDigest != img.Digest {
		err = a.commit(m, withRecord(m.rec.Load(), setImage), nil)
	}
	if err != nil {
		return err
	}
	return a.startPrepared(m, spec, source, evType)
}

// startPrepared starts the workload from state Starting.
func (a *Agent) startPrepared(m *mach, spec driver.Spec, source, evType string) error {
	// The tailer reads the log file from its start, so it need not be
	// running before the workload writes: keep it off the start path.
	a.goOwned(func() { a.openLog(m) })
	proc, err := a.cfg.Driver.Start(a.ctx, spec)
	if err != nil {
		ev := newEvent(evType, string(machine.Failed), source)
		ev.Request = &api.MachineRequest{Message: err.Error()}
		if serr := a.step(m, machine.Failed, ev, func(r *record) { r.Op = nil; r.Handle = "" }); serr != nil {
			return serr
		}
		return &launchError{id: spec.MachineID, err: err}
	}
	return a.running(m, proc, source, evType)
}

// running records an adopted or freshly started workload as started.
func (a *Agent) running(m *mach, proc driver.Process, source, evType string) error {
	ev := newEvent(evType, string(machine.Started), source)
	if n := m.rec.Load().Restarts; n > 0 && source == sourceFlyd {
		ev.Request = &api.MachineRequest{RestartCount: n}
	}
	err := a.step(m, machine.Started, ev, func(r *record) {
		r.Op = nil
		r.Handle = proc.Handle()
		r.StartedAt = a.now()
	})
	if err != nil {
		// The workload runs but is not recorded: stop it rather than leak it.
		proc.Stop(a.ctx, syscall.SIGKILL, 0)
		return err
	}
	m.proc = proc
	m.gen++
	a.watchExit(m, proc)
	return nil
}

// launchFailed records that the image could not be prepared: a first launch
// goes through launch_failed, a later start fails directly.
func (a *Agent) launchFailed(m *mach, source, evType string, cause error) error {
	ev := newEvent(evType, string(machine.Failed), source)
	if cur := m.rec.Load().State; cur == machine.Creating || cur == machine.Updating {
		ev = newEvent(api.EventLaunch, string(machine.LaunchFailed), source)
		ev.Request = &api.MachineRequest{Message: cause.Error()}
		if err := a.step(m, machine.LaunchFailed, ev, func(r *record) { r.Op = nil }); err != nil {
			return err
		}
		ev = nil
	} else {
		ev.Request = &api.MachineRequest{Message: cause.Error()}
	}
	if err := a.step(m, machine.Failed, ev, func(r *record) { r.Op = nil }); err != nil {
		return err
	}
	return &launchError{id: m.rec.Load().ID, err: cause}
}

// launchError is a workload that could not be launched. The machine's state
// (failed) and events already say so; callers decide whether it is an error
// of the call too.
type launchError struct {
	id  string
	err error
}

func (e *launchError) Error() string { return fmt.Sprintf("launch machine %s: %v", e.id, e.err) }
func (e *launchError) Unwrap() error { return e.err }

func isLaunchError(err error) bool {
	var le *launchError
	return errors.As(err, &le)
}

// launchStatus turns a launch failure into the API's 422; other errors pass.
func launchStatus(err error) error {
	if isLaunchError(err) {
		return api.Errorf(422, "%v", err)
	}
	return err
}

// watchExit waits for proc to end and then applies the restart policy,
// unless an operation has taken the workload over meanwhile.
func (a *Agent) watchExit(m *mach, proc driver.Process) {
	a.goOwned(func() {
		select {
		case <-proc.Done():
		case <-a.ctx.Done():
			return
		}
		m.opMu.Lock()
		defer m.opMu.Unlock()
		if a.ctx.Err() != nil || m.proc != proc {
			return
		}
		a.exited(m, proc.Exit())
	})
}

// exited handles a workload that ended on its own while started.
func (a *Agent) exited(m *mach, exit driver.Exit) {
	m.proc = nil
	r := m.rec.Load()
	pol := restartPolicy(r.Config)
	if exit.At.IsZero() {
		exit.At = a.now()
	}
	d := pol.Decide(machine.ExitInfo{Failed: exit.Failed(), StartedAt: r.StartedAt, At: exit.At}, r.Restarts, a.cfg.Backoff)
	ev := newEvent(api.EventExit, string(d.Next), sourceFlyd)
	ev.Request = &api.MachineRequest{
		ExitEvent:    exitEvent(exit, false, d.Next == machine.Restarting),
		RestartCount: d.Count,
	}
	err := a.step(m, d.Next, ev, func(r *record) {
		r.Handle = ""
		r.Restarts = d.Count
		r.Op = nil
		if d.Next == machine.Restarting {
			r.Op = &op{Kind: "exit"}
			r.RestartAt = exit.At.Add(d.Delay)
		}
	})
	if err != nil {
		a.log.Error("record exit", "machine", r.ID, "err", err)
		return
	}
	a.log.Info("machine exited", "machine", r.ID, "code", exit.Code, "signal", int(exit.Signal), "next", d.Next, "restarts", d.Count)
	switch {
	case d.Next == machine.Restarting:
		a.restartAfter(m, d.Delay)
	case r.Config.AutoDestroy:
		if err := a.destroyLocked(m, false, sourceFlyd); err != nil {
			a.log.Error("auto-destroy", "machine", r.ID, "err", err)
		}
	}
}

// restartAfter starts the machine again after delay, if it is still waiting
// for that restart by then.
func (a *Agent) restartAfter(m *mach, delay time.Duration) {
	gen, inst := m.gen, m.rec.Load().Instance
	a.goOwned(func() {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-a.ctx.Done():
			return
		}
		m.opMu.Lock()
		defer m.opMu.Unlock()
		r := m.rec.Load()
		if a.ctx.Err() != nil || m.gen != gen || r.Instance != inst || r.State != machine.Restarting || r.Op == nil || r.Op.Kind != "exit" {
			return
		}
		if err := a.launch(m, sourceFlyd, api.EventStart); err != nil {
			a.log.Warn("restart machine", "machine", r.ID, "err", err)
		}
	})
}

// halt stops proc (if any) with sig, escalating to SIGKILL after timeout.
func (a *Agent) halt(proc driver.Process, sig syscall.Signal, timeout time.Duration) (driver.Exit, error) {
	if proc == nil {
		return driver.Exit{At: a.now()}, nil
	}
	return proc.Stop(a.ctx, sig, timeout)
}

// stopParams resolves a stop's signal and timeout from the call, then the
// config's stop_config, then the defaults (SIGINT, as Fly's kill_signal).
func (a *Agent) stopParams(cfg *api.MachineConfig, signal string, timeout time.Duration) (syscall.Signal, time.Duration, error) {
	sig, to := syscall.SIGINT, a.cfg.StopTimeout
	if sc := cfg.StopConfig; sc != nil {
		if sc.Signal != nil && *sc.Signal != "" {
			s, err := api.ParseSignal(*sc.Signal)
			if err != nil {
				return 0, 0, api.Errorf(422, "config.stop_config.signal: %v", err)
			}
			sig = s
		}
		if sc.Timeout != nil && sc.Timeout.Duration > 0 {
			to = sc.Timeout.Duration
		}
	}
	if signal != "" {
		s, err := api.ParseSignal(signal)
		if err != nil {
			return 0, 0, api.Errorf(400, "signal: %v", err)
		}
		sig = s
	}
	if timeout > 0 {
		to = timeout
	}
	return sig, to, nil
}

// stop stops a started machine (or cancels a pending automatic restart).
func (a *Agent) stop(m *mach, signal string, timeout time.Duration, source string) error {
	m.opMu.Lock()
	defer m.opMu.Unlock()
	return a.stopLocked(m, signal, timeout, source)
}

func (a *Agent) stopLocked(m *mach, signal string, timeout time.Duration, source string) error {
	r := m.rec.Load()
	sig, to, err := a.stopParams(r.Config, signal, timeout)
	if err != nil {
		return err
	}
	if r.State == machine.Restarting {
		// Waiting out a restart backoff: nothing runs, just stay down.
		return a.step(m, machine.Stopped, newEvent(api.EventStop, string(machine.Stopped), source), func(r *record) {
			r.Op, r.RestartAt, r.Restarts = nil, time.Time{}, 0
		})
	}
	if r.State != machine.Started {
		return api.Errorf(409, "machine %s is %s: only a started machine can be stopped", r.ID, r.State)
	}
	if err := a.step(m, machine.Stopping, newEvent(api.EventStop, string(machine.Stopping), source), func(r *record) {
		r.Op = &op{Kind: "stop", Signal: sigName(sig), Timeout: to, Deadline: a.now().Add(to)}
	}); err != nil {
		return err
	}
	return a.finishStop(m, sig, to)
}

// finishStop takes a machine in Stopping to Stopped.
func (a *Agent) finishStop(m *mach, sig syscall.Signal, to time.Duration) error {
	exit, err := a.halt(m.proc, sig, to)
	if err != nil {
		return fmt.Errorf("stop machine %s: %w", m.rec.Load().ID, err)
	}
	m.proc = nil
	ev := newEvent(api.EventExit, string(machine.Stopped), sourceFlyd)
	ev.Request = &api.MachineRequest{ExitEvent: exitEvent(exit, true, false)}
	return a.step(m, machine.Stopped, ev, func(r *record) {
		r.Op, r.Handle, r.Restarts = nil, "", 0
	})
}

// destroyLocked removes the machine: its workload (only if force when it
// runs), its files, and leaves a destroyed record for listings.
func (a *Agent) destroyLocked(m *mach, force bool, source string) error {
	r := m.rec.Load()
	switch r.State {
	case machine.Started, machine.Starting, machine.Stopping, machine.Suspending:
		if !force {
			return api.Errorf(409, "machine %s is %s: stop it first or destroy with force=true", r.ID, r.State)
		}
	}
	if err := a.step(m, machine.Destroying, newEvent(api.EventDestroy, string(machine.Destroying), source), func(r *record) {
		r.Op = &op{Kind: "destroy", Force: force}
	}); err != nil {
		return err
	}
	return a.finishDestroy(m)
}

// finishDestroy takes a machine in Destroying to Destroyed.
func (a *Agent) finishDestroy(m *mach) error {
	r := m.rec.Load()
	if _, err := a.halt(m.proc, syscall.SIGKILL, 0); err != nil {
		return fmt.Errorf("destroy machine %s: kill: %w", r.ID, err)
	}
	m.proc = nil
	if m.oldProc != nil {
		a.halt(m.oldProc, syscall.SIGKILL, 0)
		m.oldProc = nil
	}
	if err := a.cfg.Driver.Cleanup(a.ctx, a.spec(r)); err != nil {
		return fmt.Errorf("destroy machine %s: cleanup: %w", r.ID, err)
	}
	m.closeLog()
	if err := os.RemoveAll(a.machineDir(r.ID)); err != nil {
		return fmt.Errorf("destroy machine %s: %w", r.ID, err)
	}
	if err := a.step(m, machine.Destroyed, newEvent(api.EventDestroy, string(machine.Destroyed), sourceFlyd), func(r *record) {
		r.Op, r.Handle, r.OldHandle, r.Lease = nil, "", "", nil
	}); err != nil {
		return err
	}
	a.pruneDestroyed()
	return nil
}

// update replaces the machine's config with a new version: the running
// workload of the old version is stopped, the old version marked replaced,
// and the new one brought to the state the machine was in.
func (a *Agent) updateLocked(m *mach, cfg *api.MachineConfig, source string) error {
	r := m.rec.Load()
	if err := machine.Transition(r.State, machine.Replacing); err != nil {
		return api.Errorf(409, "machine %s: %v", r.ID, err)
	}
	then := machine.Stopped
	switch r.State {
	case machine.Started:
		then = machine.Started
	case machine.Created:
		then = machine.Created
	}
	next := r.clone()
	now := a.now()
	inst := ulid.Make().String()
	next.Versions[0].State = machine.Replacing
	next.Versions = append([]version{{Instance: inst, State: machine.Updating, CreatedAt: now, Config: cfg}}, next.Versions...)
	next.Instance, next.Config, next.State = inst, cfg, machine.Updating
	next.Op = &op{Kind: "update", Then: then}
	if sig, to, err := a.stopParams(r.Config, "", 0); err == nil {
		next.Op.Signal, next.Op.Timeout, next.Op.Deadline = sigName(sig), to, now.Add(to)
	}
	next.OldHandle, next.Handle = r.Handle, ""
	next.Restarts = 0
	if err := a.commit(m, next, newEvent(api.EventUpdate, string(machine.Replacing), source)); err != nil {
		return err
	}
	m.oldProc, m.proc = m.proc, nil
	return a.finishUpdate(m, r.Config)
}

// finishUpdate takes a machine in Updating to the state its op names.
func (a *Agent) finishUpdate(m *mach, oldCfg *api.MachineConfig) error {
	r := m.rec.Load()
	sig, to, err := a.stopParams(oldCfg, "", 0)
	if err != nil {
		sig, to = syscall.SIGINT, a.cfg.StopTimeout
	}
	if r.Op != nil && !r.Op.Deadline.IsZero() {
		to = a.opGrace(r.Op) // as the update decided, when it did
	}
	if _, err := a.halt(m.oldProc, sig, to); err != nil {
		return fmt.Errorf("update machine %s: stop old version: %w", r.ID, err)
	}
	m.oldProc = nil
	retire := func(r *record) {
		for i := range r.Versions {
			if r.Versions[i].State == machine.Replacing {
				r.Versions[i].State = machine.Replaced
			}
		}
		r.OldHandle = ""
	}
	then := machine.Stopped
	if r.Op != nil && r.Op.Then != "" {
		then = r.Op.Then
	}
	spec := a.spec(r)
	img, err := a.cfg.Driver.Prepare(a.ctx, spec)
	if err != nil {
		if serr := a.commit(m, withRecord(r, retire), nil); serr != nil {
			return serr
		}
		return a.launchFailed(m, sourceFlyd, api.EventUpdate, err)
	}
	if then != machine.Started {
		return a.step(m, then, newEvent(api.EventUpdate, string(then), sourceFlyd), func(r *record) {
			retire(r)
			r.Op = nil
			r.ImageDigest = img.Digest
		})
	}
	if err := a.step(m, machine.Starting, nil, func(r *record) {
		retire(r)
		r.Op = &op{Kind: "start"}
		r.ImageDigest = img.Digest
	}); err != nil {
		return err
	}
	return a.startPrepared(m, spec, sourceFlyd, api.EventStart)
}

// withRecord returns a copy of r changed by fn.
func withRecord(r *record, fn func(*record)) *record {
	c := r.clone()
	fn(c)
	return c
}

// restartLocked stops and starts a started machine.
func (a *Agent) restartLocked(m *mach, signal string, timeout time.Duration, force bool, source string) error {
	r := m.rec.Load()
	sig, to, err := a.stopParams(r.Config, signal, timeout)
	if err != nil {
		return err
	}
	if force {
		sig, to = syscall.SIGKILL, 0
	}
	if r.State != machine.Started {
		return api.Errorf(409, "machine %s is %s: only a started machine can be restarted", r.ID, r.State)
	}
	if err := a.step(m, machine.Restarting, newEvent(api.EventRestart, string(machine.Restarting), source), func(r *record) {
		r.Op = &op{Kind: "restart", Signal: sigName(sig), Timeout: to, Deadline: a.now().Add(to)}
		r.Restarts = 0
	}); err != nil {
		return err
	}
	return a.finishRestart(m, sig, to)
}

func (a *Agent) finishRestart(m *mach, sig syscall.Signal, to time.Duration) error {
	if _, err := a.halt(m.proc, sig, to); err != nil {
		return fmt.Errorf("restart machine %s: %w", m.rec.Load().ID, err)
	}
	m.proc = nil
	return a.launch(m, sourceFlyd, api.EventStart)
}

// resumeLocked finishes whatever the machine was doing when the previous
// agent stopped, and re-adopts its workload. The caller holds m.opMu.
func (a *Agent) resumeLocked(m *mach) error {
	r := m.rec.Load()
	spec := a.spec(r)
	adopt := func(handle string) driver.Process {
		if handle == "" && r.State != machine.Starting {
			return nil
		}
		p, err := a.cfg.Driver.Adopt(a.ctx, spec, handle)
		if err != nil {
			if !errors.Is(err, driver.ErrGone) {
				a.log.Warn("adopt workload", "machine", r.ID, "err", err)
			}
			return nil
		}
		return p
	}
	a.log.Debug("resume machine", "machine", r.ID, "state", r.State)
	switch r.State {
	case machine.Creating:
		if r.SkipLaunch {
			img, err := a.cfg.Driver.Prepare(a.ctx, spec)
			if err != nil {
				return a.launchFailed(m, sourceFlyd, api.EventLaunch, err)
			}
			return a.step(m, machine.Created, nil, func(r *record) { r.Op = nil; r.ImageDigest = img.Digest })
		}
		return a.launch(m, sourceFlyd, api.EventStart)
	case machine.Starting:
		// The workload may have started before the agent could record it.
		if p := adopt(""); p != nil {
			return a.running(m, p, sourceFlyd, api.EventStart)
		}
		return a.launch(m, sourceFlyd, api.EventStart)
	case machine.Started:
		if p := adopt(r.Handle); p != nil {
			a.openLog(m)
			m.proc = p
			m.gen++
			a.watchExit(m, p)
			return nil
		}
		a.exited(m, driver.Exit{Code: -1, Unknown: true, At: a.now()})
		return nil
	case machine.Stopping:
		m.proc = adopt(r.Handle)
		return a.finishStop(m, opSignal(r.Op), a.opGrace(r.Op))
	case machine.Suspending:
		m.proc = adopt(r.Handle)
		// A suspend stops the workload as a stop does, and keeps the
		// deadline it recorded when it was decided.
		return a.finishStop(m, syscall.SIGINT, a.opGrace(r.Op))
	case machine.Restarting:
		if r.Op != nil && r.Op.Kind == "restart" {
			m.proc = adopt(r.Handle)
			return a.finishRestart(m, opSignal(r.Op), a.opGrace(r.Op))
		}
		// Waiting out a restart backoff.
		delay := max(r.RestartAt.Sub(a.now()), 0)
		a.restartAfter(m, delay)
		return nil
	case machine.Destroying:
		m.proc = adopt(r.Handle)
		m.oldProc = adopt(r.OldHandle)
		return a.finishDestroy(m)
	case machine.Updating:
		m.oldProc = adopt(r.OldHandle)
		var old *api.MachineConfig
		if len(r.Versions) > 1 {
			old = r.Versions[1].Config
		}
		if old == nil {
			old = r.Config
		}
		return a.finishUpdate(m, old)
	case machine.LaunchFailed:
		return a.step(m, machine.Failed, nil, func(r *record) { r.Op = nil })
	}
	return nil
}

func opSignal(o *op) syscall.Signal {
	if o != nil && o.Signal != "" {
		if s, err := api.ParseSignal(o.Signal); err == nil {
			return s
		}
	}
	return syscall.SIGINT
}

// opGrace is what is left of the grace an interrupted operation recorded
// for its workload to stop before it is killed: until its deadline (nothing
// once that has passed), or for a record without one, its whole timeout (or
// the agent's default).
func (a *Agent) opGrace(o *op) time.Duration {
	switch {
	case o == nil:
		return a.cfg.StopTimeout
	case !o.Deadline.IsZero():
		return max(o.Deadline.Sub(a.now()), 0)
	case o.Timeout > 0:
		return o.Timeout
	}
	return a.cfg.StopTimeout
}

func sigName(s syscall.Signal) string { return fmt.Sprintf("%d", int(s)) }

func exitEvent(e driver.Exit, requested, restarting bool) *api.ExitEvent {
	return &api.ExitEvent{
		ExitCode:      e.Code,
		Signal:        int(e.Signal),
		OOMKilled:     e.OOMKilled,
		RequestedStop: requested,
		Restarting:    restarting,
		ExitedAt:      e.At.UTC(),
	}
}

func restartPolicy(cfg *api.MachineConfig) machine.RestartPolicy {
	var policy string
	var max int
	if cfg != nil && cfg.Restart != nil {
		policy, max = cfg.Restart.Policy, cfg.Restart.MaxRetries
	}
	p, err := machine.NewRestartPolicy(policy, max)
	if err != nil { // configs are validated on the way in
		p, _ = machine.NewRestartPolicy("", 0)
	}
	return p
}
