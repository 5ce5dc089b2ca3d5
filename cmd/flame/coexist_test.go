package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// sideDev is one of two `flame dev`s run side by side.
type sideDev struct {
	name string
	p    *proc
	devBanner
	hosts    int
	machines []*api.Machine
}

// bridges are the dev's bridges, as its instance names them.
func (d *sideDev) bridges() []string {
	var out []string
	for i := range d.hosts {
		out = append(out, fmt.Sprintf("fl%s-%d", d.instance, i))
	}
	return out
}

// cgroupDirs are the dev's cgroup parents: in the unified hierarchy
// (cgroup v2), else in the memory, cpu and pids hierarchies (v1).
func (d *sideDev) cgroupDirs() []string {
	roots := []string{"/sys/fs/cgroup/memory", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/pids"}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		roots = []string{"/sys/fs/cgroup"}
	}
	var out []string
	for i := range d.hosts {
		for _, root := range roots {
			out = append(out, filepath.Join(root, fmt.Sprintf("flame-%s-%d", d.instance, i)))
		}
	}
	return out
}

// spares returns the pids of the dev's spare inits, by spare cgroup.
func (d *sideDev) spares() map[string]int {
	out := map[string]int{}
	for _, dir := range d.cgroupDirs() {
		es, _ := os.ReadDir(dir)
		for _, e := range es {
			if !e.IsDir() || !strings.HasPrefix(e.Name(), "spare-") {
				continue
			}
			b, _ := os.ReadFile(filepath.Join(dir, e.Name(), "cgroup.procs"))
			if f := strings.Fields(string(b)); len(f) > 0 {
				pid, _ := strconv.Atoi(f[0])
				out[filepath.Join(dir, e.Name())] = pid
			}
		}
	}
	return out
}

// serves checks the dev's machine m answers on its private address.
func serves(t *testing.T, who string, m *api.Machine) {
	t.Helper()
	var resp *http.Response
	var err error
	hc := &http.Client{Timeout: 5 * time.Second}
	for end := time.Now().Add(15 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if resp, err = hc.Get("http://[" + m.PrivateIP + "]:8080/"); err == nil || time.Now().After(end) {
			break
		}
	}
	if err != nil {
		t.Errorf("%s's machine %s at %s: %v", who, m.ID, m.PrivateIP, err)
		return
	}
	defer resp.Body.Close()
	var id map[string]any
	json.NewDecoder(resp.Body).Decode(&id)
	if flyVar(id, "FLY_MACHINE_ID") != m.ID {
		t.Errorf("%s's machine %s answers as %v", who, m.ID, id)
	}
}

// present checks what a dev keeps on the machine while it runs.
func (d *sideDev) present(t *testing.T) {
	t.Helper()
	for _, br := range d.bridges() {
		if _, err := os.Stat("/sys/class/net/" + br); err != nil {
			t.Errorf("%s's bridge %s: %v", d.name, br, err)
		}
	}
	for _, dir := range d.cgroupDirs() {
		if _, err := os.Stat(dir); err != nil {
			t.Errorf("%s's cgroup %s: %v", d.name, dir, err)
		}
	}
}

// gone checks a dev that exited left nothing behind.
func (d *sideDev) gone(t *testing.T) {
	t.Helper()
	for _, m := range d.machines {
		if n := workloads(m.ID); n != 0 {
			t.Errorf("%s left %d processes of machine %s behind", d.name, n, m.ID)
		}
	}
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	if strings.Contains(string(mounts), d.stateDir) {
		t.Errorf("%s left mounts under %s behind", d.name, d.stateDir)
	}
	for _, p := range append(append(d.cgroupDirs(), d.stateDir), prefixed("/sys/class/net/", d.bridges())...) {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s left %s behind", d.name, p)
		}
	}
}

func prefixed(prefix string, names []string) []string {
	out := make([]string, len(names))
	for i, n := range names {
		out[i] = prefix + n
	}
	return out
}

// TestDevSideBySide runs two `flame dev`s with the sandbox driver on this
// machine at once, on ports of their own: each serves its machines from
// its own bridges, cgroups and private network, and each, stopped, leaves
// the other whole — its machines serving, its spare inits alive — and
// nothing of its own behind.
func TestDevSideBySide(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	ctx := context.Background()
	devs := []*sideDev{{name: "dev A"}, {name: "dev B"}}
	for _, d := range devs {
		d.p = startFlame(t, "dev", "--api-addr", "127.0.0.1:0", "--hosts-addr", "127.0.0.1:0", "--dns-addr", "127.0.0.1:0", "--edge-addr", "127.0.0.1:0", "--global-addr", "127.0.0.1:0", "--edge-tls-addr", "127.0.0.1:0",
			"--driver", "sandbox", "--regions", "ams,syd", "--hosts-per-region", "1", "--no-demo")
		d.hosts = 2
	}
	for _, d := range devs {
		d.devBanner = readBanner(t, d.p)
		if d.instance == "" {
			t.Fatalf("%s printed no instance", d.name)
		}
	}
	if devs[0].instance == devs[1].instance {
		t.Fatalf("both devs are instance %s", devs[0].instance)
	}
	for _, d := range devs {
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
	}
	for _, d := range devs {
		for _, m := range d.machines {
			serves(t, d.name, m)
		}
		d.present(t)
	}
	// B's spare inits, one per host, once they are made.
	b := devs[1]
	var spares map[string]int
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if spares = b.spares(); len(spares) >= b.hosts {
			break
		}
		if time.Now().After(end) {
			t.Fatalf("%s has spares %v, want one per host", b.name, spares)
		}
	}

	interrupt(t, devs[0].p)
	devs[0].gone(t)
	b.present(t)
	for cg, pid := range spares {
		if err := syscall.Kill(pid, 0); err != nil {
			t.Errorf("%s's spare init %d (%s) did not survive %s's exit: %v", b.name, pid, cg, devs[0].name, err)
		}
	}
	for _, m := range b.machines {
		serves(t, b.name, m)
	}
	// And B still starts machines (from its spares).
	m, err := api.NewClient(b.url, b.token).Create(ctx, "demo", api.LaunchMachineInput{Region: "syd", Config: &api.MachineConfig{Image: "flame/demo-app"}})
	if err != nil {
		t.Fatalf("%s after %s's exit: %v", b.name, devs[0].name, err)
	}
	t.Cleanup(func() { killWorkloads(m.ID) })
	b.machines = append(b.machines, m)
	serves(t, b.name, m)

	interrupt(t, b.p)
	b.gone(t)
}
