package agent

import (
	"slices"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/check"
)

// machinePorts are the TCP ports the host reaches a machine of cfg on
// (driver.Spec.Ports): its TCP services' internal ports and its health
// checks' ports, sorted, each once. A config whose checks do not parse gives its
// services' ports only (the checks do not run either).
func machinePorts(cfg *api.MachineConfig) []int {
	if cfg == nil {
		return nil
	}
	var ports []int
	for _, s := range cfg.Services {
		if s.Protocol == "udp" {
			continue
		}
		if s.InternalPort > 0 && s.InternalPort <= 65535 {
			ports = append(ports, s.InternalPort)
		}
	}
	if specs, err := check.Specs(cfg); err == nil {
		for _, s := range specs {
			if s.Port > 0 && s.Port <= 65535 {
				ports = append(ports, s.Port)
			}
		}
	}
	slices.Sort(ports)
	return slices.Compact(ports)
}
