package api

import (
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseSignal(t *testing.T) {
	good := map[string]syscall.Signal{"SIGTERM": syscall.SIGTERM, "term": syscall.SIGTERM, "SIGINT": syscall.SIGINT,
		"9": syscall.SIGKILL, " SIGUSR1 ": syscall.SIGUSR1, "hup": syscall.SIGHUP}
	for in, want := range good {
		if got, err := ParseSignal(in); err != nil || got != want {
			t.Errorf("ParseSignal(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "SIGFOO", "0", "32", "-1", "SIG"} {
		if _, err := ParseSignal(in); err == nil {
			t.Errorf("ParseSignal(%q) accepted", in)
		}
	}
}

func TestValidate(t *testing.T) {
	str := func(s string) *string { return &s }
	num := func(n int) *int { return &n }
	base := func() *MachineConfig { return &MachineConfig{Image: "flame/demo-app"} }
	tests := []struct {
		name  string
		edit  func(c *MachineConfig)
		field string // "" = valid
	}{
		{"minimal", func(c *MachineConfig) {}, ""},
		{"full", func(c *MachineConfig) {
			c.Guest = &MachineGuest{CPUKind: "shared", CPUs: 2, MemoryMB: 512}
			c.Restart = &MachineRestart{Policy: "on-failure", MaxRetries: 3}
			c.StopConfig = &StopConfig{Signal: str("SIGTERM"), Timeout: Dur(10 * time.Second)}
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 8080,
				Ports:       []MachinePort{{Port: num(80), Handlers: []string{"http"}}, {StartPort: num(1000), EndPort: num(1010)}},
				Concurrency: &MachineServiceConcurrency{Type: "requests", SoftLimit: 20, HardLimit: 25},
				Checks:      []MachineServiceCheck{{Type: str("http"), Path: str("/health"), Interval: Dur(time.Second)}}}}
			c.Checks = map[string]MachineCheck{"alive": {Type: str("tcp"), Port: num(8080)}}
			c.Mounts = []MachineMount{{Volume: "vol_1", Path: "/data"}}
		}, ""},
		{"no image", func(c *MachineConfig) { c.Image = " " }, "config.image"},
		{"memory not multiple of 256", func(c *MachineConfig) { c.Guest = &MachineGuest{MemoryMB: 300} }, "config.guest.memory_mb"},
		{"negative memory", func(c *MachineConfig) { c.Guest = &MachineGuest{MemoryMB: -256} }, "config.guest.memory_mb"},
		{"cpu kind", func(c *MachineConfig) { c.Guest = &MachineGuest{CPUKind: "turbo"} }, "config.guest.cpu_kind"},
		{"cpus", func(c *MachineConfig) { c.Guest = &MachineGuest{CPUs: 1000} }, "config.guest.cpus"},
		{"restart policy", func(c *MachineConfig) { c.Restart = &MachineRestart{Policy: "sometimes"} }, "config.restart.policy"},
		{"max retries", func(c *MachineConfig) { c.Restart = &MachineRestart{MaxRetries: -1} }, "config.restart.max_retries"},
		{"stop signal", func(c *MachineConfig) { c.StopConfig = &StopConfig{Signal: str("SIGNOPE")} }, "config.stop_config.signal"},
		{"env name", func(c *MachineConfig) { c.Env = map[string]string{"A=B": "x"} }, "config.env"},
		{"mount path", func(c *MachineConfig) { c.Mounts = []MachineMount{{Path: "data"}} }, "config.mounts[0].path"},
		{"service protocol", func(c *MachineConfig) { c.Services = []MachineService{{Protocol: "sctp", InternalPort: 1}} }, "config.services[0].protocol"},
		{"service port", func(c *MachineConfig) { c.Services = []MachineService{{Protocol: "tcp", InternalPort: 70000}} }, "config.services[0].internal_port"},
		{"port range", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, Ports: []MachinePort{{StartPort: num(9), EndPort: num(3)}}}}
		}, "config.services[0].ports[0]"},
		{"handler", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, Ports: []MachinePort{{Port: num(80), Handlers: []string{"ftp"}}}}}
		}, "config.services[0].ports[0].handlers"},
		{"PROXY protocol version", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, Ports: []MachinePort{{Port: num(10000),
				Handlers: []string{"proxy_proto"}, ProxyProtoOptions: &ProxyProtoOptions{Version: "v3"}}}}}
		}, "config.services[0].ports[0].proxy_proto_options.version"},
		{"soft over hard", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, Concurrency: &MachineServiceConcurrency{SoftLimit: 30, HardLimit: 20}}}
		}, "config.services[0].concurrency.soft_limit"},
		{"check type", func(c *MachineConfig) { c.Checks = map[string]MachineCheck{"x": {Type: str("icmp")}} }, "config.checks.x.type"},
		{"check path", func(c *MachineConfig) { c.Checks = map[string]MachineCheck{"x": {Path: str("health")}} }, "config.checks.x.path"},
		// A top-level check named like a service's would gate routing.
		{"check named like a service's", func(c *MachineConfig) {
			c.Checks = map[string]MachineCheck{ServiceCheckPrefix + "00-tcp-80": {Port: num(80)}}
		}, "config.checks"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.edit(c)
			err := c.Validate()
			if tt.field == "" {
				if err != nil {
					t.Fatalf("valid config refused: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrUnprocessable) {
				t.Fatalf("err = %v, want a 422", err)
			}
			if !strings.HasPrefix(err.Error(), tt.field+" ") {
				t.Errorf("error %q does not name %s", err, tt.field)
			}
		})
	}
	var nilCfg *MachineConfig
	if err := nilCfg.Validate(); !errors.Is(err, ErrUnprocessable) {
		t.Errorf("nil config: %v", err)
	}
}
