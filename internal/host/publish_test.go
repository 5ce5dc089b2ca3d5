package host

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/agent"
	"github.com/flamehq/flame/internal/check"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/netsim"
)

// newClusterHost runs a host with the exec driver whose cluster member
// talks over an in-memory network, with an observer member beside it.
func newClusterHost(t *testing.T) (*Host, *cluster.Cluster) {
	t.Helper()
	nw := netsim.New(netsim.Config{Seed: 1})
	t.Cleanup(func() { nw.Close() })
	member := func(name string) *netsim.Transport {
		if _, err := nw.AddHost(name); err != nil {
			t.Fatal(err)
		}
		tr, err := nw.Transport(name, 7946)
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(Config{DataDir: t.TempDir(), Region: "ams", Listener: ln, Token: "t", Driver: exec.New(exec.Config{}, nil),
		Cluster: cluster.Config{HostID: "ams-1", Transport: member("ams-1")}})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.StopMachines(context.Background())
		h.Close()
	})
	obs, err := cluster.New(cluster.Config{HostID: "observer", Region: "ams", Transport: member("observer")})
	if err != nil {
		t.Fatal(err)
	}
	if err := obs.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { obs.Close() })
	if _, err := obs.Join([]string{h.Cluster.GossipAddr()}); err != nil {
		t.Fatal(err)
	}
	return h, obs
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHostPublishesAroundABadRecord: a machine whose record the cluster
// refuses (here an app name no API would accept, created on the agent
// directly) does not stop the host from publishing its other machines, and
// is reported once, as an event on the machine.
func TestHostPublishesAroundABadRecord(t *testing.T) {
	h, obs := newClusterHost(t)
	ctx := context.Background()
	bad, err := h.Agent.CreateMachine(ctx, "Bad.App", api.LaunchMachineInput{Config: sleeper})
	if err != nil {
		t.Fatal(err)
	}
	good, err := h.Agent.CreateMachine(ctx, "web", api.LaunchMachineInput{Config: sleeper})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the good machine on the observer", func() bool {
		m := obs.Snapshot().Machine(good.ID)
		return m != nil && m.State == api.StateStarted
	})
	if obs.Snapshot().Machine(bad.ID) != nil || h.Cluster.Snapshot().Machine(bad.ID) != nil {
		t.Fatal("the bad machine was published")
	}
	rejected := func() []*api.MachineEvent {
		evs, err := h.Agent.MachineEvents(ctx, refOf("Bad.App", bad.ID))
		if err != nil {
			t.Fatal(err)
		}
		var out []*api.MachineEvent
		for _, ev := range evs {
			if ev.Type == api.EventPublish {
				out = append(out, ev)
			}
		}
		return out
	}
	eventually(t, "the bad machine's publish event", func() bool { return len(rejected()) > 0 })
	ev := rejected()[0]
	if ev.Status != "rejected" || ev.Request == nil || !strings.Contains(ev.Request.Message, "Bad.App") {
		t.Fatalf("event %+v does not say why", ev)
	}

	// Later changes still flow, and the bad machine is reported once only.
	third, err := h.Agent.CreateMachine(ctx, "web", api.LaunchMachineInput{Config: sleeper})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the third machine on the observer", func() bool { return obs.Snapshot().Machine(third.ID) != nil })
	if n := len(rejected()); n != 1 {
		t.Errorf("the bad machine was reported %d times", n)
	}
}

func refOf(app, id string) api.MachineRef { return api.MachineRef{App: app, ID: id} }

// TestConfigAtTheLimitsPublishes: a config at every limit the API enforces
// becomes a record the cluster accepts, and each step past a limit is one
// the API refuses: the API and the cluster keep one set of limits.
func TestConfigAtTheLimitsPublishes(t *testing.T) {
	nw := netsim.New(netsim.Config{Seed: 1})
	t.Cleanup(func() { nw.Close() })
	if _, err := nw.AddHost("h"); err != nil {
		t.Fatal(err)
	}
	tr, err := nw.Transport("h", 7946)
	if err != nil {
		t.Fatal(err)
	}
	c, err := cluster.New(cluster.Config{HostID: "h", Region: "ams", Transport: tr})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	full := func() *api.MachineConfig {
		cfg := &api.MachineConfig{Image: "registry.example:5000/team/app:v1", Metadata: map[string]string{
			api.MetadataProcessGroup: "g" + strings.Repeat("x", api.MaxNameLen-1),
		}}
		var handlers []string
		for range api.MaxHandlersPerPort {
			handlers = append(handlers, "http")
		}
		for i := range api.MaxServices {
			s := api.MachineService{Protocol: "tcp", InternalPort: 8000 + i,
				Concurrency: &api.MachineServiceConcurrency{Type: "requests", SoftLimit: api.MaxConcurrencyLimit, HardLimit: api.MaxConcurrencyLimit}}
			for j := range api.MaxPortsPerService {
				s.Ports = append(s.Ports, api.MachinePort{Port: ptr(10000 + 100*i + j), Handlers: handlers})
			}
			s.Checks = []api.MachineServiceCheck{{Type: ptr("tcp")}}
			cfg.Services = append(cfg.Services, s)
		}
		cfg.Checks = map[string]api.MachineCheck{}
		for i := range api.MaxChecks - api.MaxServices {
			name := strings.Repeat("c", api.MaxNameLen-3) + ".:" + string(rune('a'+i))
			cfg.Checks[name] = api.MachineCheck{Type: ptr("tcp"), Port: ptr(8000)}
		}
		return cfg
	}
	cfg := full()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("the config at the limits is refused: %v", err)
	}
	m := &api.Machine{ID: api.NewMachineID(), Region: "ams", State: api.StateStarted, InstanceID: "01JABCDEFGHJKMNPQRSTVWXYZ0",
		PrivateIP: "fdaa::2", Config: cfg}
	specs, err := check.Specs(cfg)
	if err != nil || len(specs) != api.MaxChecks {
		t.Fatalf("check specs: %d, %v", len(specs), err)
	}
	for _, s := range specs {
		m.Checks = append(m.Checks, &api.CheckStatus{Name: s.Name, Status: api.CheckPassing, Output: strings.Repeat("é", 300)})
	}
	// A count of requests in flight past every limit says the most a
	// record may; counts for other hosts' machines are not published.
	load := map[string]int{m.ID: cluster.MaxLoad + 100, "other": 3}
	facts := hostFacts([]agent.AppMachine{{App: "web", Org: "personal", Machine: m}}, agent.Capacity{}, cluster.Resources{CPUs: 1, MemoryMB: 256}, load, nil)
	if err := c.Publish(facts); err != nil {
		t.Fatalf("the cluster refuses what the API accepts: %v", err)
	}
	if len(facts.Machines) != 1 || facts.Machines[0].Load != cluster.MaxLoad {
		t.Fatalf("published %+v, want one machine with load %d", facts.Machines, cluster.MaxLoad)
	}

	over := map[string]func(*api.MachineConfig){
		"services": func(c *api.MachineConfig) { c.Services = append(c.Services, c.Services[0]) },
		"ports":    func(c *api.MachineConfig) { c.Services[0].Ports = append(c.Services[0].Ports, c.Services[0].Ports[0]) },
		"handlers": func(c *api.MachineConfig) {
			c.Services[0].Ports[0].Handlers = append(c.Services[0].Ports[0].Handlers, "tls")
		},
		"checks":        func(c *api.MachineConfig) { c.Checks["one-more"] = api.MachineCheck{Type: ptr("tcp"), Port: ptr(1)} },
		"soft_limit":    func(c *api.MachineConfig) { c.Services[0].Concurrency.SoftLimit++ },
		"hard_limit":    func(c *api.MachineConfig) { c.Services[0].Concurrency.HardLimit++ },
		"process group": func(c *api.MachineConfig) { c.Metadata[api.MetadataProcessGroup] += "x" },
		"group dot":     func(c *api.MachineConfig) { c.Metadata[api.MetadataProcessGroup] = "x.y" },
		"check name":    func(c *api.MachineConfig) { c.Checks["bad name"] = api.MachineCheck{Type: ptr("tcp"), Port: ptr(1)} },
	}
	for name, edit := range over {
		cfg := full()
		edit(cfg)
		if err := cfg.Validate(); err == nil {
			t.Errorf("one past the %s limit is accepted", name)
		}
	}
}

// TestPublishedAutoscaleSettings: a service's autostart (Fly's default on,
// off by either spelling), autostop and min_machines_running, the
// machine's primary region (a PRIMARY_REGION no record may carry is left
// out) and autostop's draining reach the machine's record.
func TestPublishedAutoscaleSettings(t *testing.T) {
	suspend, off := api.Autostop(api.AutostopSuspend), api.Autostop(api.AutostopOff)
	tests := []struct {
		name      string
		edit      func(*api.MachineConfig)
		draining  bool
		autostart bool
		autostop  string
		min       int
		primary   string
	}{
		{"defaults", func(*api.MachineConfig) {}, false, true, "", 0, ""},
		{"autostart false", func(c *api.MachineConfig) { c.Services[0].Autostart = ptr(false) }, false, false, "", 0, ""},
		{"disable_machine_autostart", func(c *api.MachineConfig) { c.DisableMachineAutostart = ptr(true) }, false, false, "", 0, ""},
		{"autostart wins over the old spelling", func(c *api.MachineConfig) {
			c.DisableMachineAutostart, c.Services[0].Autostart = ptr(true), ptr(true)
		}, false, true, "", 0, ""},
		{"suspend, min 2", func(c *api.MachineConfig) {
			c.Services[0].Autostop, c.Services[0].MinMachinesRunning = &suspend, ptr(2)
		}, false, true, api.AutostopSuspend, 2, ""},
		{"off", func(c *api.MachineConfig) { c.Services[0].Autostop = &off }, false, true, "", 0, ""},
		{"primary region", func(c *api.MachineConfig) { c.Env = map[string]string{"PRIMARY_REGION": "fra"} }, false, true, "", 0, "fra"},
		{"primary region is its own", func(c *api.MachineConfig) { c.Env = map[string]string{"PRIMARY_REGION": "ams"} }, false, true, "", 0, ""},
		{"primary region unusable", func(c *api.MachineConfig) { c.Env = map[string]string{"PRIMARY_REGION": "Fra Nce"} }, false, true, "", 0, ""},
		{"draining", func(*api.MachineConfig) {}, true, true, "", 0, ""},
	}
	for _, tt := range tests {
		cfg := &api.MachineConfig{Image: "demo", Services: []api.MachineService{{Protocol: "tcp", InternalPort: 8080,
			Ports: []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}}}}}
		tt.edit(cfg)
		m := &api.Machine{ID: api.NewMachineID(), Region: "ams", State: api.StateStarted, Config: cfg}
		facts := hostFacts([]agent.AppMachine{{App: "web", Org: "personal", Machine: m}}, agent.Capacity{},
			cluster.Resources{CPUs: 1, MemoryMB: 256}, nil, map[string]bool{m.ID: tt.draining})
		got := facts.Machines[0]
		s := got.Services[0]
		if s.Autostart != tt.autostart || s.Autostop != tt.autostop || s.MinMachinesRunning != tt.min ||
			got.PrimaryRegion != tt.primary || got.Draining != tt.draining || got.Cordoned != tt.draining {
			t.Errorf("%s: published %+v", tt.name, got)
		}
	}
}
