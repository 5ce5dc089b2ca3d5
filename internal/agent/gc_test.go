package agent

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/machine"
)

// TestExpiredDestroyed: which destroyed records go, oldest first: past the
// retention, past the newest perApp of their app, past the newest perHost.
func TestExpiredDestroyed(t *testing.T) {
	now := time.Date(2026, 1, 2, 0, 0, 0, 0, time.UTC)
	rec := func(id, app string, state machine.State, age time.Duration) *record {
		return &record{ID: id, App: app, State: state, UpdatedAt: now.Add(-age)}
	}
	for _, tt := range []struct {
		name            string
		recs            []*record
		retention       time.Duration
		perApp, perHost int
		want            []string
	}{
		{"none destroyed", []*record{rec("a", "x", machine.Started, 100*time.Hour)}, time.Hour, 1, 1, nil},
		{"past the retention", []*record{
			rec("old", "x", machine.Destroyed, 2*time.Hour), rec("new", "x", machine.Destroyed, time.Minute),
		}, time.Hour, 10, 10, []string{"old"}},
		{"past the app's bound, oldest first", []*record{
			rec("d3", "x", machine.Destroyed, 3*time.Minute), rec("d1", "x", machine.Destroyed, time.Minute),
			rec("d4", "x", machine.Destroyed, 4*time.Minute), rec("d2", "x", machine.Destroyed, 2*time.Minute),
			rec("y1", "y", machine.Destroyed, 10*time.Minute), rec("live", "x", machine.Stopped, time.Hour),
		}, time.Hour, 2, 10, []string{"d4", "d3"}},
		{"past the host's bound", []*record{
			rec("x1", "x", machine.Destroyed, time.Minute), rec("y1", "y", machine.Destroyed, 2*time.Minute),
			rec("z1", "z", machine.Destroyed, 3*time.Minute),
		}, time.Hour, 10, 2, []string{"z1"}},
	} {
		got := expiredDestroyed(tt.recs, now, tt.retention, tt.perApp, tt.perHost)
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: %v, want %v", tt.name, got, tt.want)
		}
	}
}

// TestRefusedCreatesAreBounded: every create refused for its image leaves
// a destroyed record, but no more than the bound stay, in memory and in the
// store, events included; include_deleted lists the newest. An agent
// started on the store applies the bounds before anything reads it, the
// retention included.
func TestRefusedCreatesAreBounded(t *testing.T) {
	const perApp, refusals = 3, 12
	dir := t.TempDir()
	cfg := Config{DataDir: dir, Region: "ams", Driver: newExecDriver(t), Logger: testLogger(t), DestroyedPerApp: perApp}
	a, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	env := map[string]string{"BULK": strings.Repeat("x", 32<<10)}
	var ids []string
	for i := range refusals {
		id := fmt.Sprintf("%014x", i+1)
		ids = append(ids, id)
		_, err := a.CreateMachine(ctx, app, api.LaunchMachineInput{ID: id, Config: &api.MachineConfig{Image: "registry.example/nothing:1", Env: env}})
		if !errors.Is(err, api.ErrUnprocessable) || !strings.Contains(err.Error(), "config.image") {
			t.Fatalf("create %d = %v, want 422 naming config.image", i, err)
		}
	}
	newest := ids[refusals-perApp:]
	listed := func(a *Agent) []string {
		t.Helper()
		ms, err := a.ListMachines(ctx, app, api.ListMachinesOptions{IncludeDeleted: true})
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, m := range ms {
			out = append(out, m.ID)
		}
		slices.Sort(out)
		return out
	}
	if got := listed(a); !slices.Equal(got, newest) {
		t.Errorf("include_deleted lists %v, want the newest %v", got, newest)
	}
	if n := len(a.all()); n != perApp {
		t.Errorf("%d records in memory, want %d", n, perApp)
	}
	a.Close()
	if recs, evs := storedKeys(t, dir); !slices.Equal(recs, newest) || !slices.Equal(evs, newest) {
		t.Errorf("store keeps records %v and events of %v, want %v", recs, evs, newest)
	}

	// A tighter bound at start.
	cfg.DestroyedPerApp = 1
	b, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := listed(b); !slices.Equal(got, ids[refusals-1:]) {
		t.Errorf("after a restart with a bound of 1: %v", got)
	}
	b.Close()

	// Past the retention, nothing stays.
	cfg.Now = func() time.Time { return time.Now().Add(25 * time.Hour) }
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := listed(c); len(got) != 0 {
		t.Errorf("past the retention: %v", got)
	}
	c.Close()
	if recs, evs := storedKeys(t, dir); len(recs)+len(evs) != 0 {
		t.Errorf("past the retention the store keeps records %v and events of %v", recs, evs)
	}
}

// storedKeys returns the machine ids with a record, and those with events,
// in the store of the closed agent in dir.
func storedKeys(t *testing.T, dir string) (recs, evs []string) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(dir, "agent.db"), 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bucketMachines).ForEach(func(k, _ []byte) error { recs = append(recs, string(k)); return nil }); err != nil {
			return err
		}
		return tx.Bucket(bucketEvents).ForEach(func(k, _ []byte) error { evs = append(evs, string(k)); return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(recs)
	slices.Sort(evs)
	return recs, evs
}
