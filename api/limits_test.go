package api

import (
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/flamehq/flame/internal/machine"
)

// TestStatesAreTheLifecycles: the API's state names are exactly the
// lifecycle's list, in its order.
func TestStatesAreTheLifecycles(t *testing.T) {
	api := []string{StateCreating, StateCreated, StateStarting, StateStarted, StateStopping, StateStopped,
		StateRestarting, StateSuspending, StateSuspended, StateUpdating, StateReplacing, StateReplaced,
		StateDestroying, StateDestroyed, StateFailed, StateLaunchFailed}
	states := machine.States()
	if len(states) != len(api) {
		t.Fatalf("the lifecycle has %d states, the API %d", len(states), len(api))
	}
	for i, s := range states {
		if api[i] != string(s) {
			t.Errorf("state %d: api %q, lifecycle %q", i, api[i], s)
		}
	}
}

func TestMachineIDs(t *testing.T) {
	seen := map[string]bool{}
	for range 1000 {
		id := NewMachineID()
		if !ValidMachineID(id) || seen[id] {
			t.Fatalf("minted %q (valid %v, seen %v)", id, ValidMachineID(id), seen[id])
		}
		seen[id] = true
	}
	for _, bad := range []string{"", "0123456789abc", "0123456789abcde", "0123456789ABCD", "0123456789abcg", "../../../etc/x"} {
		if ValidMachineID(bad) {
			t.Errorf("ValidMachineID(%q) = true", bad)
		}
	}
}

func TestSizeDefaults(t *testing.T) {
	for _, tc := range []struct {
		cfg       *MachineConfig
		cpus, mem int
	}{
		{nil, DefaultGuestCPUs, DefaultGuestMemoryMB},
		{&MachineConfig{}, DefaultGuestCPUs, DefaultGuestMemoryMB},
		{&MachineConfig{Guest: &MachineGuest{CPUs: 2}}, 2, DefaultGuestMemoryMB},
		{&MachineConfig{Guest: &MachineGuest{MemoryMB: 1024}}, DefaultGuestCPUs, 1024},
	} {
		if c, m := tc.cfg.Size(); c != tc.cpus || m != tc.mem {
			t.Errorf("Size(%+v) = %d, %d; want %d, %d", tc.cfg, c, m, tc.cpus, tc.mem)
		}
	}
}

var (
	goodImageRefs = []string{
		"nginx", "nginx:1.25", "library/nginx", "flame/demo-app", "registry.example:5000/team/app:v1",
		"localhost:5000/x", "127.0.0.1:5000/a/b:c", "ghcr.io/o/r@sha256:" + strings.Repeat("ab", 32),
		"ghcr.io/o/r:v1@sha256:" + strings.Repeat("0", 64), "a__b/c-d.e_f:V_1.2-3", "Registry.Example/x",
	}
	badImageRefs = []string{
		"UPPER::bad@@ref", "Nginx", "nginx:", "nginx@sha256:zz", "a//b", "-a", "a b", "/x", "x/",
		"nginx:" + strings.Repeat("t", 129), "a..b", "exec:rel/path", "exec:",
	}
)

func TestCheckImageRef(t *testing.T) {
	for _, ref := range append(goodImageRefs, "exec:/bin/sh") {
		if err := CheckImageRef(ref); err != nil {
			t.Errorf("CheckImageRef(%q) = %v", ref, err)
		}
	}
	for _, ref := range append(badImageRefs, "", "  ", strings.Repeat("a", MaxImageRefLen+1)) {
		err := CheckImageRef(ref)
		if err == nil || !strings.Contains(err.Error(), "config.image") || err.(*Error).Status != 422 {
			t.Errorf("CheckImageRef(%q) = %v, want 422 naming config.image", ref, err)
		}
	}
}

func TestValidateLimits(t *testing.T) {
	base := func() *MachineConfig { return &MachineConfig{Image: "flame/demo-app"} }
	tests := []struct {
		name  string
		edit  func(c *MachineConfig)
		field string
	}{
		{"env at the limit", func(c *MachineConfig) {
			c.Env = map[string]string{"V": strings.Repeat("x", MaxEnvVarBytes-3)}
		}, ""},
		{"env var over", func(c *MachineConfig) {
			c.Env = map[string]string{"V": strings.Repeat("x", MaxEnvVarBytes-2)}
		}, "config.env.V"},
		{"env nul", func(c *MachineConfig) { c.Env = map[string]string{"V": "a\x00b"} }, "config.env.V"},
		{"env name", func(c *MachineConfig) { c.Env = map[string]string{"A=B": "x"} }, "config.env"},
		{"env total over processes", func(c *MachineConfig) {
			c.Env = map[string]string{"A": strings.Repeat("x", 60<<10)}
			for i := range MaxEnvBytes / (60 << 10) {
				c.Processes = append(c.Processes, MachineProcess{Env: map[string]string{"B": strings.Repeat("y", 60<<10+i)}})
			}
		}, "config.env"},
		{"process env name", func(c *MachineConfig) {
			c.Processes = []MachineProcess{{Env: map[string]string{"": "x"}}}
		}, "config.processes[0].env"},
		{"metadata at the limit", func(c *MachineConfig) {
			c.Metadata = map[string]string{strings.Repeat("k", MaxMetadataKeyLen): strings.Repeat("v", MaxMetadataValueLen)}
		}, ""},
		{"metadata value", func(c *MachineConfig) {
			c.Metadata = map[string]string{"k": strings.Repeat("v", MaxMetadataValueLen+1)}
		}, "config.metadata.k"},
		{"metadata key charset", func(c *MachineConfig) { c.Metadata = map[string]string{"a/b": "v"} }, "config.metadata"},
		{"process group", func(c *MachineConfig) {
			c.Metadata = map[string]string{MetadataProcessGroup: "x.y"}
		}, "config.metadata.fly_process_group"},
		{"stop timeout at the limit", func(c *MachineConfig) { c.StopConfig = &StopConfig{Timeout: Dur(MaxStopTimeout)} }, ""},
		{"stop timeout", func(c *MachineConfig) {
			c.StopConfig = &StopConfig{Timeout: Dur(MaxStopTimeout + time.Second)}
		}, "config.stop_config.timeout"},
		{"check name", func(c *MachineConfig) {
			c.Checks = map[string]MachineCheck{"a b": {Port: new(8080)}}
		}, "config.checks"},
		{"too many checks", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80}}
			for range MaxChecks {
				c.Services[0].Checks = append(c.Services[0].Checks, MachineServiceCheck{})
			}
			c.Checks = map[string]MachineCheck{"one": {Port: new(8080)}}
		}, "config.checks"},
		{"ports", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80}}
			for range MaxPortsPerService + 1 {
				c.Services[0].Ports = append(c.Services[0].Ports, MachinePort{Port: new(80)})
			}
		}, "config.services[0].ports"},
		{"handlers", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, Ports: []MachinePort{{Port: new(80),
				Handlers: strings.Split(strings.Repeat("http,", MaxHandlersPerPort)+"tls", ",")}}}}
		}, "config.services[0].ports[0].handlers"},
		{"soft limit", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80,
				Concurrency: &MachineServiceConcurrency{SoftLimit: MaxConcurrencyLimit + 1}}}
		}, "config.services[0].concurrency.soft_limit"},
		{"min machines running at the limit", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, MinMachinesRunning: new(MaxMinMachinesRunning)}}
		}, ""},
		{"min machines running", func(c *MachineConfig) {
			c.Services = []MachineService{{Protocol: "tcp", InternalPort: 80, MinMachinesRunning: new(MaxMinMachinesRunning + 1)}}
		}, "config.services[0].min_machines_running"},
	}
	for _, tt := range tests {
		c := base()
		tt.edit(c)
		err := c.Validate()
		switch {
		case tt.field == "" && err != nil:
			t.Errorf("%s: %v", tt.name, err)
		case tt.field != "" && (err == nil || !strings.HasPrefix(err.Error(), tt.field+" ") || err.(*Error).Status != 422):
			t.Errorf("%s: %v, want 422 naming %s", tt.name, err, tt.field)
		}
	}
}

func TestCallLimits(t *testing.T) {
	if CheckLeaseTTL("ttl", MaxLeaseTTL) != nil || CheckLeaseTTL("ttl", 0) != nil {
		t.Error("a lease ttl within the limit is refused")
	}
	for _, n := range []int{-1, MaxLeaseTTL + 1} {
		if err := CheckLeaseTTL("ttl", n); err == nil || !strings.HasPrefix(err.Error(), "ttl ") {
			t.Errorf("ttl %d: %v", n, err)
		}
	}
	if err := CheckStopTimeout("timeout", 100000*time.Hour); err == nil || !strings.HasPrefix(err.Error(), "timeout ") {
		t.Errorf("stop timeout 100000h: %v", err)
	}
}

func TestClip(t *testing.T) {
	tests := []struct {
		in   string
		max  int
		want string
	}{
		{"short", 10, "short"},
		{"exactly10!", 10, "exactly10!"},
		{"a longer text", 10, "a longe…"},
		{"abcdéfgh", 8, "abcd…"},       // "é" is not cut in half
		{"bad\xffbyte", 64, "badbyte"}, // invalid bytes dropped
		{"abcdef", 2, ""},              // no room even for the ellipsis
	}
	for _, tt := range tests {
		got := Clip(tt.in, tt.max)
		if got != tt.want || len(got) > tt.max || !utf8.ValidString(got) {
			t.Errorf("Clip(%q, %d) = %q, want %q", tt.in, tt.max, got, tt.want)
		}
	}
}
