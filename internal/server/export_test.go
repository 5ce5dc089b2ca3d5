package server

import (
	"context"
	"errors"

	"github.com/flamehq/flame/internal/catalog"
)

// RecordEntryForTest writes a machine entry as a create does before it
// asks the host, and never asks: what a control plane that died between
// the two leaves behind.
func (s *Server) RecordEntryForTest(ctx context.Context, appName, id, hostID, region, groupName string) error {
	a, _, err := catalog.GetJSON[app](ctx, s.apps, appName)
	if err != nil {
		return err
	}
	me := machineEntry{ID: id, App: appName, AppID: a.ID, Org: a.Org, Host: hostID, Region: region,
		Created: s.cfg.Now().UTC(), Group: groupName, CPUs: 1, MemoryMB: 256}
	if groupName != "" {
		me.For = region
	}
	_, err = s.machines.Put(ctx, machineKey(appName, id), mustJSON(me))
	return err
}

// HasEntryForTest reports whether the catalog holds a machine entry.
func (s *Server) HasEntryForTest(ctx context.Context, appName, id string) (bool, error) {
	_, err := s.machines.Get(ctx, machineKey(appName, id))
	if errors.Is(err, catalog.ErrNotFound) {
		return false, nil
	}
	return err == nil, err
}

// LockHolderForTest is the id of the server holding the reconciler lock
// ("" when none does).
func (s *Server) LockHolderForTest(ctx context.Context) (string, error) {
	e, err := s.locks.Get(ctx, lockReconciler)
	if errors.Is(err, catalog.ErrNotFound) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return string(e.Value), nil
}
