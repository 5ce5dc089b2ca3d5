package cluster

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	lifecycle "github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/netsim"
)

// TestEveryStateRoundTrips: the cluster's records carry every state of the
// lifecycle's one list, through the wire and its validation, and nothing
// else.
func TestEveryStateRoundTrips(t *testing.T) {
	states := lifecycle.States()
	if len(states) != 16 {
		t.Fatalf("the lifecycle lists %d states, want 16", len(states))
	}
	for _, st := range states {
		m := machine("m1", "web", "ams")
		m.State = string(st)
		msg := append(encodeDeltaParts("h1", 0, 1, Resources{}, 0, [][]byte{encodeMachine(&m)}, nil, nil), 0)
		v, err := decodeMessage(msg)
		if err != nil {
			t.Fatalf("state %s: decode: %v", st, err)
		}
		d := v.(*delta)
		if len(d.Upserts) != 1 || d.Upserts[0].State != string(st) {
			t.Fatalf("state %s: decoded %+v", st, d.Upserts)
		}
		if err := validateDelta(d, time.Now(), maxMachines); err != nil {
			t.Errorf("state %s refused: %v", st, err)
		}
	}
	for _, bad := range []string{"", "running", "Started", "launch-failed"} {
		m := machine("m1", "web", "ams")
		m.State = bad
		if err := validateMachine(&m); !errors.Is(err, ErrInvalid) {
			t.Errorf("state %q accepted", bad)
		}
	}
}

// TestMintedIDsAreValid: every id the API mints is one the cluster's records
// accept.
func TestMintedIDsAreValid(t *testing.T) {
	for range 100 {
		id := api.NewMachineID()
		if !api.ValidMachineID(id) || !validMachineID(id) {
			t.Fatalf("minted id %q refused", id)
		}
	}
}

// TestPublishLeavesOutBadRecords: a machine whose record breaks the rules
// (a config the API should have refused, or an older host's) is left out
// and reported; the host's other machines are published and reach the
// other hosts.
func TestPublishLeavesOutBadRecords(t *testing.T) {
	sim := newSim(t, netsim.Config{Seed: 7, Latency: func(string, string) time.Duration { return time.Millisecond }})
	a := sim.add("a", "ams", fastTimings)
	b := sim.add("b", "ams", fastTimings)

	group := machine("bad00001", "evil", "ams")
	group.ProcessGroup = "x.y"
	services := machine("bad00002", "evil", "ams")
	for len(services.Services) <= api.MaxServices {
		services.Services = append(services.Services, services.Services[0])
	}
	limit := machine("bad00003", "evil", "ams")
	limit.Services[0].Concurrency.HardLimit = api.MaxConcurrencyLimit + 1
	good := machines("good", "web", "ams", 3)
	ms := []Machine{good[0], group, good[1], services, limit, good[2]}

	err := a.Publish(HostFacts{Machines: ms})
	var rej *RejectedError
	if !errors.As(err, &rej) || !errors.Is(err, ErrInvalid) {
		t.Fatalf("Publish = %v, want a *RejectedError", err)
	}
	if len(rej.Machines) != 3 || rej.Machines["bad00001"] == nil || rej.Machines["bad00002"] == nil || rej.Machines["bad00003"] == nil {
		t.Fatalf("rejected %v, want the three bad machines", rej.Machines)
	}
	if !strings.Contains(rej.Machines["bad00001"].Error(), "process group") {
		t.Errorf("reason %q does not say what is wrong", rej.Machines["bad00001"])
	}
	waitFor(t, 10*time.Second, "a's good machines on b", func() bool {
		return len(b.Snapshot().AppMachines("web")) == 3
	})
	for _, c := range []*Cluster{a, b} {
		if n := len(c.Snapshot().AppMachines("evil")); n != 0 {
			t.Errorf("%s holds %d of the bad machines", c.cfg.HostID, n)
		}
	}

	// Once the bad ones are gone, publishing is clean again and further
	// changes flow.
	good = append(good, machine("good0003", "web", "ams"))
	if err := a.Publish(HostFacts{Machines: good}); err != nil {
		t.Fatalf("Publish after the bad records left = %v", err)
	}
	waitFor(t, 10*time.Second, "a's fourth machine on b", func() bool {
		return len(b.Snapshot().AppMachines("web")) == 4
	})
}

// TestPublishOverMachineLimit: machines past the host's limit are left out
// and reported; the rest are published.
func TestPublishOverMachineLimit(t *testing.T) {
	sim := newSim(t, netsim.Config{Seed: 8})
	a := sim.add("a", "ams", func(c *Config) { fastTimings(c); c.MaxMachines = 3 })
	err := a.Publish(HostFacts{Machines: machines("m", "web", "ams", 5)})
	var rej *RejectedError
	if !errors.As(err, &rej) || len(rej.Machines) != 2 {
		t.Fatalf("Publish = %v, want two machines left out", err)
	}
	waitFor(t, 10*time.Second, "three machines in a's view", func() bool {
		return len(a.Snapshot().AppMachines("web")) == 3
	})
}

// TestAutoscaleFieldsRoundTrip: a service's autostop, autostart and
// min_machines_running and a machine's primary region cross the wire
// unchanged, and values past their bounds are refused by the decoder or by
// validation.
func TestAutoscaleFieldsRoundTrip(t *testing.T) {
	for _, mode := range []string{"", AutostopOff, AutostopStop, AutostopSuspend} {
		m := machine("m1", "web", "ams")
		m.PrimaryRegion = "fra"
		m.Load = 3
		m.Cordoned, m.Draining = mode != "", mode != ""
		m.Services[0].Autostop = mode
		m.Services[0].Autostart = mode != ""
		m.Services[0].MinMachinesRunning = api.MaxMinMachinesRunning
		msg := encodeFull([]*fullFacts{{Owner: "h1", Version: 1, Machines: []Machine{m}}})
		v, err := decodeMessage(msg)
		if err != nil {
			t.Fatalf("autostop %q: decode: %v", mode, err)
		}
		got := v.([]*fullFacts)[0].Machines[0]
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("autostop %q: decoded\n%+v\nwant\n%+v", mode, got, m)
		}
		if err := validateMachine(&got); err != nil {
			t.Errorf("autostop %q refused: %v", mode, err)
		}
	}
	bad := map[string]func(*Machine){
		"autostop":       func(m *Machine) { m.Services[0].Autostop = "sleep" },
		"min negative":   func(m *Machine) { m.Services[0].MinMachinesRunning = -1 },
		"min over limit": func(m *Machine) { m.Services[0].MinMachinesRunning = api.MaxMinMachinesRunning + 1 },
		"primary region": func(m *Machine) { m.PrimaryRegion = "Ams!" },
	}
	for name, edit := range bad {
		m := machine("m1", "web", "ams")
		edit(&m)
		if err := validateMachine(&m); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s accepted: %v", name, err)
		}
	}
	// The decoder refuses a count past the bound before validation sees it.
	m := machine("m1", "web", "ams")
	m.Services[0].MinMachinesRunning = api.MaxMinMachinesRunning + 1
	if _, err := decodeMessage(encodeFull([]*fullFacts{{Owner: "h1", Version: 1, Machines: []Machine{m}}})); err == nil ||
		!strings.Contains(err.Error(), "min machines running") {
		t.Errorf("decoded a min_machines_running past the bound: %v", err)
	}
	// A record of the previous format is refused, not misread.
	old := encodeFull([]*fullFacts{{Owner: "h1", Version: 1, Machines: []Machine{machine("m1", "web", "ams")}}})
	old[0] = 2
	if _, err := decodeMessage(old); err == nil {
		t.Error("a format 2 record decoded")
	}
}
