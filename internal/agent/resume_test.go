package agent

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/driver/exec"
	"github.com/flamehq/flame/internal/machine"
)

// abandon simulates the agent process dying: its goroutines and store go
// away, nothing is stopped or finished, no state is written.
func abandon(a *Agent) {
	a.mu.Lock()
	a.closed = true
	a.mu.Unlock()
	a.cancel()
	a.wg.Wait()
	for _, m := range a.all() {
		m.closeLog()
	}
	a.store.close()
}

// agentOn starts a second-generation agent on dir, with a new driver
// instance, as a restarted agent process would have.
func agentOn(t *testing.T, dir string) *Agent {
	return newAgent(t, dir, exec.New(exec.Config{}, testLogger(t)))
}

// rewrite edits the stored record of machine id while no agent runs,
// to put it where a crash at some step would have left it.
func rewrite(t *testing.T, dir, id string, fn func(r *record)) {
	t.Helper()
	st, err := openStore(filepath.Join(dir, "agent.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	recs, err := st.all()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.ID == id {
			fn(r)
			if err := st.put(r, nil); err != nil {
				t.Fatal(err)
			}
			return
		}
	}
	t.Fatalf("no record %s", id)
}

// workloads counts host processes that belong to machine id. A process
// caught between fork and exec shows its parent's environment, so callers
// poll for the count they expect.
func workloads(id string) int {
	n := 0
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil {
			continue
		}
		for _, kv := range strings.Split(string(env), "\x00") {
			if kv == "FLY_MACHINE_ID="+id {
				n++
			}
		}
	}
	return n
}

func TestResumeAdoptsRunningMachines(t *testing.T) {
	dir := t.TempDir()
	a := newAgent(t, dir, nil)
	m1 := create(t, a, shConfig("echo one; exec sleep 60"))
	m2 := create(t, a, shConfig("exec sleep 60"))
	p1, p2 := pidOf(t, a, m1.ID), pidOf(t, a, m2.ID)
	abandon(a)

	b := agentOn(t, dir)
	for id, pid := range map[string]int{m1.ID: p1, m2.ID: p2} {
		got, _ := b.GetMachine(context.Background(), ref(id))
		if got.State != api.StateStarted || pidOf(t, b, id) != pid {
			t.Errorf("machine %s: state %s pid %d, want started with pid %d", id, got.State, pidOf(t, b, id), pid)
		}
		waitFor(t, "one workload of "+id, func() bool { return workloads(id) == 1 })
	}
	if got := logLines(t, b, m1.ID); len(got) != 1 || got[0] != "one" {
		t.Errorf("logs after adoption = %q", got)
	}
	if err := b.StopMachine(context.Background(), ref(m1.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "adopted workload stopped", func() bool { return !alive(p1) })
	// An adopted workload that exits goes through its restart policy.
	syscall.Kill(p2, syscall.SIGKILL)
	waitFor(t, "restart after exit of adopted workload", func() bool {
		return strings.Contains(eventLine(events(t, b, m2.ID)), "exit/restarting")
	})
	waitState(t, b, m2.ID, "started")
}

func TestResumeRestartsWorkloadThatDiedMeanwhile(t *testing.T) {
	dir := t.TempDir()
	a := newAgent(t, dir, nil)
	m := create(t, a, shConfig("exec sleep 60"))
	pid := pidOf(t, a, m.ID)
	abandon(a)
	syscall.Kill(pid, syscall.SIGKILL)
	waitFor(t, "workload dead", func() bool { return !alive(pid) })

	b := agentOn(t, dir)
	waitState(t, b, m.ID, "started")
	if np := pidOf(t, b, m.ID); np == pid {
		t.Error("workload not restarted")
	}
	waitFor(t, "one workload", func() bool { return workloads(m.ID) == 1 })
	evs := events(t, b, m.ID)
	if !strings.Contains(eventLine(evs), "exit/restarting start/started") {
		t.Errorf("events = %s", eventLine(evs))
	}
}

// TestResumeFinishesInterruptedOperations puts a machine's record where an
// agent killed between recording a step and acting on it would have left
// it, and checks that the next agent finishes the operation exactly once.
func TestResumeFinishesInterruptedOperations(t *testing.T) {
	tests := []struct {
		name  string
		edit  func(r *record)
		want  machine.State
		check func(t *testing.T, b *Agent, id string, oldPid int)
	}{
		{"killed after recording stopping", func(r *record) {
			r.State, r.Op = machine.Stopping, &op{Kind: "stop", Signal: "15", Timeout: time.Second}
		}, machine.Stopped, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("workload still runs")
			}
		}},
		{"killed after recording destroying", func(r *record) {
			r.State, r.Op = machine.Destroying, &op{Kind: "destroy", Force: true}
		}, machine.Destroyed, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("workload still runs")
			}
			if _, err := os.Stat(b.machineDir(id)); !os.IsNotExist(err) {
				t.Error("machine dir left behind")
			}
		}},
		{"killed after recording a user restart", func(r *record) {
			r.State, r.Op = machine.Restarting, &op{Kind: "restart", Signal: "9"}
		}, machine.Started, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) || pidOf(t, b, id) == oldPid {
				t.Error("old workload not replaced")
			}
		}},
		{"killed while a restart waited out its backoff", func(r *record) {
			syscall.Kill(pidFromHandle(r.Handle), syscall.SIGKILL)
			r.State, r.Op, r.Handle, r.RestartAt = machine.Restarting, &op{Kind: "exit"}, "", time.Now().Add(50*time.Millisecond)
		}, machine.Started, nil},
		{"killed after recording an update", func(r *record) {
			r.Versions[0].State = machine.Replacing
			r.Versions = append([]version{{Instance: "01JNEWVERSION0000000000000", State: machine.Updating, Config: r.Config}}, r.Versions...)
			r.Instance, r.State = "01JNEWVERSION0000000000000", machine.Updating
			r.OldHandle, r.Handle = r.Handle, ""
			r.Op = &op{Kind: "update", Then: machine.Started}
		}, machine.Started, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("old version still runs")
			}
			vs, _ := b.MachineVersions(context.Background(), ref(id))
			if len(vs) != 2 || vs[0].State != "started" || vs[1].State != "replaced" {
				t.Errorf("versions = %+v %+v", vs[0], vs[1])
			}
		}},
		{"killed between starting a workload and recording it", func(r *record) {
			r.State, r.Handle, r.Op = machine.Starting, "", &op{Kind: "start"}
		}, machine.Started, func(t *testing.T, b *Agent, id string, oldPid int) {
			if pidOf(t, b, id) != oldPid {
				t.Errorf("workload started again (pid %d), want the running one (pid %d) adopted", pidOf(t, b, id), oldPid)
			}
		}},
		{"killed after recording starting, before the workload ran", func(r *record) {
			syscall.Kill(pidFromHandle(r.Handle), syscall.SIGKILL)
			r.State, r.Handle, r.Op = machine.Starting, "", &op{Kind: "start"}
		}, machine.Started, nil},
		{"killed after recording creating", func(r *record) {
			syscall.Kill(pidFromHandle(r.Handle), syscall.SIGKILL)
			r.State, r.Handle, r.Op, r.Events = machine.Creating, "", &op{Kind: "create"}, nil
			r.Versions[0].State = machine.Creating
		}, machine.Started, nil},
		{"killed after recording creating with skip_launch", func(r *record) {
			syscall.Kill(pidFromHandle(r.Handle), syscall.SIGKILL)
			r.State, r.Handle, r.Op, r.SkipLaunch = machine.Creating, "", &op{Kind: "create"}, true
		}, machine.Created, func(t *testing.T, b *Agent, id string, oldPid int) {
			waitFor(t, "no workload", func() bool { return workloads(id) == 0 })
		}},
		{"killed after recording launch_failed", func(r *record) {
			syscall.Kill(pidFromHandle(r.Handle), syscall.SIGKILL)
			r.State, r.Handle = machine.LaunchFailed, ""
		}, machine.Failed, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			a := newAgent(t, dir, nil)
			m := create(t, a, shConfig("exec sleep 60"))
			pid := pidOf(t, a, m.ID)
			abandon(a)
			rewrite(t, dir, m.ID, tt.edit)
			waitFor(t, "killed workload reaped", func() bool { return alive(pid) || workloads(m.ID) == 0 })

			b := agentOn(t, dir)
			waitState(t, b, m.ID, string(tt.want))
			if tt.check != nil {
				tt.check(t, b, m.ID, pid)
			}
			want := 0
			if tt.want == machine.Started {
				want = 1
			}
			waitFor(t, "workload count "+strconv.Itoa(want), func() bool { return workloads(m.ID) == want })
			// The resumed machine answers further operations.
			if tt.want == machine.Started {
				if err := b.StopMachine(context.Background(), ref(m.ID), api.StopMachineInput{}); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

func pidFromHandle(h string) int {
	p, _, _ := strings.Cut(h, ":")
	n, _ := strconv.Atoi(p)
	return n
}
