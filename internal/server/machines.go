package server

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/place"
)

var _ api.Backend = (*Server)(nil)

// entries lists the machine entries of an app, without those that only wait
// for their host to return to be destroyed (lost or doomed), and without
// those of an earlier app of the same name.
func (s *Server) entries(ctx context.Context, a app) ([]machineEntry, error) {
	all, err := s.allEntries(ctx, a.Name+".")
	if err != nil {
		return nil, err
	}
	out := all[:0]
	for _, me := range all {
		if !me.Lost && !me.Doomed && me.AppID == a.ID {
			out = append(out, me)
		}
	}
	return out, nil
}

// allEntries lists every machine entry under prefix ("" for all apps).
func (s *Server) allEntries(ctx context.Context, prefix string) ([]machineEntry, error) {
	es, err := s.machines.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]machineEntry, 0, len(es))
	for _, e := range es {
		var me machineEntry
		if err := decodeJSON(e.Value, &me); err != nil {
			s.log.Warn("skip unreadable machine entry", "key", e.Key, "err", err)
			continue
		}
		out = append(out, me)
	}
	return out, nil
}

// entry loads one machine's entry, after checking the caller may see (or,
// with write, change) its app.
func (s *Server) entry(ctx context.Context, ref api.MachineRef, write bool) (machineEntry, error) {
	a, err := s.appFor(ctx, ref.App, write)
	if err != nil {
		return machineEntry{}, err
	}
	if !api.ValidMachineID(ref.ID) {
		return machineEntry{}, api.Errorf(http.StatusNotFound, "machine %s not found", clipName(ref.ID))
	}
	me, _, err := catalog.GetJSON[machineEntry](ctx, s.machines, machineKey(ref.App, ref.ID))
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && (me.Lost || me.Doomed || me.AppID != a.ID)) {
		return machineEntry{}, api.Errorf(http.StatusNotFound, "machine %s not found", ref.ID)
	}
	return me, err
}

// hostClient returns a client for a host's API, or 503 when the host is not
// reachable now (or not enrolled, or revoked).
func (s *Server) hostClient(hostID string) (*api.Client, error) {
	h := s.cfg.Cluster.Snapshot().Host(hostID)
	switch {
	case h == nil:
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is not known to the cluster", hostID)
	case !h.Up():
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is %s", hostID, h.Status)
	}
	// Where the host enrolled, never an address the gossip advertises.
	return s.enrolledClient(hostID)
}

// onHost returns the Machines API of the host that runs the machine ref
// names, after checking the caller may see (with write, change) its app: the
// control plane answers a call about one machine by making the same call
// there, lease nonce and all, and passing its answer on (see hostError).
func (s *Server) onHost(ctx context.Context, ref api.MachineRef, write bool) (api.Backend, error) {
	me, err := s.entry(ctx, ref, write)
	if err != nil {
		return nil, err
	}
	return s.hostClient(me.Host)
}

// fromHost passes a host's answer on, its error through hostError.
func fromHost[T any](v T, err error) (T, error) {
	return v, hostError(err)
}

// hostError passes a host's API errors through as they are (the client gets
// the host's status and message) and turns a failure to reach it into 503.
func hostError(err error) error {
	if err == nil {
		return nil
	}
	var ae *api.Error
	if errors.As(err, &ae) {
		return ae
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	return api.Errorf(http.StatusServiceUnavailable, "host unreachable: %v", err)
}

// unreachable is what the control plane can say of a machine whose host is
// down: the last facts the cluster has of it.
func unreachable(me machineEntry, m *cluster.Machine) *api.Machine {
	out := &api.Machine{ID: me.ID, Name: me.ID, Region: me.Region, State: api.StateStopped,
		HostStatus: api.HostStatusUnreachable, CreatedAt: me.Created.Format(time.RFC3339)}
	if m != nil {
		out.State, out.InstanceID, out.PrivateIP, out.Cordoned = m.State, m.InstanceID, m.PrivateIP, m.Cordoned
		out.Version = m.InstanceID
	}
	return out
}

// CreateMachine places a machine (see place.go) and asks the chosen host to
// create it.
func (s *Server) CreateMachine(ctx context.Context, appName string, in api.LaunchMachineInput) (*api.Machine, error) {
	a, err := s.appFor(ctx, appName, true)
	if err != nil {
		return nil, err
	}
	if in.ID != "" || in.Org != "" || in.OrgNetwork != 0 || in.Secrets != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "id, org, org_network and secrets are set by the control plane")
	}
	if in.Config == nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	cfg := *in.Config
	if err := s.pinImage(a.Org, &cfg); err != nil { // before anything is claimed
		return nil, err
	}
	in.Config = &cfg
	regions, err := parseRegions(in.Region)
	if err != nil {
		return nil, err
	}
	if err := s.regionsHaveHosts(regions); err != nil {
		return nil, err
	}
	if err := s.claimTCPPorts(ctx, a, in.Config); err != nil {
		return nil, err
	}
	return s.create(ctx, a, in, regions, intent{})
}

// intent marks the machines the reconciler creates: which group, standby or
// not, and the region whose count it fills.
type intent struct {
	Group   string
	Standby bool
	For     string
}

// create places and creates a machine of app a.
func (s *Server) create(ctx context.Context, a app, in api.LaunchMachineInput, regions []string, it intent) (*api.Machine, error) {
	if in.Config != nil {
		cfg := *in.Config // the caller's (a group's) config stays as it is
		if err := s.pinImage(a.Org, &cfg); err != nil {
			return nil, err
		}
		in.Config = &cfg
	}
	if !in.SkipSecrets {
		sec, err := s.plainSecrets(ctx, a)
		if err != nil {
			return nil, err
		}
		in.Secrets = sec
	}
	in.Org = a.Org
	net, err := s.orgNetwork(ctx, a.Org)
	if err != nil {
		return nil, err
	}
	in.OrgNetwork = net
	in.ID = api.NewMachineID()
	in.Region = ""
	return s.placer.place(ctx, a, in, regions, it)
}

// parseRegions reads a create's region: a comma list in preference order,
// where "any" means any region (Fly's "syd,any"). Empty is any.
func parseRegions(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return []string{"any"}, nil
	}
	var out []string
	for r := range strings.SplitSeq(s, ",") {
		r = strings.ToLower(strings.TrimSpace(r))
		if r == "" {
			return nil, api.Errorf(http.StatusUnprocessableEntity, "region %q has an empty entry: want codes like \"ams\" or \"syd,any\"", clipName(s))
		}
		if r != "any" && !knownRegion(r) {
			return nil, api.Errorf(http.StatusUnprocessableEntity, "region %q is unknown", clipName(r))
		}
		if !slices.Contains(out, r) {
			out = append(out, r)
		}
	}
	if len(out) == 0 {
		return []string{"any"}, nil
	}
	return out, nil
}

// GetMachine asks the machine's host; when the host is down it answers the
// cluster's last facts with host_status "unreachable".
func (s *Server) GetMachine(ctx context.Context, ref api.MachineRef) (*api.Machine, error) {
	me, err := s.entry(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	c, err := s.hostClient(me.Host)
	if err != nil {
		return unreachable(me, s.cfg.Cluster.Snapshot().Machine(me.ID)), nil
	}
	m, err := c.GetMachine(ctx, ref)
	if err != nil {
		if errors.Is(err, api.ErrNotFound) {
			return nil, err
		}
		var ae *api.Error
		if !errors.As(err, &ae) {
			return unreachable(me, s.cfg.Cluster.Snapshot().Machine(me.ID)), nil
		}
		return nil, ae
	}
	return m, nil
}

// ListMachines asks every host that runs machines of the app, at once.
func (s *Server) ListMachines(ctx context.Context, appName string, f api.ListMachinesOptions) ([]*api.Machine, error) {
	a, err := s.appFor(ctx, appName, false)
	if err != nil {
		return nil, err
	}
	es, err := s.entries(ctx, a)
	if err != nil {
		return nil, err
	}
	byHost := map[string][]machineEntry{}
	for _, me := range es {
		byHost[me.Host] = append(byHost[me.Host], me)
	}
	type result struct{ ms []*api.Machine }
	results := make(chan result, len(byHost))
	snap := s.cfg.Cluster.Snapshot()
	for hostID, mes := range byHost {
		go func() {
			var r result
			c, err := s.hostClient(hostID)
			if err == nil {
				var got []*api.Machine
				got, err = c.ListMachines(ctx, appName, f)
				want := map[string]bool{}
				for _, me := range mes {
					want[me.ID] = true
				}
				for _, m := range got {
					// Only what this app owns: a host also keeps
					// destroyed machines, of earlier apps of the same
					// name too.
					if want[m.ID] {
						r.ms = append(r.ms, m)
					}
				}
			}
			if err != nil {
				s.log.Debug("list machines: host unreachable", "host", hostID, "err", err)
				r.ms = r.ms[:0]
				for _, me := range mes {
					if f.Region == "" || f.Region == me.Region {
						r.ms = append(r.ms, unreachable(me, snap.Machine(me.ID)))
					}
				}
			}
			results <- r
		}()
	}
	var out []*api.Machine
	for range byHost {
		r := <-results
		out = append(out, r.ms...)
	}
	if f.IncludeDeleted {
		known := map[string]bool{}
		for _, m := range out {
			known[m.ID] = true
		}
		gone, err := s.deletedMachines(ctx, a, f, known)
		if err != nil {
			return nil, err
		}
		out = append(out, gone...)
	}
	slices.SortFunc(out, func(a, b *api.Machine) int {
		return cmpStrings(a.CreatedAt+a.ID, b.CreatedAt+b.ID)
	})
	if out == nil {
		out = []*api.Machine{}
	}
	return out, nil
}

func cmpStrings(a, b string) int { return strings.Compare(a, b) }

// UpdateMachine forwards the new config with the app's current secrets.
func (s *Server) UpdateMachine(ctx context.Context, ref api.MachineRef, in api.LaunchMachineInput) (*api.Machine, error) {
	if in.ID != "" || in.Org != "" || in.OrgNetwork != 0 || in.Secrets != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "id, org, org_network and secrets are set by the control plane")
	}
	if in.Config == nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	a, err := s.appFor(ctx, ref.App, true)
	if err != nil {
		return nil, err
	}
	cfg := *in.Config
	if err := s.pinImage(a.Org, &cfg); err != nil {
		return nil, err
	}
	in.Config = &cfg
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return nil, err
	}
	if err := s.claimTCPPorts(ctx, a, in.Config); err != nil {
		return nil, err
	}
	if !in.SkipSecrets {
		sec, err := s.plainSecrets(ctx, a)
		if err != nil {
			return nil, err
		}
		if sec == nil {
			sec = map[string]string{}
		}
		in.Secrets = sec
	}
	out, err := h.UpdateMachine(ctx, ref, in)
	if err != nil {
		return nil, hostError(err)
	}
	s.resized(ctx, ref, guestOf(in.Config))
	return out, nil
}

// resized records a machine's new guest size in its entry, for fairness.
func (s *Server) resized(ctx context.Context, ref api.MachineRef, g place.Resources) {
	_, _, err := catalog.UpdateJSON(ctx, s.machines, machineKey(ref.App, ref.ID), func(me *machineEntry, exists bool) error {
		if !exists {
			return errNoChange
		}
		me.CPUs, me.MemoryMB = g.CPUs, g.MemoryMB
		return nil
	})
	if err != nil && !errors.Is(err, errNoChange) {
		s.log.Warn("record machine size", "machine", ref.ID, "err", err)
	}
}

// errNoChange aborts a catalog update that has nothing to do.
var errNoChange = errors.New("no change")

// The calls below are about one machine: each is the same call on the
// machine's host.

func (s *Server) StartMachine(ctx context.Context, ref api.MachineRef) (*api.StartResponse, error) {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return nil, err
	}
	return fromHost(h.StartMachine(ctx, ref))
}

func (s *Server) StopMachine(ctx context.Context, ref api.MachineRef, in api.StopMachineInput) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.StopMachine(ctx, ref, in))
}

func (s *Server) RestartMachine(ctx context.Context, ref api.MachineRef, o api.RestartOptions) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.RestartMachine(ctx, ref, o))
}

func (s *Server) SignalMachine(ctx context.Context, ref api.MachineRef, signal string) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.SignalMachine(ctx, ref, signal))
}

func (s *Server) SuspendMachine(ctx context.Context, ref api.MachineRef) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.SuspendMachine(ctx, ref))
}

// WaitMachine waits at the host, which answers the machine as it is then.
func (s *Server) WaitMachine(ctx context.Context, ref api.MachineRef, o api.WaitOptions) (*api.Machine, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.WaitMachine(ctx, ref, o))
}

// DestroyMachine destroys the machine at its host and forgets its entry.
func (s *Server) DestroyMachine(ctx context.Context, ref api.MachineRef, force bool) error {
	me, err := s.entry(ctx, ref, true)
	if err != nil {
		return err
	}
	return s.destroy(ctx, me, force, ref.LeaseNonce)
}

// destroy destroys a machine, leaving a tombstone for include_deleted
// lists, and deletes its entry. A machine whose host is down is marked
// doomed instead: it disappears from the API at once, and the reconciler
// destroys it if its host comes back.
func (s *Server) destroy(ctx context.Context, me machineEntry, force bool, nonce ...string) error {
	if err := s.bury(ctx, me); err != nil {
		return err
	}
	h := s.cfg.Cluster.Snapshot().Host(me.Host)
	if h == nil || !h.Up() {
		me.Doomed, me.Marked = true, s.cfg.Now().UTC()
		_, err := s.machines.Put(ctx, machineKey(me.App, me.ID), mustJSON(me))
		return err
	}
	c, err := s.hostClient(me.Host)
	if err != nil {
		return err
	}
	ref := api.MachineRef{App: me.App, ID: me.ID, LeaseNonce: strings.Join(nonce, "")}
	if err := c.DestroyMachine(ctx, ref, force); err != nil && !errors.Is(err, api.ErrNotFound) {
		return hostError(err)
	}
	return s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
}

func (s *Server) MachineEvents(ctx context.Context, ref api.MachineRef) ([]*api.MachineEvent, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.MachineEvents(ctx, ref))
}

func (s *Server) MachineVersions(ctx context.Context, ref api.MachineRef) ([]*api.MachineVersion, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.MachineVersions(ctx, ref))
}

func (s *Server) MachineProcesses(ctx context.Context, ref api.MachineRef) ([]api.ProcessStat, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.MachineProcesses(ctx, ref))
}

func (s *Server) ExecMachine(ctx context.Context, ref api.MachineRef, in api.ExecRequest) (*api.ExecResponse, error) {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return nil, err
	}
	return fromHost(h.ExecMachine(ctx, ref, in))
}

func (s *Server) MachineLogs(ctx context.Context, ref api.MachineRef, o api.LogOptions, emit func(api.LogEntry) error) error {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return err
	}
	return hostError(h.MachineLogs(ctx, ref, o, emit))
}

func (s *Server) MachineLease(ctx context.Context, ref api.MachineRef) (*api.Lease, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.MachineLease(ctx, ref))
}

func (s *Server) AcquireMachineLease(ctx context.Context, ref api.MachineRef, in api.LeaseInput) (*api.Lease, error) {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return nil, err
	}
	return fromHost(h.AcquireMachineLease(ctx, ref, in))
}

func (s *Server) ReleaseMachineLease(ctx context.Context, ref api.MachineRef) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.ReleaseMachineLease(ctx, ref))
}

func (s *Server) CordonMachine(ctx context.Context, ref api.MachineRef, on bool) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.CordonMachine(ctx, ref, on))
}

func (s *Server) MachineMetadata(ctx context.Context, ref api.MachineRef) (map[string]string, error) {
	h, err := s.onHost(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	return fromHost(h.MachineMetadata(ctx, ref))
}

func (s *Server) SetMachineMetadata(ctx context.Context, ref api.MachineRef, key, value string) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.SetMachineMetadata(ctx, ref, key, value))
}

func (s *Server) DeleteMachineMetadata(ctx context.Context, ref api.MachineRef, key string) error {
	h, err := s.onHost(ctx, ref, true)
	if err != nil {
		return err
	}
	return hostError(h.DeleteMachineMetadata(ctx, ref, key))
}
