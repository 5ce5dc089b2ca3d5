package server

import (
	"context"
	"time"

	"github.com/flamehq/flame/api"
)

// deletedMachines answers the destroyed part of a list with
// include_deleted: a destroyed machine's entry is gone from the catalog,
// but its host keeps the machine destroyed for a while, so every live host
// is asked. An app of the same name deleted earlier may have left destroyed
// machines on the same hosts; they were created before this app was, and
// are left out. known holds the ids already listed.
func (s *Server) deletedMachines(ctx context.Context, a app, f api.ListMachinesOptions, known map[string]bool) []*api.Machine {
	f.IncludeDeleted = true
	var hosts []string
	for _, h := range s.cfg.Cluster.Snapshot().Hosts() {
		if h.Up() && h.Addrs["api"] != "" {
			hosts = append(hosts, h.ID)
		}
	}
	results := make(chan []*api.Machine, len(hosts))
	for _, id := range hosts {
		go func() {
			var out []*api.Machine
			defer func() { results <- out }()
			c, err := s.hostClient(id, "")
			if err != nil {
				return
			}
			got, err := c.ListMachines(ctx, a.Name, f)
			if err != nil {
				s.log.Debug("list destroyed machines: host unreachable", "host", id, "err", err)
				return
			}
			for _, m := range got {
				if m.State == string(api.StateDestroyed) && !known[m.ID] && !createdAt(m).Before(a.CreatedAt.Truncate(time.Millisecond)) {
					out = append(out, m)
				}
			}
		}()
	}
	var out []*api.Machine
	for range hosts {
		out = append(out, <-results...)
	}
	return out
}

// createdAt is when a machine was created, to the millisecond where its
// events tell (the API's created_at has whole seconds): its earliest event
// within the second created_at names.
func createdAt(m *api.Machine) time.Time {
	t, err := time.Parse(time.RFC3339, m.CreatedAt)
	if err != nil {
		return time.Time{}
	}
	best := t
	for _, e := range m.Events {
		if et := e.Time(); !et.Before(t) && et.Sub(t) < time.Second && (best.Equal(t) || et.Before(best)) {
			best = et
		}
	}
	return best
}
