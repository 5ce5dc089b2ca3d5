package server

import (
	"context"
	"errors"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/reconcile"
)

// Bounds on a declared group.
const (
	maxGroupCount    = 1000
	maxGroupStandbys = 10
)

// groupOut is a group as the API shows it: what it declares, and what
// each region has now.
func (s *Server) groupOut(g group, es []machineEntry) api.Group {
	out := api.Group{Name: g.Name, Config: g.Config, Regions: g.Regions, Standbys: g.Standbys, Spill: g.Spill,
		Running: map[string]int{}, Ready: map[string]int{}, Status: map[string]api.GroupRegionStatus{}}
	now := s.cfg.Now()
	var last time.Time
	for r, st := range reconcile.Status(s.planInput(g, es, s.cfg.Cluster.Snapshot(), now)) {
		out.Running[r], out.Ready[r] = st.Started, st.Standby
		out.Status[r] = api.GroupRegionStatus{Started: st.Started, Stopped: st.Stopped, Failed: st.Failed,
			Pending: st.Pending, Standby: st.Standby, PendingReason: st.Why,
			Failures: st.Failures, LastError: st.LastError, RetryAt: st.RetryAt}
		if b := g.Backoff[r]; st.Failures > 0 && b.At.After(last) {
			last, out.LastError = b.At, b.LastError
		}
	}
	return out
}

// listGroups is GET /v1/apps/{app}/groups.
func (s *Server) listGroups(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	gs, err := s.groups.List(r.Context(), a.Name+".")
	if err != nil {
		return err
	}
	es, err := s.entries(r.Context(), a)
	if err != nil {
		return err
	}
	out := []api.Group{}
	for _, e := range gs {
		var g group
		if decodeJSON(e.Value, &g) == nil && g.AppID == a.ID {
			out = append(out, s.groupOut(g, es))
		}
	}
	httpapi.WriteJSON(w, http.StatusOK, map[string][]api.Group{"groups": out})
	return nil
}

func (s *Server) getGroup(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), false)
	if err != nil {
		return err
	}
	name := r.PathValue("group")
	if !validSlug.MatchString(name) {
		return api.Errorf(http.StatusNotFound, "group %s not found", clipName(name))
	}
	g, _, err := catalog.GetJSON[group](r.Context(), s.groups, groupKey(a.Name, name))
	if errors.Is(err, catalog.ErrNotFound) || (err == nil && g.AppID != a.ID) {
		return api.Errorf(http.StatusNotFound, "group %s not found", name)
	}
	if err != nil {
		return err
	}
	es, err := s.entries(r.Context(), a)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, s.groupOut(g, es))
	return nil
}

// putGroup is PUT /v1/apps/{app}/groups/{group} {config, regions, standbys,
// spill}: declare how many machines of config each region runs. The
// reconciler makes it so and keeps it so (see package reconcile).
func (s *Server) putGroup(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	name := r.PathValue("group")
	var in api.Group
	if err := httpapi.DecodeBody(r, &in, true); err != nil {
		return err
	}
	switch {
	case !validSlug.MatchString(name):
		return api.Errorf(http.StatusUnprocessableEntity, "group name %q: use lowercase letters, digits and -", clipName(name))
	case in.Config == nil:
		return api.Errorf(http.StatusUnprocessableEntity, "config is required")
	case in.Standbys < 0 || in.Standbys > maxGroupStandbys:
		return api.Errorf(http.StatusUnprocessableEntity, "standbys must be between 0 and %d", maxGroupStandbys)
	}
	for code, n := range in.Regions {
		if !knownRegion(code) {
			return api.Errorf(http.StatusUnprocessableEntity, "regions: %q is unknown", clipName(code))
		}
		if n < 0 || n > maxGroupCount {
			return api.Errorf(http.StatusUnprocessableEntity, "regions.%s: count must be between 0 and %d", code, maxGroupCount)
		}
	}
	cfg := *in.Config
	if cfg.Metadata == nil {
		cfg.Metadata = map[string]string{}
	} else {
		cfg.Metadata = cloneMap(cfg.Metadata)
	}
	cfg.Metadata[api.MetadataProcessGroup] = name
	// Checked as the group's machines carry it, process group included:
	// a config the hosts would refuse on every create is refused here.
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := s.pinImage(a.Org, &cfg); err != nil {
		return err
	}
	if err := s.claimTCPPorts(r.Context(), a, &cfg); err != nil {
		return err
	}
	if n, had, err := s.countGroups(r.Context(), a, name); err != nil {
		return err
	} else if !had && n >= api.MaxGroupsPerApp {
		return tooManyGroups(a)
	}
	g := group{App: a.Name, AppID: a.ID, Name: name, Config: &cfg, Regions: in.Regions, Standbys: in.Standbys,
		Spill: in.Spill, Updated: s.cfg.Now().UTC()}
	isNew := false
	g, rev, err := catalog.UpdateJSON(r.Context(), s.groups, groupKey(a.Name, name), func(v *group, exists bool) error {
		isNew = !exists || v.AppID != a.ID
		next := g
		if exists && v.AppID == a.ID && reflect.DeepEqual(v.Config, g.Config) {
			// The same machines declared again: their failures still
			// count, or declaring in a loop would defeat the backoff.
			next.Backoff, next.Started = v.Backoff, v.Started
		}
		*v = next
		return nil
	})
	if err != nil {
		return err
	}
	if isNew {
		// Declared at the same time as others, it may be one too many: the
		// last to count sees them all, and takes its own back.
		n, _, err := s.countGroups(r.Context(), a, name)
		if err == nil && n > api.MaxGroupsPerApp {
			err = tooManyGroups(a)
		}
		if err != nil {
			s.groups.Delete(r.Context(), groupKey(a.Name, name), rev)
			return err
		}
	}
	s.log.Info("group declared", "app", a.Name, "group", name, "regions", in.Regions, "standbys", in.Standbys)
	s.pokeReconciler()
	es, err := s.entries(r.Context(), a)
	if err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, s.groupOut(g, es))
	return nil
}

// countGroups counts the groups app a declares, and tells whether one is
// named name.
func (s *Server) countGroups(ctx context.Context, a app, name string) (int, bool, error) {
	es, err := s.groups.List(ctx, a.Name+".")
	if err != nil {
		return 0, false, err
	}
	n, had := 0, false
	for _, e := range es {
		var g group
		if decodeJSON(e.Value, &g) == nil && g.AppID == a.ID {
			n++
			had = had || g.Name == name
		}
	}
	return n, had, nil
}

func tooManyGroups(a app) error {
	return api.Errorf(http.StatusUnprocessableEntity, "groups: app %s already declares %d groups, the most an app may (MaxGroupsPerApp); delete one first", a.Name, api.MaxGroupsPerApp)
}

// deleteGroup stops keeping a group; its machines stay as they are.
func (s *Server) deleteGroup(w http.ResponseWriter, r *http.Request) error {
	a, err := s.appFor(r.Context(), r.PathValue("app"), true)
	if err != nil {
		return err
	}
	name := r.PathValue("group")
	if !validSlug.MatchString(name) {
		return api.Errorf(http.StatusNotFound, "group %s not found", clipName(name))
	}
	if err := s.groups.Delete(r.Context(), groupKey(a.Name, name), 0); err != nil {
		return err
	}
	httpapi.WriteJSON(w, http.StatusOK, api.OK{OK: true})
	return nil
}

func cloneMap(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// listAllGroups returns every declared group, by key.
func (s *Server) listAllGroups(ctx context.Context) ([]group, error) {
	es, err := s.groups.List(ctx, "")
	if err != nil {
		return nil, err
	}
	out := make([]group, 0, len(es))
	for _, e := range es {
		var g group
		if err := decodeJSON(e.Value, &g); err != nil {
			s.log.Warn("skip unreadable group", "key", e.Key, "err", err)
			continue
		}
		out = append(out, g)
	}
	slices.SortFunc(out, func(a, b group) int { return strings.Compare(a.App+"."+a.Name, b.App+"."+b.Name) })
	return out, nil
}
