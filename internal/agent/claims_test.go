package agent

import (
	"context"
	"errors"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
)

// TestLeaseSurvivesRestart: a lease is part of the machine's record, so an
// agent killed and started again on the same data dir still holds it: the
// same nonce, and changes without it are refused.
func TestLeaseSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	a := newAgent(t, dir, nil)
	ctx := context.Background()
	m := create(t, a, shConfig("exec sleep 60"))
	l, err := a.AcquireMachineLease(ctx, ref(m.ID), api.LeaseInput{TTL: 60, Description: "deploy"})
	if err != nil {
		t.Fatal(err)
	}
	abandon(a)

	b := agentOn(t, dir)
	got, err := b.MachineLease(ctx, ref(m.ID))
	if err != nil || got.Data == nil || got.Data.Nonce != l.Data.Nonce || got.Data.Description != "deploy" || got.Data.ExpiresAt != l.Data.ExpiresAt {
		t.Fatalf("lease after restart: %+v %v, want %+v", got, err, l.Data)
	}
	if _, err := b.AcquireMachineLease(ctx, ref(m.ID), api.LeaseInput{TTL: 30}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("another lease after restart: %v, want 409", err)
	}
	if err := b.StopMachine(ctx, ref(m.ID), api.StopMachineInput{}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("stop without the nonce after restart: %v, want 409", err)
	}
	held := api.MachineRef{App: app, ID: m.ID, LeaseNonce: l.Data.Nonce}
	if err := b.StopMachine(ctx, held, api.StopMachineInput{}); err != nil {
		t.Errorf("stop with the nonce after restart: %v", err)
	}
}

// TestEventsCapped: a machine keeps its last 50 events, in memory and in
// the store; the newest are kept, and a restarted agent reads back the
// same 50.
func TestEventsCapped(t *testing.T) {
	dir := t.TempDir()
	a := newAgent(t, dir, nil)
	ctx := context.Background()
	m := create(t, a, shConfig("exec sleep 60"))
	cycle := func() {
		t.Helper()
		if err := a.StopMachine(ctx, ref(m.ID), api.StopMachineInput{}); err != nil {
			t.Fatal(err)
		}
		if _, err := a.StartMachine(ctx, ref(m.ID)); err != nil {
			t.Fatal(err)
		}
	}
	before := len(events(t, a, m.ID))
	cycle()
	per := len(events(t, a, m.ID)) - before
	if per <= 0 {
		t.Fatalf("a stop and a start added %d events", per)
	}
	emitted := before + per
	for emitted <= maxEvents+2*per {
		cycle()
		emitted += per
	}
	evs := events(t, a, m.ID)
	if len(evs) != maxEvents {
		t.Fatalf("%d events kept of %d, want %d", len(evs), emitted, maxEvents)
	}
	// Newest first, and the newest is the last start.
	if evs[0].Type != api.EventStart || evs[0].Status != "started" {
		t.Errorf("newest event %s/%s, want start/started", evs[0].Type, evs[0].Status)
	}
	for i := 1; i < len(evs); i++ {
		if evs[i].ID >= evs[i-1].ID {
			t.Fatalf("events out of order at %d: %s after %s", i, evs[i].ID, evs[i-1].ID)
		}
	}
	abandon(a)

	// The store holds no more than the cap.
	db, err := bolt.Open(filepath.Join(dir, "agent.db"), 0o600, &bolt.Options{Timeout: time.Second, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	stored := 0
	db.View(func(tx *bolt.Tx) error {
		if eb := tx.Bucket(bucketEvents).Bucket([]byte(m.ID)); eb != nil {
			stored = eb.Stats().KeyN
		}
		return nil
	})
	db.Close()
	if stored != maxEvents {
		t.Errorf("the store holds %d events of the machine, want %d", stored, maxEvents)
	}

	b := agentOn(t, dir)
	again := events(t, b, m.ID)
	if len(again) != len(evs) {
		t.Fatalf("%d events after restart, want %d", len(again), len(evs))
	}
	for i := range evs {
		if again[i].ID != evs[i].ID {
			t.Fatalf("event %d after restart is %s, want %s", i, again[i].ID, evs[i].ID)
		}
	}
}

// TestReadersNeverWaitForOperations: while a stop waits out a workload that
// ignores SIGTERM (a minute's timeout), get, list, wait, events and the
// lease answer at once, showing the machine stopping. A reader that waited
// for the stop would answer only after its minute, so half of it is the
// bound, however slow the machine.
func TestReadersNeverWaitForOperations(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	m := createStubborn(t, a)
	pid := pidOf(t, a, m.ID)
	const stopTimeout = time.Minute
	stopped := make(chan error, 1)
	go func() {
		stopped <- a.StopMachine(ctx, ref(m.ID), api.StopMachineInput{Signal: "SIGTERM", Timeout: &api.Duration{Duration: stopTimeout}})
	}()
	t.Cleanup(func() {
		syscall.Kill(pid, syscall.SIGKILL)
		<-stopped
	})
	waitFor(t, "the stop in flight", func() bool { return a.lookup(m.ID).rec.Load().State == machine.Stopping })

	readers := []struct {
		name string
		read func() (string, error)
	}{
		{"get", func() (string, error) {
			got, err := a.GetMachine(ctx, ref(m.ID))
			if err != nil {
				return "", err
			}
			return got.State, nil
		}},
		{"list", func() (string, error) {
			ms, err := a.ListMachines(ctx, app, api.ListMachinesOptions{})
			if err != nil || len(ms) != 1 {
				return "", err
			}
			return ms[0].State, nil
		}},
		{"wait", func() (string, error) {
			got, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"stopping"}, Timeout: time.Second})
			if err != nil {
				return "", err
			}
			return got.State, nil
		}},
		{"events", func() (string, error) {
			evs, err := a.MachineEvents(ctx, ref(m.ID))
			if err != nil || len(evs) == 0 {
				return "", err
			}
			return evs[0].Status, nil
		}},
		{"lease", func() (string, error) {
			_, err := a.MachineLease(ctx, ref(m.ID))
			if errors.Is(err, api.ErrNotFound) {
				return "stopping", nil // no lease, answered
			}
			return "", err
		}},
	}
	for _, r := range readers {
		start := time.Now()
		state, err := r.read()
		took := time.Since(start)
		if err != nil || state != "stopping" {
			t.Errorf("%s while stopping: %q %v, want stopping", r.name, state, err)
		}
		if took > stopTimeout/2 {
			t.Errorf("%s took %s: it waited for the stop", r.name, took)
		}
		t.Logf("%s answered in %s", r.name, took)
	}
	select {
	case err := <-stopped:
		t.Fatalf("the stop ended while the workload ignored SIGTERM: %v", err)
	default:
	}
}
