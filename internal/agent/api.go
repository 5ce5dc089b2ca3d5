package agent

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/oklog/ulid/v2"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/machine"
)

var _ api.Backend = (*Agent)(nil)

// DefaultLeaseTTL is a lease's life when the request names none.
const DefaultLeaseTTL = 30 * time.Second

var validName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// CreateMachine records a new machine and, unless skip_launch, starts it. The
// answer reflects where it got: started, created, or failed with an event
// saying why. An image the driver cannot resolve is the create's error
// (422), and the machine is destroyed at once.
func (a *Agent) CreateMachine(ctx context.Context, app string, in api.LaunchMachineInput) (*api.Machine, error) {
	if in.Config == nil {
		return nil, api.Errorf(422, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	if in.Region != "" && in.Region != a.cfg.Region {
		return nil, api.Errorf(422, "region %q: this host is in %s", in.Region, a.cfg.Region)
	}
	if in.Name != "" && !validName.MatchString(in.Name) {
		return nil, api.Errorf(422, "name %q: use lowercase letters, digits, - and _", in.Name)
	}
	if err := api.CheckLeaseTTL("lease_ttl", in.LeaseTTL); err != nil {
		return nil, err
	}
	if in.Org != "" && !api.ValidName(in.Org) {
		return nil, api.Errorf(422, "org %q is not a valid org name", in.Org)
	}
	orgNet, err := a.orgOf(in.Org, in.OrgNetwork)
	if err != nil {
		return nil, fmt.Errorf("create machine: %w", err)
	}
	id := in.ID
	if id == "" {
		id = api.NewMachineID()
	} else if !api.ValidMachineID(id) {
		return nil, api.Errorf(422, "id %q: want 14 lowercase hex characters", id)
	}
	now := a.now()
	inst := ulid.Make().String()
	name := in.Name
	if name == "" {
		name = id
	}
	cfg := cloneConfig(in.Config)
	r := &record{
		ID: id, App: app, Org: in.Org, OrgNet: orgNet, Name: name, Region: a.cfg.Region, Secrets: maps.Clone(in.Secrets),
		State: machine.Creating, Instance: inst, Config: cfg,
		Versions:   []version{{Instance: inst, State: machine.Creating, CreatedAt: now, Config: cfg}},
		CreatedAt:  now,
		Op:         &op{Kind: "create"},
		SkipLaunch: in.SkipLaunch,
	}
	if in.LeaseTTL > 0 {
		r.Lease = &lease{Nonce: newNonce(), ExpiresAt: now.Add(time.Duration(in.LeaseTTL) * time.Second)}
	}
	if err := os.MkdirAll(a.machineDir(id), 0o700); err != nil {
		return nil, fmt.Errorf("create machine: %w", err)
	}
	m := newMach(r)
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if err := a.register(m, r); err != nil {
		if !errors.Is(err, api.ErrConflict) {
			os.RemoveAll(a.machineDir(id))
		}
		return nil, err
	}

	// The image is resolved before the create is answered: one that
	// cannot be is the create's error (422 when it never will be, 503 when
	// it may later or on another host), and the machine is not kept.
	spec := a.spec(r)
	img, err := a.cfg.Driver.Prepare(a.ctx, spec)
	switch {
	case errors.Is(err, driver.ErrImage), errors.Is(err, driver.ErrUnavailable):
		return nil, a.refuseCreate(m, err)
	case err != nil:
		err = a.launchFailed(m, sourceUser, api.EventLaunch, err)
	case in.SkipLaunch:
		err = a.step(m, machine.Created, newEvent(api.EventLaunch, string(machine.Created), sourceUser), func(r *record) {
			r.Op = nil
			r.ImageDigest = img.Digest
		})
	default:
		err = a.launchPrepared(m, spec, img, sourceUser, api.EventStart)
	}
	if err != nil {
		if !isLaunchError(err) {
			return nil, err
		}
		a.log.Warn("launch machine", "machine", id, "err", err)
	}
	out := a.view(m, m.rec.Load())
	if r.Lease != nil {
		out.LeaseNonce = r.Lease.Nonce
	}
	return out, nil
}

// GetMachine returns one machine.
func (a *Agent) GetMachine(ctx context.Context, ref api.MachineRef) (*api.Machine, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	return a.view(m, m.rec.Load()), nil
}

// ListMachines returns the app's machines, oldest first.
func (a *Agent) ListMachines(ctx context.Context, app string, f api.ListMachinesOptions) ([]*api.Machine, error) {
	out := []*api.Machine{}
	for _, m := range a.all() {
		r := m.rec.Load()
		if r.App != app || (f.Region != "" && f.Region != r.Region) {
			continue
		}
		if r.State == machine.Destroyed && !f.IncludeDeleted {
			continue
		}
		if !metadataMatches(r.Config, f.Metadata) {
			continue
		}
		out = append(out, a.view(m, r))
	}
	return out, nil
}

func metadataMatches(cfg *api.MachineConfig, want map[string]string) bool {
	for k, v := range want {
		if cfg == nil || cfg.Metadata[k] != v {
			return false
		}
	}
	return true
}

// AppMachine is one machine of this host with the app it belongs to (the
// API's Machine does not carry it).
type AppMachine struct {
	App     string
	Org     string
	Machine *api.Machine
}

// AllMachines returns every machine of every app on this host that is not
// destroyed, oldest first: what the host publishes to the cluster.
func (a *Agent) AllMachines() []AppMachine {
	var out []AppMachine
	for _, m := range a.all() {
		if r := m.rec.Load(); r.State != machine.Destroyed {
			out = append(out, AppMachine{App: r.App, Org: r.Org, Machine: a.view(m, r)})
		}
	}
	return out
}

// UpdateMachine gives the machine a new config version.
func (a *Agent) UpdateMachine(ctx context.Context, ref api.MachineRef, in api.LaunchMachineInput) (*api.Machine, error) {
	if in.Config == nil {
		return nil, api.Errorf(422, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	if in.Region != "" && in.Region != a.cfg.Region {
		return nil, api.Errorf(422, "region %q: a machine cannot move regions by update", in.Region)
	}
	m, err := a.locked(ref)
	if err != nil {
		return nil, err
	}
	defer m.opMu.Unlock()
	r := m.rec.Load()
	if in.CurrentVersion != "" && in.CurrentVersion != r.Instance {
		return nil, api.Errorf(412, "machine %s is at version %s, not %s", r.ID, r.Instance, in.CurrentVersion)
	}
	cfg := cloneConfig(in.Config)
	if err := a.resolvable(r, cfg); err != nil {
		return nil, err
	}
	if in.Secrets != nil {
		if err := a.commit(m, withRecord(r, func(r *record) { r.Secrets = maps.Clone(in.Secrets) }), nil); err != nil {
			return nil, err
		}
		r = m.rec.Load()
	}
	if g, old := guest(cfg), guest(r.Config); !in.SkipLaunch && r.State == machine.Started && (g.CPUs > old.CPUs || g.MemoryMB > old.MemoryMB) {
		// A version that grows takes the old one's share and more: hold
		// the admission lock through the update (rare, and only this
		// host's admissions wait), so a create cannot take the same room.
		a.capMu.Lock()
		defer a.capMu.Unlock()
		if err := a.admit(g, m); err != nil {
			return nil, err
		}
	}
	if in.SkipLaunch && r.State == machine.Started {
		// skip_launch on update: apply the config without starting the new version.
		if err := a.stopLocked(m, "", 0, sourceUser); err != nil {
			return nil, err
		}
	}
	if err := a.updateLocked(m, cfg, sourceUser); err != nil {
		if !isLaunchError(err) {
			return nil, err
		}
		a.log.Warn("update machine", "machine", r.ID, "err", err)
	}
	return a.view(m, m.rec.Load()), nil
}

// StartMachine starts a created, stopped, suspended or failed machine.
func (a *Agent) StartMachine(ctx context.Context, ref api.MachineRef) (*api.StartResponse, error) {
	m, err := a.locked(ref)
	if err != nil {
		return nil, err
	}
	defer m.opMu.Unlock()
	r := m.rec.Load()
	if err := machine.Transition(r.State, machine.Starting); err != nil || r.State == machine.Restarting {
		return nil, api.Errorf(409, "machine %s is %s: it cannot be started", r.ID, r.State)
	}
	prev := r.State
	a.capMu.Lock()
	err = a.admit(guest(r.Config), nil)
	if err == nil {
		err = a.step(m, machine.Starting, nil, func(r *record) { r.Op = &op{Kind: "start"}; r.Restarts = 0 })
	}
	a.capMu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := a.launch(m, sourceUser, api.EventStart); err != nil {
		return nil, launchStatus(err)
	}
	return &api.StartResponse{Status: string(machine.Started), PreviousState: string(prev)}, nil
}

// StopMachine stops a started machine, waiting for it to exit.
func (a *Agent) StopMachine(ctx context.Context, ref api.MachineRef, in api.StopMachineInput) error {
	var timeout time.Duration
	if in.Timeout != nil {
		if err := api.CheckStopTimeout("timeout", in.Timeout.Duration); err != nil {
			return err
		}
		timeout = in.Timeout.Duration
	}
	if in.Signal != "" {
		if _, err := api.ParseSignal(in.Signal); err != nil {
			return api.Errorf(400, "signal: %v", err)
		}
	}
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	defer m.opMu.Unlock()
	return a.stopLocked(m, in.Signal, timeout, sourceUser)
}

// RestartMachine stops and starts a started machine.
func (a *Agent) RestartMachine(ctx context.Context, ref api.MachineRef, o api.RestartOptions) error {
	if err := api.CheckStopTimeout("timeout", o.Timeout); err != nil {
		return err
	}
	if o.Signal != "" {
		if _, err := api.ParseSignal(o.Signal); err != nil {
			return api.Errorf(400, "signal: %v", err)
		}
	}
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	defer m.opMu.Unlock()
	return launchStatus(a.restartLocked(m, o.Signal, o.Timeout, o.ForceStop, sourceUser))
}

// SignalMachine delivers a signal to a started machine's workload.
func (a *Agent) SignalMachine(ctx context.Context, ref api.MachineRef, signal string) error {
	sig, err := api.ParseSignal(signal)
	if err != nil {
		return api.Errorf(400, "signal: %v", err)
	}
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	defer m.opMu.Unlock()
	r := m.rec.Load()
	if r.State != machine.Started || m.proc == nil {
		return api.Errorf(409, "machine %s is %s: only a started machine can be signalled", r.ID, r.State)
	}
	if err := m.proc.Signal(sig); err != nil {
		return fmt.Errorf("signal machine %s: %w", r.ID, err)
	}
	return nil
}

// SuspendMachine is refused: no driver of this agent can snapshot a workload.
func (a *Agent) SuspendMachine(ctx context.Context, ref api.MachineRef) error {
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	m.opMu.Unlock()
	return api.Errorf(501, "suspend is not supported by the %s driver; stop the machine instead", a.cfg.Driver.Name())
}

// WaitMachine returns once the machine reaches one of o.Wanted().
func (a *Agent) WaitMachine(ctx context.Context, ref api.MachineRef, o api.WaitOptions) (*api.Machine, error) {
	var want []machine.State
	for _, name := range o.Wanted() {
		s, err := machine.ParseState(name)
		if err != nil {
			return nil, api.Errorf(400, "state: %v", err)
		}
		want = append(want, s)
	}
	timeout := o.Timeout
	if timeout <= 0 || timeout > 60*time.Second {
		timeout = 60 * time.Second
	}
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	if o.InstanceID != "" && !slices.ContainsFunc(m.rec.Load().Versions, func(v version) bool { return v.Instance == o.InstanceID }) {
		return nil, api.Errorf(404, "machine %s has no version %s", ref.ID, o.InstanceID)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		r, changed := m.watch()
		if reached(r, want, o.InstanceID) {
			return a.view(m, r), nil
		}
		select {
		case <-changed:
		case <-t.C:
			return nil, api.Errorf(408, "machine %s did not reach %s within %s (it is %s)", r.ID, stateList(want), timeout, r.State)
		case <-ctx.Done():
			return nil, api.Errorf(408, "wait for machine %s: %v", r.ID, ctx.Err())
		}
	}
}

// reached reports whether r is in one of the states want, for the version
// inst if given. A replaced version counts as stopped (and as destroyed once
// the machine is).
func reached(r *record, want []machine.State, inst string) bool {
	for _, w := range want {
		if inst == "" || inst == r.Instance {
			if r.State == w {
				return true
			}
		} else if w == machine.Stopped || (w == machine.Destroyed && r.State == machine.Destroyed) {
			return true
		}
	}
	return false
}

func stateList(states []machine.State) string {
	names := make([]string, len(states))
	for i, s := range states {
		names[i] = string(s)
	}
	return strings.Join(names, " or ")
}

// DestroyMachine removes a machine; a running one only with force.
func (a *Agent) DestroyMachine(ctx context.Context, ref api.MachineRef, force bool) error {
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	defer m.opMu.Unlock()
	return a.destroyLocked(m, force, sourceUser)
}

// MachineEvents returns the machine's events, newest first.
func (a *Agent) MachineEvents(ctx context.Context, ref api.MachineRef) ([]*api.MachineEvent, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	return m.rec.Load().Events, nil
}

// MachineVersions returns the machine's config versions, newest first.
func (a *Agent) MachineVersions(ctx context.Context, ref api.MachineRef) ([]*api.MachineVersion, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	r := m.rec.Load()
	out := make([]*api.MachineVersion, 0, len(r.Versions))
	for _, v := range r.Versions {
		out = append(out, &api.MachineVersion{Version: v.Instance, State: string(v.State), CreatedAt: v.CreatedAt.UTC().Format(time.RFC3339), Config: v.Config})
	}
	return out, nil
}

// MachineProcesses lists the processes of a started machine's workload.
func (a *Agent) MachineProcesses(ctx context.Context, ref api.MachineRef) ([]api.ProcessStat, error) {
	m, err := a.locked(ref)
	if err != nil {
		return nil, err
	}
	proc := m.proc
	m.opMu.Unlock()
	if proc == nil || proc.Pid() == 0 {
		return []api.ProcessStat{}, nil
	}
	return processGroup(proc.Pid())
}

// ExecMachine runs a command in a started machine.
func (a *Agent) ExecMachine(ctx context.Context, ref api.MachineRef, in api.ExecRequest) (*api.ExecResponse, error) {
	if len(in.Command) == 0 {
		return nil, api.Errorf(400, "command is required")
	}
	if in.Timeout < 0 {
		return nil, api.Errorf(400, "timeout must not be negative")
	}
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	r := m.rec.Load()
	if r.State != machine.Started {
		return nil, api.Errorf(409, "machine %s is %s: exec needs a started machine", r.ID, r.State)
	}
	timeout := 30 * time.Second
	if in.Timeout > 0 {
		timeout = time.Duration(in.Timeout) * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	res, err := a.cfg.Driver.Exec(ctx, a.spec(r), in.Command, []byte(in.Stdin))
	if err != nil {
		if ctx.Err() != nil {
			return nil, api.Errorf(408, "exec in machine %s: timed out after %s", r.ID, timeout)
		}
		return nil, fmt.Errorf("exec in machine %s: %w", r.ID, err)
	}
	return &api.ExecResponse{ExitCode: res.ExitCode, Stdout: string(res.Stdout), Stderr: string(res.Stderr)}, nil
}

// MachineLease returns the machine's lease, or 404 when none is held.
func (a *Agent) MachineLease(ctx context.Context, ref api.MachineRef) (*api.Lease, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	r := m.rec.Load()
	if !leaseHeld(r, a.now()) {
		return nil, api.Errorf(404, "machine %s has no lease", r.ID)
	}
	return leaseView(r.Lease, r.Instance), nil
}

// AcquireMachineLease takes the machine's lease, or refreshes it for its holder.
func (a *Agent) AcquireMachineLease(ctx context.Context, ref api.MachineRef, in api.LeaseInput) (*api.Lease, error) {
	if err := api.CheckLeaseTTL("ttl", in.TTL); err != nil {
		return nil, err
	}
	ttl := DefaultLeaseTTL
	if in.TTL > 0 {
		ttl = time.Duration(in.TTL) * time.Second
	}
	m, err := a.locked(ref)
	if err != nil {
		return nil, err
	}
	defer m.opMu.Unlock()
	r := m.rec.Load()
	now := a.now()
	if r.State == machine.Destroyed {
		return nil, api.Errorf(409, "machine %s is destroyed", r.ID)
	}
	l := &lease{Nonce: newNonce(), Description: in.Description, ExpiresAt: now.Add(ttl)}
	if leaseHeld(r, now) {
		if !nonceEqual(ref.LeaseNonce, r.Lease.Nonce) {
			return nil, api.Errorf(409, "machine %s is leased until %s (%s)", r.ID, r.Lease.ExpiresAt.UTC().Format(time.RFC3339), r.Lease.Description)
		}
		l.Nonce = r.Lease.Nonce // a refresh keeps the nonce
		if in.Description == "" {
			l.Description = r.Lease.Description
		}
	}
	next := r.clone()
	next.Lease = l
	if err := a.commit(m, next, nil); err != nil {
		return nil, err
	}
	return leaseView(l, r.Instance), nil
}

// ReleaseMachineLease gives the lease up; only its holder may.
func (a *Agent) ReleaseMachineLease(ctx context.Context, ref api.MachineRef) error {
	m, err := a.locked(ref)
	if err != nil {
		return err
	}
	defer m.opMu.Unlock()
	r := m.rec.Load()
	if !leaseHeld(r, a.now()) {
		return api.Errorf(404, "machine %s has no lease", r.ID)
	}
	if !nonceEqual(ref.LeaseNonce, r.Lease.Nonce) {
		return api.Errorf(409, "machine %s: lease nonce does not match", r.ID)
	}
	next := r.clone()
	next.Lease = nil
	return a.commit(m, next, nil)
}

// CordonMachine takes the machine out of (or puts it back into) the proxy's rotation.
func (a *Agent) CordonMachine(ctx context.Context, ref api.MachineRef, on bool) error {
	return a.edit(ref, true, func(r *record) { r.Cordoned = on })
}

// MachineMetadata returns the machine's metadata.
func (a *Agent) MachineMetadata(ctx context.Context, ref api.MachineRef) (map[string]string, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	md := maps.Clone(m.rec.Load().Config.Metadata)
	if md == nil {
		md = map[string]string{}
	}
	return md, nil
}

// SetMachineMetadata sets one metadata key without making a new version. Like
// exec, it is not guarded by the lease (Fly's client sends no nonce for it).
func (a *Agent) SetMachineMetadata(ctx context.Context, ref api.MachineRef, key, value string) error {
	return a.setMetadata(ref, key, value)
}

// DeleteMachineMetadata removes one metadata key.
func (a *Agent) DeleteMachineMetadata(ctx context.Context, ref api.MachineRef, key string) error {
	m, err := a.find(ref)
	if err != nil {
		return err
	}
	if _, ok := m.rec.Load().Config.Metadata[key]; !ok {
		return api.Errorf(404, "machine %s has no metadata key %q", ref.ID, key)
	}
	return a.edit(ref, false, func(r *record) {
		r.Config = cloneConfig(r.Config)
		delete(r.Config.Metadata, key)
		r.Versions[0].Config = r.Config
	})
}

// edit changes a machine's record in place (no state change) under its lock,
// checking the lease if leased says so.
func (a *Agent) edit(ref api.MachineRef, leased bool, fn func(*record)) error {
	if !leased {
		ref.LeaseNonce = "" // not checked below
	}
	m, err := a.find(ref)
	if err != nil {
		return err
	}
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if leased {
		if err := checkLease(m.rec.Load(), ref.LeaseNonce, a.now()); err != nil {
			return err
		}
	}
	r := m.rec.Load()
	if r.State == machine.Destroyed {
		return api.Errorf(409, "machine %s is destroyed", r.ID)
	}
	return a.commit(m, withRecord(r, fn), nil)
}

// find returns the machine ref names, or 404 (also for another app's machine).
func (a *Agent) find(ref api.MachineRef) (*mach, error) {
	m := a.lookup(ref.ID)
	if m == nil || m.rec.Load().App != ref.App {
		return nil, api.Errorf(404, "machine %s not found in app %s", ref.ID, ref.App)
	}
	return m, nil
}

// locked finds the machine, takes its operation lock and checks the lease.
// The caller unlocks m.opMu.
func (a *Agent) locked(ref api.MachineRef) (*mach, error) {
	m, err := a.find(ref)
	if err != nil {
		return nil, err
	}
	m.opMu.Lock()
	if err := checkLease(m.rec.Load(), ref.LeaseNonce, a.now()); err != nil {
		m.opMu.Unlock()
		return nil, err
	}
	return m, nil
}

func leaseHeld(r *record, now time.Time) bool {
	return r.Lease != nil && now.Before(r.Lease.ExpiresAt)
}

// checkLease refuses a change to a leased machine without the lease's nonce.
func checkLease(r *record, nonce string, now time.Time) error {
	if !leaseHeld(r, now) || nonceEqual(nonce, r.Lease.Nonce) {
		return nil
	}
	if nonce == "" {
		return api.Errorf(409, "machine %s is leased: send the lease nonce in the %s header", r.ID, api.LeaseNonceHeader)
	}
	return api.Errorf(409, "machine %s is leased: the lease nonce does not match", r.ID)
}

func nonceEqual(a, b string) bool {
	return a != "" && subtle.ConstantTimeCompare([]byte(a), []byte(b)) == 1
}

func newNonce() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func leaseView(l *lease, inst string) *api.Lease {
	return &api.Lease{Status: "success", Data: &api.LeaseData{
		Nonce: l.Nonce, ExpiresAt: l.ExpiresAt.Unix(), Owner: l.Owner, Description: l.Description, Version: inst,
	}}
}

// view renders machine m at record r as the API's Machine.
func (a *Agent) view(m *mach, r *record) *api.Machine {
	out := &api.Machine{
		ID: r.ID, Name: r.Name, State: string(r.State), Region: r.Region,
		InstanceID: r.Instance, Version: r.Instance, PrivateIP: a.privateIP(r),
		CreatedAt:  r.CreatedAt.UTC().Format(time.RFC3339),
		UpdatedAt:  r.UpdatedAt.UTC().Format(time.RFC3339),
		Config:     r.Config,
		Events:     r.Events,
		HostStatus: api.HostStatusOK,
		Cordoned:   r.Cordoned,
		ImageRef:   imageRef(r.Config),
	}
	if r.ImageDigest != "" {
		out.ImageRef.Digest = r.ImageDigest
	}
	if r.State == machine.Started {
		out.Checks = m.checkStatuses()
	}
	if r.State == machine.Destroyed {
		out.PrivateIP = ""
	}
	return out
}

// imageRef splits an image reference into its parts (no registry lookup:
// the digest is known only when the reference carries it).
func imageRef(cfg *api.MachineConfig) api.ImageRef {
	if cfg == nil {
		return api.ImageRef{}
	}
	var out api.ImageRef
	ref, digest, _ := strings.Cut(cfg.Image, "@")
	out.Digest = digest
	if first, rest, ok := strings.Cut(ref, "/"); ok && (strings.ContainsAny(first, ".:") || first == "localhost") {
		out.Registry, ref = first, rest
	}
	if i := strings.LastIndexByte(ref, ':'); i >= 0 && !strings.Contains(ref[i:], "/") {
		ref, out.Tag = ref[:i], ref[i+1:]
	}
	out.Repository = ref
	return out
}

// cloneConfig deep-copies a config, so the copy can be changed while
// readers hold the original.
func cloneConfig(c *api.MachineConfig) *api.MachineConfig {
	b, err := json.Marshal(c)
	if err != nil {
		panic(fmt.Sprintf("clone config: %v", err))
	}
	out := new(api.MachineConfig)
	if err := json.Unmarshal(b, out); err != nil {
		panic(fmt.Sprintf("clone config: %v", err))
	}
	return out
}
