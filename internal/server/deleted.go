package server

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
)

// A machine's entry is forgotten once it is destroyed, but its host keeps
// the destroyed machine for listings. So that include_deleted shows an
// app's destroyed machines, and only that app's, destroy leaves a
// tombstone in the catalog: which machine, of which app (by id, not name),
// on which host. The tombstones, not clocks, say what a list shows: an app
// deleted and made again under the same name (perhaps by another org) has
// another id, so the earlier app's machines are never shown, however the
// hosts' clocks run; and only the hosts the tombstones name are asked.
const (
	// tombstoneTTL is how long a tombstone, and so a destroyed machine
	// in include_deleted, lasts.
	tombstoneTTL = 72 * time.Hour
	// maxTombstonesShown bounds the destroyed machines one list shows
	// (the newest), and so the hosts it asks.
	maxTombstonesShown = 256
	// maxDeletedHosts bounds the hosts one list asks for destroyed
	// machines; a read-only token can list as often as it likes.
	maxDeletedHosts = 16
)

// tombstone says a machine was destroyed: the app it belonged to and the
// host that keeps it.
type tombstone struct {
	ID        string    `json:"id"`
	AppID     string    `json:"app_id"`
	Host      string    `json:"host"`
	Destroyed time.Time `json:"destroyed_at"`
}

// tombstoneKey is <app>.<app id>.<machine id>: an app's tombstones are
// listed by its id as well as its name.
func tombstoneKey(appName, appID, id string) string {
	return tombstonePrefix(appName, appID) + id
}

func tombstonePrefix(appName, appID string) string { return appName + "." + appID + "." }

// bury records that a machine is being destroyed. Written before the host
// is asked, so a crash between the two loses nothing; a tombstone of a
// machine the host did not destroy shows nothing, as only destroyed
// machines are taken from it.
func (s *Server) bury(ctx context.Context, me machineEntry) error {
	t := tombstone{ID: me.ID, AppID: me.AppID, Host: me.Host, Destroyed: s.cfg.Now().UTC()}
	_, err := s.destroyed.Create(ctx, tombstoneKey(me.App, me.AppID, me.ID), mustJSON(t), tombstoneTTL)
	if err != nil && !errors.Is(err, catalog.ErrExists) {
		return fmt.Errorf("record destroyed machine %s: %w", me.ID, err)
	}
	return nil
}

// deletedMachines answers the destroyed part of a list with
// include_deleted: the machines the app's tombstones name, asked of the
// hosts that keep them. known holds the ids already listed.
func (s *Server) deletedMachines(ctx context.Context, a app, f api.ListMachinesOptions, known map[string]bool) ([]*api.Machine, error) {
	es, err := s.destroyed.List(ctx, tombstonePrefix(a.Name, a.ID))
	if err != nil {
		return nil, fmt.Errorf("list destroyed machines of %s: %w", a.Name, err)
	}
	var ts []tombstone
	for _, e := range es {
		var t tombstone
		// The key holds the app's id; the value must agree.
		if err := decodeJSON(e.Value, &t); err != nil || t.AppID != a.ID || known[t.ID] {
			continue
		}
		ts = append(ts, t)
	}
	byHost := tombstoneHosts(ts, maxTombstonesShown, maxDeletedHosts)
	f.IncludeDeleted = true
	results := make(chan []*api.Machine, len(byHost))
	for hostID, ids := range byHost {
		go func() {
			var out []*api.Machine
			defer func() { results <- out }()
			if h := s.cfg.Cluster.Snapshot().Host(hostID); h == nil || !h.Up() {
				return
			}
			c, err := s.hostClient(hostID)
			if err != nil {
				return
			}
			got, err := c.ListMachines(ctx, a.Name, f)
			if err != nil {
				s.log.Debug("list destroyed machines: host unreachable", "host", hostID, "err", err)
				return
			}
			for _, m := range got {
				if m.State == string(api.StateDestroyed) && ids[m.ID] {
					out = append(out, m)
				}
			}
		}()
	}
	var out []*api.Machine
	for range byHost {
		out = append(out, <-results...)
	}
	return out, nil
}

// tombstoneHosts picks what a list asks for: the newest shown tombstones,
// grouped by host, at most maxHosts hosts (those of the newest machines).
func tombstoneHosts(ts []tombstone, shown, maxHosts int) map[string]map[string]bool {
	ts = slices.Clone(ts)
	slices.SortFunc(ts, func(a, b tombstone) int {
		if c := b.Destroyed.Compare(a.Destroyed); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	out := map[string]map[string]bool{}
	for _, t := range ts[:min(len(ts), shown)] {
		if out[t.Host] == nil {
			if len(out) == maxHosts {
				continue
			}
			out[t.Host] = map[string]bool{}
		}
		out[t.Host][t.ID] = true
	}
	return out
}
