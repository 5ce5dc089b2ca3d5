package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/place"
)

var _ httpapi.Backend = (*Server)(nil)

// newMachineID returns 14 lowercase hex characters.
func newMachineID() string {
	var b [7]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

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
func (s *Server) entry(ctx context.Context, ref httpapi.MachineRef, write bool) (machineEntry, error) {
	a, err := s.appFor(ctx, ref.App, write)
	if err != nil {
		return machineEntry{}, err
	}
	if !validMachineID(ref.ID) {
		return machineEntry{}, api.Errorf(http.StatusNotFound, "machine %s not found", clipName(ref.ID))
	}
	me, _, err := catalog.GetJSON[machineEntry](ctx, s.machines, machineKey(ref.App, ref.ID))
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && (me.Lost || me.Doomed || me.AppID != a.ID)) {
		return machineEntry{}, api.Errorf(http.StatusNotFound, "machine %s not found", ref.ID)
	}
	return me, err
}

func validMachineID(id string) bool {
	if len(id) != 14 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

// hostClient returns a client for a host's API, or 503 when the host is not
// reachable now.
func (s *Server) hostClient(hostID, nonce string) (*api.Client, error) {
	h := s.cfg.Cluster.Snapshot().Host(hostID)
	switch {
	case h == nil:
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is not known to the cluster", hostID)
	case !h.Up():
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s is %s", hostID, h.Status)
	case h.Addrs["api"] == "":
		return nil, api.Errorf(http.StatusServiceUnavailable, "host %s advertises no API address", hostID)
	}
	c := api.NewClient("http://"+h.Addrs["api"], s.cfg.AgentToken).WithLeaseNonce(nonce)
	c.HTTPClient = s.cfg.HTTPClient
	return c, nil
}

// forward finds the machine's host and hands fn a client for it.
func (s *Server) forward(ctx context.Context, ref httpapi.MachineRef, write bool, fn func(*api.Client) error) error {
	me, err := s.entry(ctx, ref, write)
	if err != nil {
		return err
	}
	c, err := s.hostClient(me.Host, ref.LeaseNonce)
	if err != nil {
		return err
	}
	return hostError(fn(c))
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
	if in.ID != "" || in.Org != "" || in.Secrets != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "id, org and secrets are set by the control plane")
	}
	if in.Config == nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	regions, err := parseRegions(in.Region)
	if err != nil {
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
	if !in.SkipSecrets {
		sec, err := s.plainSecrets(ctx, a)
		if err != nil {
			return nil, err
		}
		in.Secrets = sec
	}
	in.Org = a.Org
	in.ID = newMachineID()
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
			continue
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
func (s *Server) GetMachine(ctx context.Context, ref httpapi.MachineRef) (*api.Machine, error) {
	me, err := s.entry(ctx, ref, false)
	if err != nil {
		return nil, err
	}
	c, err := s.hostClient(me.Host, ref.LeaseNonce)
	if err != nil {
		return unreachable(me, s.cfg.Cluster.Snapshot().Machine(me.ID)), nil
	}
	m, err := c.Get(ctx, ref.App, ref.ID)
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
func (s *Server) ListMachines(ctx context.Context, appName string, f httpapi.ListFilter) ([]*api.Machine, error) {
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
			c, err := s.hostClient(hostID, "")
			if err == nil {
				var got []*api.Machine
				got, err = c.List(ctx, appName, api.ListMachinesOptions{Region: f.Region, Metadata: f.Metadata, IncludeDeleted: f.IncludeDeleted})
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
func (s *Server) UpdateMachine(ctx context.Context, ref httpapi.MachineRef, in api.LaunchMachineInput) (*api.Machine, error) {
	if in.ID != "" || in.Org != "" || in.Secrets != nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "id, org and secrets are set by the control plane")
	}
	if in.Config == nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, "config is required")
	}
	if err := in.Config.Validate(); err != nil {
		return nil, err
	}
	var out *api.Machine
	a, err := s.appFor(ctx, ref.App, true)
	if err != nil {
		return nil, err
	}
	err = s.forward(ctx, ref, true, func(c *api.Client) error {
		if !in.SkipSecrets {
			sec, err := s.plainSecrets(ctx, a)
			if err != nil {
				return err
			}
			if sec == nil {
				sec = map[string]string{}
			}
			in.Secrets = sec
		}
		var err error
		if out, err = c.Update(ctx, ref.App, ref.ID, in); err == nil {
			s.resized(ctx, ref, guestOf(in.Config))
		}
		return err
	})
	return out, err
}

// resized records a machine's new guest size in its entry, for fairness.
func (s *Server) resized(ctx context.Context, ref httpapi.MachineRef, g place.Resources) {
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

func (s *Server) StartMachine(ctx context.Context, ref httpapi.MachineRef) (*api.StartResponse, error) {
	var out *api.StartResponse
	err := s.forward(ctx, ref, true, func(c *api.Client) (err error) {
		out, err = c.Start(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) StopMachine(ctx context.Context, ref httpapi.MachineRef, in api.StopMachineInput) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.Stop(ctx, ref.App, ref.ID, in) })
}

func (s *Server) RestartMachine(ctx context.Context, ref httpapi.MachineRef, o httpapi.RestartOptions) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error {
		return c.Restart(ctx, ref.App, ref.ID, api.RestartOptions{ForceStop: o.ForceStop, Timeout: o.Timeout, Signal: o.Signal})
	})
}

func (s *Server) SignalMachine(ctx context.Context, ref httpapi.MachineRef, signal string) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.Signal(ctx, ref.App, ref.ID, signal) })
}

func (s *Server) SuspendMachine(ctx context.Context, ref httpapi.MachineRef) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.Suspend(ctx, ref.App, ref.ID) })
}

// WaitMachine waits at the host, then answers the machine as it is then.
func (s *Server) WaitMachine(ctx context.Context, ref httpapi.MachineRef, o httpapi.WaitOptions) (*api.Machine, error) {
	var out *api.Machine
	err := s.forward(ctx, ref, false, func(c *api.Client) error {
		wo := api.WaitOptions{InstanceID: o.InstanceID, Timeout: o.Timeout}
		if len(o.States) > 0 {
			wo.State, wo.States = o.States[0], o.States[1:]
		}
		if err := c.Wait(ctx, ref.App, ref.ID, wo); err != nil {
			if errors.Is(err, api.ErrNotFound) && slices.Contains(o.States, api.StateDestroyed) {
				out = &api.Machine{ID: ref.ID, State: api.StateDestroyed}
				return nil
			}
			return err
		}
		var err error
		out, err = c.Get(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

// DestroyMachine destroys the machine at its host and forgets its entry.
func (s *Server) DestroyMachine(ctx context.Context, ref httpapi.MachineRef, force bool) error {
	me, err := s.entry(ctx, ref, true)
	if err != nil {
		return err
	}
	return s.destroy(ctx, me, force, ref.LeaseNonce)
}

// destroy destroys a machine and deletes its entry. A machine whose host is
// down is marked doomed instead: it disappears from the API at once, and
// the reconciler destroys it if its host comes back.
func (s *Server) destroy(ctx context.Context, me machineEntry, force bool, nonce ...string) error {
	h := s.cfg.Cluster.Snapshot().Host(me.Host)
	if h == nil || !h.Up() {
		me.Doomed, me.Marked = true, s.cfg.Now().UTC()
		_, err := s.machines.Put(ctx, machineKey(me.App, me.ID), mustJSON(me))
		return err
	}
	c, err := s.hostClient(me.Host, strings.Join(nonce, ""))
	if err != nil {
		return err
	}
	if err := c.Destroy(ctx, me.App, me.ID, force); err != nil && !errors.Is(err, api.ErrNotFound) {
		return hostError(err)
	}
	return s.machines.Delete(ctx, machineKey(me.App, me.ID), 0)
}

func (s *Server) Events(ctx context.Context, ref httpapi.MachineRef) ([]*api.MachineEvent, error) {
	var out []*api.MachineEvent
	err := s.forward(ctx, ref, false, func(c *api.Client) (err error) {
		out, err = c.Events(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) Versions(ctx context.Context, ref httpapi.MachineRef) ([]*api.MachineVersion, error) {
	var out []*api.MachineVersion
	err := s.forward(ctx, ref, false, func(c *api.Client) (err error) {
		out, err = c.Versions(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) Processes(ctx context.Context, ref httpapi.MachineRef) ([]api.ProcessStat, error) {
	var out []api.ProcessStat
	err := s.forward(ctx, ref, false, func(c *api.Client) (err error) {
		out, err = c.Processes(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) Exec(ctx context.Context, ref httpapi.MachineRef, in api.ExecRequest) (*api.ExecResponse, error) {
	var out *api.ExecResponse
	err := s.forward(ctx, ref, true, func(c *api.Client) (err error) {
		out, err = c.Exec(ctx, ref.App, ref.ID, in)
		return err
	})
	return out, err
}

func (s *Server) Logs(ctx context.Context, ref httpapi.MachineRef, o httpapi.LogOptions, emit func(api.LogEntry) error) error {
	return s.forward(ctx, ref, false, func(c *api.Client) error {
		return c.StreamLogs(ctx, ref.App, ref.ID, api.LogOptions{Tail: o.Tail, Follow: o.Follow}, emit)
	})
}

func (s *Server) GetLease(ctx context.Context, ref httpapi.MachineRef) (*api.Lease, error) {
	var out *api.Lease
	err := s.forward(ctx, ref, false, func(c *api.Client) (err error) {
		out, err = c.GetLease(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) AcquireLease(ctx context.Context, ref httpapi.MachineRef, in api.LeaseInput) (*api.Lease, error) {
	var out *api.Lease
	err := s.forward(ctx, ref, true, func(c *api.Client) (err error) {
		out, err = c.AcquireLease(ctx, ref.App, ref.ID, in)
		return err
	})
	return out, err
}

func (s *Server) ReleaseLease(ctx context.Context, ref httpapi.MachineRef) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.ReleaseLease(ctx, ref.App, ref.ID, ref.LeaseNonce) })
}

func (s *Server) Cordon(ctx context.Context, ref httpapi.MachineRef, on bool) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error {
		if on {
			return c.Cordon(ctx, ref.App, ref.ID)
		}
		return c.Uncordon(ctx, ref.App, ref.ID)
	})
}

func (s *Server) Metadata(ctx context.Context, ref httpapi.MachineRef) (map[string]string, error) {
	var out map[string]string
	err := s.forward(ctx, ref, false, func(c *api.Client) (err error) {
		out, err = c.Metadata(ctx, ref.App, ref.ID)
		return err
	})
	return out, err
}

func (s *Server) SetMetadata(ctx context.Context, ref httpapi.MachineRef, key, value string) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.SetMetadata(ctx, ref.App, ref.ID, key, value) })
}

func (s *Server) DeleteMetadata(ctx context.Context, ref httpapi.MachineRef, key string) error {
	return s.forward(ctx, ref, true, func(c *api.Client) error { return c.DeleteMetadata(ctx, ref.App, ref.ID, key) })
}
