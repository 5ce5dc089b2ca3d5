package agent

import (
	"errors"
	"maps"
	"net/http"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/machine"
)

// refuseCreate answers a create whose image the driver cannot resolve: the
// machine never ran, so it is recorded as launch_failed, destroyed at once,
// and the create fails with imageError's answer. m is locked and in
// Creating.
func (a *Agent) refuseCreate(m *mach, cause error) error {
	r := m.rec.Load()
	refused := imageError(r.Config.Image, cause)
	ev := newEvent(api.EventLaunch, string(machine.LaunchFailed), sourceUser)
	ev.Request = &api.MachineRequest{Message: cause.Error()}
	if err := a.step(m, machine.LaunchFailed, ev, func(r *record) { r.Op = nil }); err != nil {
		return err
	}
	if err := a.step(m, machine.Destroying, newEvent(api.EventDestroy, string(machine.Destroying), sourceFlyd), func(r *record) {
		r.Op = &op{Kind: "destroy", Force: true}
	}); err != nil {
		return err
	}
	if err := a.finishDestroy(m); err != nil {
		a.log.Warn("destroy a refused machine", "machine", r.ID, "err", err)
	}
	return refused
}

// imageError is the API's answer to a driver that could not resolve image
// (err wraps driver.ErrImage or driver.ErrUnavailable): 422 naming
// config.image when the image does not exist, does not parse or is not one
// this driver runs; 503 when it could not be got now (registry down or
// failing, a local failure), so that the client retries and the control
// plane asks another host.
func imageError(image string, err error) *api.Error {
	if errors.Is(err, driver.ErrImage) {
		return api.Errorf(http.StatusUnprocessableEntity, "config.image %q cannot be run here: %v", image, err)
	}
	return api.Errorf(http.StatusServiceUnavailable, "config.image %q is unavailable on this host now, try again: %v", image, err)
}

// resolvable refuses an update to a config whose image the driver cannot
// resolve (imageError), before the running version is touched. m is
// locked.
func (a *Agent) resolvable(r *record, cfg *api.MachineConfig) error {
	_, err := a.cfg.Driver.Prepare(a.ctx, a.spec(withRecord(r, func(r *record) { r.Config = cfg })))
	if errors.Is(err, driver.ErrImage) || errors.Is(err, driver.ErrUnavailable) {
		return imageError(cfg.Image, err)
	}
	return nil
}

// setMetadata sets one metadata key, refusing (422) what would take the
// machine's metadata past the limits every config must keep.
func (a *Agent) setMetadata(ref api.MachineRef, key, value string) error {
	if !api.ValidMetadataKey(key) {
		return api.Errorf(http.StatusUnprocessableEntity, "metadata key %q: use 1 to %d letters, digits, '_', '-' and '.'", key, api.MaxMetadataKeyLen)
	}
	m, err := a.find(ref)
	if err != nil {
		return err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	r := m.rec.Load()
	if r.State == machine.Destroyed {
		return api.Errorf(http.StatusConflict, "machine %s is destroyed", r.ID)
	}
	md := maps.Clone(r.Config.Metadata)
	if md == nil {
		md = map[string]string{}
	}
	md[key] = value
	if err := api.ValidateMetadata("metadata", md); err != nil {
		return err
	}
	return a.commit(m, withRecord(r, func(r *record) {
		r.Config = cloneConfig(r.Config)
		r.Config.Metadata = md
		r.Versions[0].Config = r.Config
	}), nil)
}

// Report adds ev to machine id's events without changing its state: what
// the host has to tell about a machine from outside its lifecycle (that
// the cluster refused its record). It returns at once; the event is
// recorded once the machine's current operation, if any, is done.
func (a *Agent) Report(id string, ev *api.MachineEvent) {
	m := a.lookup(id)
	if m == nil {
		return
	}
	a.goOwned(func() {
		m.opMu.Lock()
		defer m.opMu.Unlock()
		r := m.rec.Load()
		if r.State == machine.Destroyed {
			return
		}
		if err := a.commit(m, r.clone(), ev); err != nil {
			a.log.Warn("record an event", "machine", id, "err", err)
		}
	})
}
