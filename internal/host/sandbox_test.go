package host

import (
	"context"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
)

// TestSandboxedMachinesSurviveAgentRestart runs a machine with the sandbox
// driver, closes the host (as an agent that stops or dies does: workloads
// keep running), and starts a new host with a new driver on the same data
// dir: the machine is adopted, not restarted, and fully controllable.
func TestSandboxedMachinesSurviveAgentRestart(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	regAddr, _, digest := sleepImage(t)
	dataDir := t.TempDir()
	start := func() (*Host, *api.Client) {
		d, _, err := NewDriver(DriverConfig{Kind: DriverSandbox, DataDir: dataDir, Registry: regAddr, Index: 91})
		if err != nil {
			// As root the sandbox driver must work: a broken one fails.
			t.Fatalf("sandbox driver: %v", err)
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		h, err := New(Config{DataDir: dataDir, Region: "ams", Listener: ln, Token: "t", Driver: d})
		if err != nil {
			t.Fatal(err)
		}
		if err := h.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
		return h, api.NewClient("http://"+h.Addr(), "t")
	}
	ctx := context.Background()
	h1, c := start()
	m, err := c.Create(ctx, "web", api.LaunchMachineInput{Config: &api.MachineConfig{Image: "bench/sleep@" + digest}})
	if err != nil || m.State != api.StateStarted {
		h1.DestroyMachines(ctx)
		h1.Close()
		h1.Teardown()
		t.Fatalf("create: %v %+v", err, m)
	}
	pid := initPid(t, m.ID)
	if err := h1.Close(); err != nil {
		t.Fatal(err)
	}

	h2, c := start()
	t.Cleanup(func() {
		h2.DestroyMachines(context.Background())
		h2.Close()
		h2.Teardown()
	})
	got, err := c.Get(ctx, "web", m.ID)
	if err != nil || got.State != api.StateStarted || got.PrivateIP != m.PrivateIP {
		t.Fatalf("after restart: %v %+v", err, got)
	}
	if p := initPid(t, m.ID); p != pid {
		t.Fatalf("sandbox restarted (init pid %d → %d), want it adopted", pid, p)
	}
	res, err := c.Exec(ctx, "web", m.ID, api.ExecRequest{Command: []string{"/bin/sleep", "0"}})
	if err != nil || res.ExitCode != 0 {
		t.Errorf("exec in the adopted sandbox: %v %+v", err, res)
	}
	if err := c.Stop(ctx, "web", m.ID, api.StopMachineInput{Signal: "SIGTERM", Timeout: api.Dur(time.Second)}); err != nil {
		t.Fatal(err)
	}
	got, _ = c.Get(ctx, "web", m.ID)
	if ex := got.Events[0].Request.ExitEvent; got.State != api.StateStopped || ex == nil || ex.Signal != 15 {
		t.Errorf("stop of the adopted sandbox: state %s, exit %+v (want an exact status through the init)", got.State, ex)
	}
}

// initPid finds the pid of the sandbox init of machine id (the process whose
// environment names the machine and whose parent is not another of its
// processes).
func initPid(t *testing.T, id string) int {
	t.Helper()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		cg, _ := os.ReadFile("/proc/" + e.Name() + "/cgroup")
		if strings.Contains(string(cmd), "sandbox-init") && strings.Contains(string(cg), id) {
			return pid
		}
	}
	t.Fatalf("no sandbox init for machine %s", id)
	return 0
}
