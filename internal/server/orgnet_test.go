package server_test

import (
	"context"
	"testing"

	"github.com/flamehq/flame/api"
)

// TestOrgNetworks: each org's machines reach their hosts with the org's
// number in the private network, the same on every host and for every
// machine of the org, and different orgs have different numbers.
func TestOrgNetworks(t *testing.T) {
	d := startDev(t, devOptions{})
	ctx := context.Background()
	nets := map[string]map[uint16]bool{}
	for _, org := range []string{"acme", "other"} {
		cl, _ := orgWithApp(t, d, org, org+"-web")
		nets[org] = map[uint16]bool{}
		for _, region := range []string{"ams", "iad"} {
			m, err := cl.CreateMachine(ctx, org+"-web", api.LaunchMachineInput{Region: region, Config: demoConfig()})
			if err != nil {
				t.Fatal(err)
			}
			nets[org][uint16(d.spec(t, m.ID).Org)] = true
		}
	}
	if len(nets["acme"]) != 1 || len(nets["other"]) != 1 {
		t.Fatalf("org numbers per org: %v, want one each", nets)
	}
	for n := range nets["acme"] {
		if n == 0 || nets["other"][n] {
			t.Errorf("acme's number %d: zero or other's too (%v)", n, nets)
		}
	}
	// A public create may not choose its org's number.
	cl, _ := orgWithApp(t, d, "sneaky", "sneaky-web")
	if _, err := cl.CreateMachine(ctx, "sneaky-web", api.LaunchMachineInput{Config: demoConfig(), OrgNetwork: 1}); status(err) != 422 {
		t.Errorf("create with org_network: %v, want 422", err)
	}
}
