package agent

import (
	"context"
	"testing"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// TestOrgNumbers: the driver gets each machine's org number: the control
// plane's when a create carries one, else this host's own, stable per org
// and different between orgs, across a restart of the agent.
func TestOrgNumbers(t *testing.T) {
	dir := t.TempDir()
	d := fake.New()
	a := newAgent(t, dir, d)
	orgOf := func(org string, given uint16) layout.Org {
		t.Helper()
		m, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{
			Config: &api.MachineConfig{Image: "img"}, Org: org, OrgNetwork: given})
		if err != nil {
			t.Fatal(err)
		}
		p := d.Process(m.ID)
		if p == nil {
			t.Fatalf("machine %s not started", m.ID)
		}
		return p.Spec().Org
	}
	acme, other := orgOf("acme", 0), orgOf("other", 0)
	if acme == 0 || other == 0 || acme == other {
		t.Fatalf("orgs acme and other numbered %d and %d", acme, other)
	}
	if again := orgOf("acme", 0); again != acme {
		t.Errorf("acme numbered %d, then %d", acme, again)
	}
	if got := orgOf("plane", 4242); got != 4242 {
		t.Errorf("the control plane's number 4242 became %d", got)
	}
	a.StopAll(context.Background())
	a.Close()
	d2 := fake.New()
	b := newAgent(t, dir, d2)
	m, err := b.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "img"}, Org: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	if got := d2.Process(m.ID).Spec().Org; got != acme {
		t.Errorf("after a restart acme is %d, was %d", got, acme)
	}
}
