package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/driver/fake"
	"github.com/flamehq/flame/internal/machine"
)

const app = "test-app"

// testLogger routes logs to t.Log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func fastBackoff() machine.Backoff {
	return machine.Backoff{Base: time.Millisecond, Max: 5 * time.Millisecond, Window: time.Minute}
}

// newAgent starts an agent with the exec driver on dir (a new temp dir if
// empty) and closes it, stopping its machines, when the test ends.
func newAgent(t testing.TB, dir string, d driver.Driver) *Agent {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	if d == nil {
		d = newExecDriver(t)
	}
	a, err := New(Config{DataDir: dir, Region: "ams", Driver: d, Logger: testLogger(t), Backoff: fastBackoff(), StopTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		a.StopAll(context.Background())
		a.Close()
	})
	return a
}

func newExecDriver(t testing.TB) *exec.Driver { return exec.New(exec.Config{}, testLogger(t)) }

func shConfig(script string) *api.MachineConfig {
	return &api.MachineConfig{Image: "exec:/bin/sh", Init: api.MachineInit{Cmd: []string{"-c", script}}}
}

func create(t testing.TB, a *Agent, cfg *api.MachineConfig) *api.Machine {
	t.Helper()
	m, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: cfg})
	if err != nil {
		t.Fatalf("create: %v", err)
	}
	return m
}

func ref(id string) api.MachineRef { return api.MachineRef{App: app, ID: id} }

func waitState(t testing.TB, a *Agent, id, state string) *api.Machine {
	t.Helper()
	m, err := a.WaitMachine(context.Background(), ref(id), api.WaitOptions{States: []string{state}, Timeout: 10 * time.Second})
	if err != nil {
		got, _ := a.GetMachine(context.Background(), ref(id))
		t.Fatalf("wait %s: %v (machine: %+v)", state, err, got)
	}
	return m
}

func pidOf(t testing.TB, a *Agent, id string) int {
	t.Helper()
	m := a.lookup(id)
	m.opMu.Lock()
	defer m.opMu.Unlock()
	if m.proc == nil {
		t.Fatalf("machine %s has no workload", id)
	}
	return m.proc.Pid()
}

func alive(pid int) bool { return syscall.Kill(pid, 0) == nil }

func events(t testing.TB, a *Agent, id string) []*api.MachineEvent {
	t.Helper()
	evs, err := a.MachineEvents(context.Background(), ref(id))
	if err != nil {
		t.Fatal(err)
	}
	return evs
}

// eventLine renders events oldest first as "type/status" words.
func eventLine(evs []*api.MachineEvent) string {
	var w []string
	for i := len(evs) - 1; i >= 0; i-- {
		w = append(w, evs[i].Type+"/"+evs[i].Status)
	}
	return strings.Join(w, " ")
}

// waitFor polls cond until it holds or the deadline passes. The deadline
// only bounds a failing test: what is awaited takes milliseconds on an idle
// machine and has taken over 10 s on a 2-core one running several test
// suites at once, so it is far past both.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestCreateStartsWorkloadWithFlyEnv(t *testing.T) {
	a := newAgent(t, "", nil)
	cfg := shConfig(`env > env.txt; exec sleep 60`)
	cfg.Env = map[string]string{"GREETING": "hi", "FLY_REGION": "spoofed"}
	cfg.Guest = &api.MachineGuest{MemoryMB: 512}
	m := create(t, a, cfg)
	if m.State != api.StateStarted {
		t.Fatalf("state = %s, want started", m.State)
	}
	path := filepath.Join(a.machineDir(m.ID), "env.txt")
	var env string
	waitFor(t, "env dump", func() bool {
		b, _ := os.ReadFile(path)
		env = string(b)
		return strings.Contains(env, "PATH=")
	})
	for _, kv := range []string{
		"FLY_APP_NAME=" + app, "FLY_MACHINE_ID=" + m.ID, "FLY_ALLOC_ID=" + m.ID, "FLY_REGION=ams",
		"FLY_MACHINE_VERSION=" + m.InstanceID, "FLY_IMAGE_REF=exec:/bin/sh", "FLY_PROCESS_GROUP=app",
		"FLY_VM_MEMORY_MB=512", "FLY_PRIVATE_IP=127.0.0.1", "PRIMARY_REGION=ams", "GREETING=hi",
	} {
		if !strings.Contains(env, kv+"\n") {
			t.Errorf("workload env lacks %s:\n%s", kv, env)
		}
	}
	if got := eventLine(events(t, a, m.ID)); got != "launch/creating start/started" {
		t.Errorf("events = %s", got)
	}
}

func TestMachineIDsAndVersions(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig("exec sleep 60"))
	if len(m.ID) != 14 || strings.Trim(m.ID, "0123456789abcdef") != "" {
		t.Errorf("id %q is not 14 lowercase hex characters", m.ID)
	}
	if len(m.InstanceID) != 26 {
		t.Errorf("instance id %q is not a ULID", m.InstanceID)
	}
	oldPid := pidOf(t, a, m.ID)
	up, err := a.UpdateMachine(context.Background(), ref(m.ID), api.LaunchMachineInput{Config: shConfig("exec sleep 61")})
	if err != nil {
		t.Fatal(err)
	}
	if up.InstanceID == m.InstanceID || up.State != api.StateStarted {
		t.Errorf("update: instance %s state %s", up.InstanceID, up.State)
	}
	waitFor(t, "old workload gone", func() bool { return !alive(oldPid) })
	vs, _ := a.MachineVersions(context.Background(), ref(m.ID))
	if len(vs) != 2 || vs[0].Version != up.InstanceID || vs[1].Version != m.InstanceID || vs[1].State != "replaced" || vs[0].State != "started" {
		t.Errorf("versions = %+v", vs)
	}
	// An update pinned to a stale version is refused.
	_, err = a.UpdateMachine(context.Background(), ref(m.ID), api.LaunchMachineInput{Config: shConfig("exec sleep 62"), CurrentVersion: m.InstanceID})
	if !errors.Is(err, api.ErrPrecondition) {
		t.Errorf("stale update: %v", err)
	}
}

func TestUpdateKeepsStoppedMachineStopped(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig("exec sleep 60"))
	if err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	up, err := a.UpdateMachine(context.Background(), ref(m.ID), api.LaunchMachineInput{Config: shConfig("exec sleep 61")})
	if err != nil || up.State != api.StateStopped {
		t.Fatalf("update of stopped machine: %v, state %s", err, up.State)
	}
	skip, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: shConfig("exec sleep 60"), SkipLaunch: true})
	if err != nil || skip.State != api.StateCreated {
		t.Fatalf("skip_launch: %v, state %s", err, skip.State)
	}
}

func TestStopStartRestart(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig("exec sleep 60"))
	pid := pidOf(t, a, m.ID)
	if err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{Signal: "SIGTERM"}); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Error("workload still runs after stop")
	}
	got, _ := a.GetMachine(context.Background(), ref(m.ID))
	if got.State != api.StateStopped {
		t.Fatalf("state after stop = %s", got.State)
	}
	exit := got.Events[0].Request.ExitEvent
	if got.Events[0].Type != "exit" || !exit.RequestedStop || exit.Signal != int(syscall.SIGTERM) {
		t.Errorf("stop exit event = %+v %+v", got.Events[0], exit)
	}
	if err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("stopping a stopped machine: %v, want 409", err)
	}
	res, err := a.StartMachine(context.Background(), ref(m.ID))
	if err != nil || res.PreviousState != "stopped" {
		t.Fatalf("start: %+v, %v", res, err)
	}
	pid2 := pidOf(t, a, m.ID)
	if pid2 == pid || !alive(pid2) {
		t.Fatalf("start did not run a new workload")
	}
	if _, err := a.StartMachine(context.Background(), ref(m.ID)); !errors.Is(err, api.ErrConflict) {
		t.Errorf("starting a started machine: %v, want 409", err)
	}
	if err := a.RestartMachine(context.Background(), ref(m.ID), api.RestartOptions{Signal: "SIGKILL"}); err != nil {
		t.Fatal(err)
	}
	pid3 := pidOf(t, a, m.ID)
	if pid3 == pid2 || alive(pid2) || !alive(pid3) {
		t.Errorf("restart: old %d alive=%v, new %d alive=%v", pid2, alive(pid2), pid3, alive(pid3))
	}
	want := "launch/creating start/started stop/stopping exit/stopped start/started restart/restarting start/started"
	if got := eventLine(events(t, a, m.ID)); got != want {
		t.Errorf("events:\n got %s\nwant %s", got, want)
	}
}

func TestStopEscalatesToSIGKILL(t *testing.T) {
	a := newAgent(t, "", nil)
	cfg := shConfig(`trap "" INT TERM; echo ready; while :; do sleep 0.05; done`)
	cfg.StopConfig = &api.StopConfig{Signal: ptr("SIGTERM"), Timeout: api.Dur(200 * time.Millisecond)}
	m := create(t, a, cfg)
	waitFor(t, "trap installed", func() bool { return len(logLines(t, a, m.ID)) > 0 })
	start := time.Now()
	if err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if took < 200*time.Millisecond || took > 3*time.Second {
		t.Errorf("stop took %v, want the 200ms timeout then SIGKILL", took)
	}
	got, _ := a.GetMachine(context.Background(), ref(m.ID))
	if ex := got.Events[0].Request.ExitEvent; ex.Signal != int(syscall.SIGKILL) {
		t.Errorf("exit event = %+v, want killed by SIGKILL", ex)
	}
}

func ptr[T any](v T) *T { return &v }

func logLines(t testing.TB, a *Agent, id string) []string {
	t.Helper()
	var out []string
	err := a.MachineLogs(context.Background(), ref(id), api.LogOptions{}, func(e api.LogEntry) error {
		out = append(out, e.Message)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestRestartPolicies(t *testing.T) {
	a := newAgent(t, "", nil)
	tests := []struct {
		name    string
		script  string
		policy  *api.MachineRestart
		final   string
		retries int
	}{
		{"on-failure crash loop stops after max_retries", "exit 3", &api.MachineRestart{Policy: "on-failure", MaxRetries: 3}, "failed", 3},
		{"default is on-failure with 10 retries", "exit 1", nil, "failed", 10},
		{"on-failure clean exit stays stopped", "exit 0", &api.MachineRestart{Policy: "on-failure"}, "stopped", 0},
		{"no never restarts", "exit 3", &api.MachineRestart{Policy: "no"}, "stopped", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := shConfig(tt.script)
			cfg.Restart = tt.policy
			m := create(t, a, cfg)
			waitState(t, a, m.ID, tt.final)
			starts := strings.Count(eventLine(events(t, a, m.ID)), "start/started")
			if starts != tt.retries+1 {
				t.Errorf("%d starts, want %d: %s", starts, tt.retries+1, eventLine(events(t, a, m.ID)))
			}
			last := events(t, a, m.ID)[0]
			if last.Type != "exit" || last.Request.ExitEvent.ExitCode != exitCode(tt.script) || last.Request.ExitEvent.RequestedStop {
				t.Errorf("last event %+v %+v", last, last.Request.ExitEvent)
			}
		})
	}
	t.Run("always restarts clean exits", func(t *testing.T) {
		cfg := shConfig("sleep 0.01")
		cfg.Restart = &api.MachineRestart{Policy: "always"}
		m := create(t, a, cfg)
		waitFor(t, "three restarts", func() bool {
			return strings.Count(eventLine(events(t, a, m.ID)), "exit/restarting") >= 3
		})
		// A stop during the loop wins over the policy.
		err := a.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{})
		if err != nil {
			t.Fatal(err)
		}
		waitState(t, a, m.ID, "stopped")
	})
}

func exitCode(script string) int {
	var n int
	for _, c := range strings.TrimPrefix(script, "exit ") {
		n = n*10 + int(c-'0')
	}
	return n
}

func TestLogs(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig(`echo hello; echo oops >&2; echo "$FLY_MACHINE_ID"; exec sleep 60`))
	waitFor(t, "three lines", func() bool { return len(logLines(t, a, m.ID)) == 3 })
	got := logLines(t, a, m.ID)
	if got[0] != "hello" || got[1] != "oops" || got[2] != m.ID {
		t.Errorf("logs = %q", got)
	}
	var tail []string
	a.MachineLogs(context.Background(), ref(m.ID), api.LogOptions{Tail: 1}, func(e api.LogEntry) error {
		tail = append(tail, e.Message)
		if e.MachineID != m.ID || e.Region != "ams" || e.Timestamp.IsZero() {
			t.Errorf("entry %+v", e)
		}
		return nil
	})
	if len(tail) != 1 || tail[0] != m.ID {
		t.Errorf("tail 1 = %q", tail)
	}
}

func TestExecSignalPs(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig(`trap 'echo got-usr1' USR1; echo ready; while :; do sleep 0.02; done`))
	waitFor(t, "ready", func() bool { return len(logLines(t, a, m.ID)) > 0 })
	res, err := a.ExecMachine(context.Background(), ref(m.ID), api.ExecRequest{Command: []string{"sh", "-c", "echo $FLY_MACHINE_ID; echo err >&2; exit 4"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 4 || strings.TrimSpace(res.Stdout) != m.ID || strings.TrimSpace(res.Stderr) != "err" {
		t.Errorf("exec = %+v", res)
	}
	if err := a.SignalMachine(context.Background(), ref(m.ID), "SIGUSR1"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "trap output", func() bool { return strings.Contains(strings.Join(logLines(t, a, m.ID), ","), "got-usr1") })
	if err := a.SignalMachine(context.Background(), ref(m.ID), "SIGBOGUS"); !errors.Is(err, api.ErrBadRequest) {
		t.Errorf("bad signal: %v", err)
	}
	ps, err := a.MachineProcesses(context.Background(), ref(m.ID))
	if err != nil || len(ps) == 0 || int(ps[0].Pid) == 0 {
		t.Fatalf("ps = %+v, %v", ps, err)
	}
	found := false
	for _, p := range ps {
		found = found || int(p.Pid) == pidOf(t, a, m.ID)
	}
	if !found {
		t.Errorf("ps %+v lacks the main process", ps)
	}
}

func TestLeases(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	m := create(t, a, shConfig("exec sleep 60"))
	l, err := a.AcquireMachineLease(ctx, ref(m.ID), api.LeaseInput{TTL: 30, Description: "deploy"})
	if err != nil || l.Data.Nonce == "" {
		t.Fatalf("acquire: %+v %v", l, err)
	}
	if _, err := a.AcquireMachineLease(ctx, ref(m.ID), api.LeaseInput{}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("second acquire: %v, want 409", err)
	}
	if err := a.StopMachine(ctx, ref(m.ID), api.StopMachineInput{}); !errors.Is(err, api.ErrConflict) || !strings.Contains(err.Error(), api.LeaseNonceHeader) {
		t.Errorf("stop without nonce: %v, want 409 naming the header", err)
	}
	wrong := api.MachineRef{App: app, ID: m.ID, LeaseNonce: "nope"}
	if err := a.StopMachine(ctx, wrong, api.StopMachineInput{}); !errors.Is(err, api.ErrConflict) {
		t.Errorf("stop with wrong nonce: %v", err)
	}
	held := api.MachineRef{App: app, ID: m.ID, LeaseNonce: l.Data.Nonce}
	again, err := a.AcquireMachineLease(ctx, held, api.LeaseInput{TTL: 60})
	if err != nil || again.Data.Nonce != l.Data.Nonce || again.Data.Description != "deploy" {
		t.Errorf("refresh: %+v %v", again, err)
	}
	if err := a.StopMachine(ctx, held, api.StopMachineInput{}); err != nil {
		t.Errorf("stop with nonce: %v", err)
	}
	if got, err := a.MachineLease(ctx, ref(m.ID)); err != nil || got.Data.Nonce != l.Data.Nonce {
		t.Errorf("get lease: %+v %v", got, err)
	}
	if err := a.ReleaseMachineLease(ctx, ref(m.ID)); !errors.Is(err, api.ErrConflict) {
		t.Errorf("release without nonce: %v", err)
	}
	if err := a.ReleaseMachineLease(ctx, held); err != nil {
		t.Fatal(err)
	}
	if _, err := a.MachineLease(ctx, ref(m.ID)); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("lease after release: %v", err)
	}
	if _, err := a.StartMachine(ctx, ref(m.ID)); err != nil {
		t.Errorf("start after release: %v", err)
	}
	// A lease taken at create comes back with the machine.
	lm, err := a.CreateMachine(ctx, app, api.LaunchMachineInput{Config: shConfig("exec sleep 60"), LeaseTTL: 30})
	if err != nil || lm.LeaseNonce == "" {
		t.Fatalf("create with lease: %+v %v", lm, err)
	}
	if err := a.DestroyMachine(ctx, ref(lm.ID), true); !errors.Is(err, api.ErrConflict) {
		t.Errorf("destroy leased machine without nonce: %v", err)
	}
}

func TestWait(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	m := create(t, a, shConfig("exec sleep 60"))
	start := time.Now()
	_, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"stopped"}, Timeout: 100 * time.Millisecond})
	if !errors.Is(err, api.ErrTimeout) || time.Since(start) < 100*time.Millisecond {
		t.Errorf("wait timeout: %v after %v", err, time.Since(start))
	}
	done := make(chan error, 1)
	go func() {
		_, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"stopped"}, InstanceID: m.InstanceID, Timeout: 5 * time.Second})
		done <- err
	}()
	time.Sleep(20 * time.Millisecond)
	if err := a.StopMachine(ctx, ref(m.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("wait stopped: %v", err)
	}
	// Any of several states will do.
	if _, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"started", "stopped"}, Timeout: time.Second}); err != nil {
		t.Errorf("wait for started or stopped: %v", err)
	}
	if _, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"sideways"}}); !errors.Is(err, api.ErrBadRequest) {
		t.Errorf("bad state: %v", err)
	}
	if _, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"stopped"}, InstanceID: "01ARZ3NDEKTSV4RRFFQ69G5FAV"}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("unknown instance: %v", err)
	}
}

func TestDestroy(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	m := create(t, a, shConfig("exec sleep 60"))
	pid := pidOf(t, a, m.ID)
	if err := a.DestroyMachine(ctx, ref(m.ID), false); !errors.Is(err, api.ErrConflict) {
		t.Errorf("destroy running without force: %v", err)
	}
	if err := a.DestroyMachine(ctx, ref(m.ID), true); err != nil {
		t.Fatal(err)
	}
	if alive(pid) {
		t.Error("workload survived destroy")
	}
	if _, err := os.Stat(a.machineDir(m.ID)); !os.IsNotExist(err) {
		t.Errorf("machine dir left behind: %v", err)
	}
	list, _ := a.ListMachines(ctx, app, api.ListMachinesOptions{})
	if len(list) != 0 {
		t.Errorf("destroyed machine listed: %+v", list)
	}
	list, _ = a.ListMachines(ctx, app, api.ListMachinesOptions{IncludeDeleted: true})
	if len(list) != 1 || list[0].State != "destroyed" {
		t.Errorf("include_deleted list: %+v", list)
	}
	if _, err := a.WaitMachine(ctx, ref(m.ID), api.WaitOptions{States: []string{"destroyed"}, Timeout: time.Second}); err != nil {
		t.Errorf("wait destroyed: %v", err)
	}
	if _, err := a.StartMachine(ctx, ref(m.ID)); !errors.Is(err, api.ErrConflict) {
		t.Errorf("start destroyed: %v", err)
	}
	// auto_destroy removes a machine whose workload ends.
	cfg := shConfig("exit 0")
	cfg.AutoDestroy = true
	ad := create(t, a, cfg)
	waitState(t, a, ad.ID, "destroyed")
}

// TestLaunchFailureSaysWhy: an image that stops resolving after the
// machine was created fails the start, and the events say why.
func TestLaunchFailureSaysWhy(t *testing.T) {
	a := newAgent(t, "", nil)
	prog := filepath.Join(t.TempDir(), "prog")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\nexec sleep 60\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	m, err := a.CreateMachine(context.Background(), app, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "exec:" + prog}, SkipLaunch: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(prog); err != nil {
		t.Fatal(err)
	}
	if _, err := a.StartMachine(context.Background(), ref(m.ID)); !errors.Is(err, api.ErrUnprocessable) {
		t.Fatalf("start with the program gone = %v, want 422", err)
	}
	got := waitState(t, a, m.ID, "failed")
	if got.State != api.StateFailed {
		t.Fatalf("state = %s, want failed", got.State)
	}
	evs := events(t, a, m.ID)
	if msg := evs[0].Request.Message; !strings.Contains(msg, prog) {
		t.Errorf("failure message %q does not name the program", msg)
	}
	// Destroying a failed machine needs no force.
	if err := a.DestroyMachine(context.Background(), ref(m.ID), false); err != nil {
		t.Error(err)
	}
}

// TestCreateRefusesUnresolvableImage: a create whose image the host cannot
// resolve is answered with 422 naming the image and why, before anything
// runs; the machine is not kept (only include_deleted shows it, with
// events that say why).
func TestCreateRefusesUnresolvableImage(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	for _, img := range []string{"exec:/no/such/program", "registry.example/nothing:1"} {
		for _, skip := range []bool{false, true} {
			_, err := a.CreateMachine(ctx, app, api.LaunchMachineInput{Config: &api.MachineConfig{Image: img}, SkipLaunch: skip})
			if !errors.Is(err, api.ErrUnprocessable) || !strings.Contains(err.Error(), "config.image") || !strings.Contains(err.Error(), img) {
				t.Errorf("create %s (skip_launch %v) = %v, want 422 naming config.image", img, skip, err)
			}
		}
	}
	if ms, err := a.ListMachines(ctx, app, api.ListMachinesOptions{}); err != nil || len(ms) != 0 {
		t.Fatalf("list = %d machines, %v; want none", len(ms), err)
	}
	ms, err := a.ListMachines(ctx, app, api.ListMachinesOptions{IncludeDeleted: true})
	if err != nil || len(ms) != 4 {
		t.Fatalf("list include_deleted = %d machines, %v; want 4", len(ms), err)
	}
	for _, m := range ms {
		if m.State != api.StateDestroyed {
			t.Errorf("refused machine %s is %s", m.ID, m.State)
		}
		evs := events(t, a, m.ID)
		if got := eventLine(evs); got != "launch/creating launch/launch_failed destroy/destroying destroy/destroyed" {
			t.Errorf("events = %s", got)
		}
		if _, err := os.Stat(a.machineDir(m.ID)); !os.IsNotExist(err) {
			t.Errorf("machine dir of %s left behind: %v", m.ID, err)
		}
	}
	if u := a.Used(); u != (Capacity{}) {
		t.Errorf("refused machines hold %v", u)
	}
}

func TestBadInput(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	bad := []api.LaunchMachineInput{
		{},
		{Config: &api.MachineConfig{}},
		{Config: &api.MachineConfig{Image: "x", Guest: &api.MachineGuest{MemoryMB: 100}}},
		{Config: &api.MachineConfig{Image: "x", StopConfig: &api.StopConfig{Signal: ptr("SIGNOPE")}}},
		{Config: &api.MachineConfig{Image: "x"}, Region: "syd"},
		{Config: &api.MachineConfig{Image: "x"}, Name: "Bad Name"},
		{Config: &api.MachineConfig{Image: "x"}, Org: "not.an.org"},
		{Config: &api.MachineConfig{Image: "x"}, LeaseTTL: api.MaxLeaseTTL + 1},
		{Config: &api.MachineConfig{Image: "UPPER::bad@@ref"}},
	}
	for i, in := range bad {
		if _, err := a.CreateMachine(ctx, app, in); !errors.Is(err, api.ErrUnprocessable) {
			t.Errorf("case %d: %v, want 422", i, err)
		}
	}
	m := create(t, a, shConfig("exec sleep 60"))
	if _, err := a.GetMachine(ctx, api.MachineRef{App: "other-app", ID: m.ID}); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("other app's machine: %v", err)
	}
	if _, err := a.GetMachine(ctx, ref("00000000000000")); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("unknown machine: %v", err)
	}
	if err := a.StopMachine(ctx, ref(m.ID), api.StopMachineInput{Signal: "SIGWHAT"}); !errors.Is(err, api.ErrBadRequest) {
		t.Errorf("bad stop signal: %v", err)
	}
	if err := a.SuspendMachine(ctx, ref(m.ID)); !errors.Is(err, api.ErrNotImplemented) {
		t.Errorf("suspend: %v", err)
	}
}

func TestMetadataCordonAndListFilters(t *testing.T) {
	a := newAgent(t, "", nil)
	ctx := context.Background()
	cfg := shConfig("exec sleep 60")
	cfg.Metadata = map[string]string{"role": "primary"}
	m1 := create(t, a, cfg)
	m2 := create(t, a, shConfig("exec sleep 60"))
	if err := a.SetMachineMetadata(ctx, ref(m2.ID), "role", "replica"); err != nil {
		t.Fatal(err)
	}
	md, _ := a.MachineMetadata(ctx, ref(m2.ID))
	if md["role"] != "replica" {
		t.Errorf("metadata = %v", md)
	}
	list, _ := a.ListMachines(ctx, app, api.ListMachinesOptions{Metadata: map[string]string{"role": "primary"}})
	if len(list) != 1 || list[0].ID != m1.ID {
		t.Errorf("metadata filter: %+v", list)
	}
	if list, _ := a.ListMachines(ctx, app, api.ListMachinesOptions{Region: "syd"}); len(list) != 0 {
		t.Errorf("region filter: %+v", list)
	}
	if err := a.DeleteMachineMetadata(ctx, ref(m2.ID), "role"); err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteMachineMetadata(ctx, ref(m2.ID), "role"); !errors.Is(err, api.ErrNotFound) {
		t.Errorf("delete missing key: %v", err)
	}
	if err := a.CordonMachine(ctx, ref(m1.ID), true); err != nil {
		t.Fatal(err)
	}
	got, _ := a.GetMachine(ctx, ref(m1.ID))
	if !got.Cordoned {
		t.Error("not cordoned")
	}
	a.CordonMachine(ctx, ref(m1.ID), false)
	if got, _ := a.GetMachine(ctx, ref(m1.ID)); got.Cordoned {
		t.Error("still cordoned")
	}
}

func TestDataDirInUse(t *testing.T) {
	dir := t.TempDir()
	newAgent(t, dir, nil)
	_, err := New(Config{DataDir: dir, Region: "ams", Driver: exec.New(exec.Config{}, nil)})
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Errorf("second agent on the same data dir: %v", err)
	}
	if _, err := New(Config{DataDir: dir, Region: "ams"}); err == nil {
		t.Error("agent without driver accepted")
	}
}

// inotifyInstances counts the process's open inotify descriptors.
func inotifyInstances(t testing.TB) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.Contains(target, "anon_inode:inotify") {
			n++
		}
	}
	return n
}

// The logs of all of a host's machines share one inotify instance (the
// kernel allows a user 128 by default), which the agent releases on Close.
func TestMachineLogsShareOneInotifyInstance(t *testing.T) {
	before := inotifyInstances(t)
	a := newAgent(t, "", nil)
	var ids []string
	for i := range 5 {
		m := create(t, a, shConfig(fmt.Sprintf("echo hello %d; exec sleep 60", i)))
		ids = append(ids, m.ID)
	}
	for i, id := range ids {
		want := fmt.Sprintf("hello %d", i)
		waitFor(t, "log line of "+id, func() bool { return slices.Contains(logLines(t, a, id), want) })
	}
	if got := inotifyInstances(t) - before; got != 1 {
		t.Errorf("agent with %d machines holds %d inotify instances, want 1", len(ids), got)
	}
	a.StopAll(context.Background())
	a.Close()
	if got := inotifyInstances(t) - before; got != 0 {
		t.Errorf("closed agent left %d inotify instances", got)
	}
}

// TestUpdateRefusesUnresolvableImage: an update to an image the host
// cannot resolve is refused before the running version is touched.
func TestUpdateRefusesUnresolvableImage(t *testing.T) {
	a := newAgent(t, "", nil)
	m := create(t, a, shConfig("exec sleep 60"))
	_, err := a.UpdateMachine(context.Background(), ref(m.ID), api.LaunchMachineInput{Config: &api.MachineConfig{Image: "exec:/no/such/program"}})
	if !errors.Is(err, api.ErrUnprocessable) || !strings.Contains(err.Error(), "config.image") {
		t.Fatalf("update = %v, want 422 naming config.image", err)
	}
	got, err := a.GetMachine(context.Background(), ref(m.ID))
	if err != nil || got.State != api.StateStarted || got.InstanceID != m.InstanceID {
		t.Fatalf("after the refused update: %v, state %s, instance %s (was %s)", err, got.State, got.InstanceID, m.InstanceID)
	}
}

// TestUnavailableImageIs503: while the image cannot be got (its registry
// down, a local failure), a create is refused with 503, not 422, leaving no
// live machine and holding nothing, and an update is refused with 503
// before the running version is touched; once the image can be got again,
// the same create and update succeed.
func TestUnavailableImageIs503(t *testing.T) {
	d := fake.New()
	a := newAgent(t, "", d)
	ctx := context.Background()
	down := fmt.Errorf("pull demo: registry unavailable: cannot reach registry.test: %w", driver.ErrUnavailable)
	cfg := &api.MachineConfig{Image: "demo", Guest: &api.MachineGuest{CPUs: 1, MemoryMB: 256}}

	running := create(t, a, cfg)
	d.FailPrepare(down)
	for _, skip := range []bool{false, true} {
		_, err := a.CreateMachine(ctx, app, api.LaunchMachineInput{Config: cfg, SkipLaunch: skip})
		if !errors.Is(err, api.ErrUnavailable) || errors.Is(err, api.ErrUnprocessable) || !strings.Contains(err.Error(), "config.image") {
			t.Errorf("create (skip_launch %v) while the registry is down = %v, want 503 naming config.image", skip, err)
		}
	}
	_, err := a.UpdateMachine(ctx, ref(running.ID), api.LaunchMachineInput{Config: &api.MachineConfig{Image: "demo:2"}})
	if !errors.Is(err, api.ErrUnavailable) {
		t.Errorf("update while the registry is down = %v, want 503", err)
	}
	if got, err := a.GetMachine(ctx, ref(running.ID)); err != nil || got.State != api.StateStarted || got.InstanceID != running.InstanceID {
		t.Fatalf("after the refused update: %v %+v", err, got)
	}
	ms, err := a.ListMachines(ctx, app, api.ListMachinesOptions{})
	if err != nil || len(ms) != 1 {
		t.Fatalf("live machines = %d, %v; want only the running one", len(ms), err)
	}
	if u := a.Used(); u != (Capacity{CPUs: 1, MemoryMB: 256}) {
		t.Errorf("refused creates hold %v", u)
	}

	d.FailPrepare(nil)
	if _, err := a.CreateMachine(ctx, app, api.LaunchMachineInput{Config: cfg}); err != nil {
		t.Errorf("create once the registry is back: %v", err)
	}
	if _, err := a.UpdateMachine(ctx, ref(running.ID), api.LaunchMachineInput{Config: &api.MachineConfig{Image: "demo:2"}}); err != nil {
		t.Errorf("update once the registry is back: %v", err)
	}
}
