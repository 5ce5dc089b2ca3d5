package agent

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver/fake"
)

// TestCapacityNeverOvercommitted: many concurrent creates on a host with room
// for a few are admitted exactly up to its capacity; the rest are refused
// with 503 and leave nothing behind; a stopped machine gives its share back.
func TestCapacityNeverOvercommitted(t *testing.T) {
	d := fake.New()
	a, err := New(Config{DataDir: t.TempDir(), Region: "ams", Driver: d, Logger: testLogger(t), Capacity: Capacity{CPUs: 4, MemoryMB: 4096}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	cfg := &api.MachineConfig{Image: "demo", Guest: &api.MachineGuest{CPUs: 1, MemoryMB: 512}}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var ok, refused int
	var ids []string
	for range 40 {
		wg.Go(func() {
			m, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: cfg})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok++
				ids = append(ids, m.ID)
			case errors.Is(err, api.ErrUnavailable):
				refused++
			default:
				t.Errorf("create: %v", err)
			}
		})
	}
	wg.Wait()
	if ok != 4 || refused != 36 {
		t.Fatalf("admitted %d, refused %d; want 4 and 36", ok, refused)
	}
	if u := a.Used(); u != (Capacity{CPUs: 4, MemoryMB: 2048}) {
		t.Fatalf("used %+v", u)
	}
	if n := len(a.AllMachines()); n != 4 {
		t.Fatalf("%d machines recorded, want 4", n)
	}
	// A skip_launch create takes nothing; starting it must wait for room.
	idle, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: cfg, SkipLaunch: true})
	if err != nil {
		t.Fatalf("skip_launch create on a full host: %v", err)
	}
	if _, err := a.StartMachine(context.Background(), ref(idle.ID)); !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("start on a full host: %v, want 503", err)
	}
	if err := a.StopMachine(context.Background(), ref(ids[0]), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.StartMachine(context.Background(), ref(idle.ID)); err != nil {
		t.Fatalf("start after a stop freed room: %v", err)
	}
	// Growing a started machine beyond what is left is refused too.
	big := *cfg
	big.Guest = &api.MachineGuest{CPUs: 2, MemoryMB: 512}
	if _, err := a.UpdateMachine(context.Background(), ref(ids[1]), api.LaunchMachineInput{Config: &big}); !errors.Is(err, api.ErrUnavailable) {
		t.Fatalf("update beyond capacity: %v, want 503", err)
	}
}

// TestControlPlaneFields: the id, org and secrets a control plane passes are
// kept; secrets reach the workload's environment and never a view.
func TestControlPlaneFields(t *testing.T) {
	a := newAgent(t, "", nil)
	in := api.LaunchMachineInput{
		Config: shConfig(`echo "db=$DATABASE_URL"; sleep 60`),
		ID:     "0123456789abcd", Org: "acme",
		Secrets: map[string]string{"DATABASE_URL": "postgres://s3cret"},
	}
	m, err := a.CreateMachine(context.Background(), app, in)
	if err != nil {
		t.Fatal(err)
	}
	if m.ID != in.ID {
		t.Fatalf("id %s, want %s", m.ID, in.ID)
	}
	if _, err := a.CreateMachine(context.Background(), app, in); !errors.Is(err, api.ErrConflict) {
		t.Fatalf("second create with the same id: %v, want 409", err)
	}
	in.ID = "NOT-HEX"
	if _, err := a.CreateMachine(context.Background(), app, in); err == nil {
		t.Fatal("a malformed id was accepted")
	}
	waitFor(t, "the secret in the log", func() bool {
		return strings.Contains(strings.Join(logLines(t, a, m.ID), "\n"), "db=postgres://s3cret")
	})
	if ams := a.AllMachines(); len(ams) != 1 || ams[0].Org != "acme" {
		t.Fatalf("org not kept: %+v", ams)
	}
	got, err := a.GetMachine(context.Background(), ref(m.ID))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(got)
	if strings.Contains(string(b), "s3cret") {
		t.Fatalf("a secret leaked into the machine's view: %s", b)
	}
}
