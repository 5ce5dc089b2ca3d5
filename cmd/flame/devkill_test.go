package main

import (
	"context"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/flamehq/flame/api"
)

// rulesFrom lists the IPv6 policy rules that take what comes in on one of
// bridges.
func rulesFrom(t *testing.T, bridges []string) []string {
	t.Helper()
	rules, err := netlink.RuleList(netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, r := range rules {
		for _, br := range bridges {
			if r.IifName == br {
				out = append(out, r.String())
			}
		}
	}
	return out
}

// TestDevKilledSwept SIGKILLs a `flame dev` with the sandbox driver and a
// machine on each of its hosts: its machines, mounts, cgroups, bridges,
// mesh rules and temporary data dir stay behind. The next `flame dev` to
// start removes them all, and leaves another `flame dev` running beside
// them whole.
func TestDevKilledSwept(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	ctx := context.Background()
	start := func(name string) *sideDev {
		d := &sideDev{name: name, hosts: 2}
		d.p = startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0",
			"--driver", "sandbox", "--regions", "ams,syd", "--hosts-per-region", "1", "--no-demo")
		d.devBanner = readBanner(t, d.p)
		if d.instance == "" || d.stateDir == "" {
			t.Fatalf("%s printed no instance or state dir: %+v", d.name, d.devBanner)
		}
		return d
	}
	withMachines := func(d *sideDev) {
		c := api.NewClient(d.url, d.token)
		if _, err := c.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil {
			t.Fatal(err)
		}
		for _, region := range []string{"ams", "syd"} {
			m, err := c.Create(ctx, "demo", api.LaunchMachineInput{Region: region, Config: &api.MachineConfig{Image: "flame/demo-app"}})
			if err != nil {
				t.Fatalf("%s: create in %s: %v", d.name, region, err)
			}
			t.Cleanup(func() { killWorkloads(m.ID) })
			d.machines = append(d.machines, m)
		}
		for _, m := range d.machines {
			serves(t, d.name, m)
		}
	}
	killed, live := start("the killed dev"), start("the live dev")
	withMachines(killed)
	withMachines(live)
	if rules := rulesFrom(t, killed.bridges()); len(rules) != killed.hosts {
		t.Fatalf("%s's mesh rules: %v, want one per host", killed.name, rules)
	}

	// SIGKILL to flame alone (not its process group): what it started
	// lives on, as after a crash.
	if err := syscall.Kill(killed.p.cmd.Process.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-killed.p.done:
	case <-time.After(exitTimeout):
		t.Fatalf("%s did not exit on SIGKILL", killed.name)
	}
	killed.present(t)
	if _, err := os.Stat(killed.stateDir); err != nil {
		t.Errorf("%s's data dir after the kill: %v", killed.name, err)
	}
	for _, m := range killed.machines {
		if workloads(m.ID) == 0 {
			t.Errorf("%s's machine %s did not outlive it", killed.name, m.ID)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	// The next dev to start sweeps.
	next := start("the next dev")
	killed.gone(t)
	if rules := rulesFrom(t, killed.bridges()); len(rules) != 0 {
		t.Errorf("%s's mesh rules after the next start: %v", killed.name, rules)
	}
	live.present(t)
	for _, m := range live.machines {
		serves(t, live.name, m)
	}
	if rules := rulesFrom(t, live.bridges()); len(rules) != live.hosts {
		t.Errorf("%s's mesh rules: %v, want one per host", live.name, rules)
	}

	interrupt(t, next.p)
	interrupt(t, live.p)
	live.gone(t)
}
