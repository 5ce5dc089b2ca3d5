package agent

import (
	"slices"
	"testing"

	"github.com/flamehq/flame/api"
)

func TestMachinePorts(t *testing.T) {
	p := func(n int) *int { return &n }
	cfg := &api.MachineConfig{
		Services: []api.MachineService{
			{Protocol: "tcp", InternalPort: 8080, Checks: []api.MachineServiceCheck{{Type: p2("tcp")}, {Type: p2("http"), Port: p(9090), Path: p2("/health")}}},
			{Protocol: "tcp", InternalPort: 5432},
			{Protocol: "tcp", InternalPort: 8080},
			{Protocol: "udp", InternalPort: 5353},
		},
		Checks: map[string]api.MachineCheck{"metrics": {Type: p2("tcp"), Port: p(9100)}},
	}
	if got, want := machinePorts(cfg), []int{5432, 8080, 9090, 9100}; !slices.Equal(got, want) {
		t.Errorf("machinePorts = %v, want %v", got, want)
	}
	if got := machinePorts(nil); got != nil {
		t.Errorf("machinePorts(nil) = %v", got)
	}
	if got := machinePorts(&api.MachineConfig{}); len(got) != 0 {
		t.Errorf("no services: %v", got)
	}
}

func p2(s string) *string { return &s }
