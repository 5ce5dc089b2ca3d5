package agent

import (
	"context"
	"encoding/json"
	"errors"
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

// resumed waits until every machine of a has resumed: each one's lock is
// held by its resume until it is done.
func resumed(t *testing.T, a *Agent) {
	t.Helper()
	for _, m := range a.all() {
		m.opMu.Lock()
		//lint:ignore SA2001 taking the lock was the wait: the resume held it
		m.opMu.Unlock()
	}
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
	resumed(t, b) // until then it reads as the record left it: started
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
		{"killed after recording suspending", func(r *record) {
			r.State, r.Op = machine.Suspending, &op{Kind: "suspend"}
		}, machine.Stopped, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("workload still runs")
			}
		}},
		{"killed after recording an update that leaves the machine stopped", func(r *record) {
			r.Versions[0].State = machine.Replacing
			r.Versions = append([]version{{Instance: "01JNEWVERSION0000000000000", State: machine.Updating, Config: r.Config}}, r.Versions...)
			r.Instance, r.State = "01JNEWVERSION0000000000000", machine.Updating
			r.OldHandle, r.Handle = r.Handle, ""
			r.Op = &op{Kind: "update", Then: machine.Stopped}
		}, machine.Stopped, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("old version still runs")
			}
			m, _ := b.GetMachine(context.Background(), ref(id))
			vs, _ := b.MachineVersions(context.Background(), ref(id))
			if m.InstanceID != "01JNEWVERSION0000000000000" || len(vs) != 2 || vs[1].State != "replaced" {
				t.Errorf("instance %s, versions = %+v %+v", m.InstanceID, vs[0], vs[1])
			}
		}},
		{"killed after recording an update that leaves the machine created", func(r *record) {
			r.Versions[0].State = machine.Replacing
			r.Versions = append([]version{{Instance: "01JNEWVERSION0000000000000", State: machine.Updating, Config: r.Config}}, r.Versions...)
			r.Instance, r.State = "01JNEWVERSION0000000000000", machine.Updating
			r.OldHandle, r.Handle = r.Handle, ""
			r.Op = &op{Kind: "update", Then: machine.Created}
		}, machine.Created, func(t *testing.T, b *Agent, id string, oldPid int) {
			if alive(oldPid) {
				t.Error("old version still runs")
			}
			vs, _ := b.MachineVersions(context.Background(), ref(id))
			if len(vs) != 2 || vs[1].State != "replaced" {
				t.Errorf("versions = %+v", vs)
			}
		}},
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
			resumed(t, b)
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

// stubbornConfig runs a workload that ignores the stop signals: only the
// SIGKILL at the end of a stop's grace ends it.
func stubbornConfig() *api.MachineConfig {
	return shConfig("trap '' TERM INT; : > trapped; exec sleep 600")
}

// createStubborn creates a machine running stubbornConfig and returns once
// its workload ignores the signals: a stop sent before the shell ran its
// trap would end it at once.
func createStubborn(t *testing.T, a *Agent) *api.Machine {
	t.Helper()
	m := create(t, a, stubbornConfig())
	waitFor(t, "the workload to trap its signals", func() bool {
		_, err := os.Stat(filepath.Join(a.machineDir(m.ID), "trapped"))
		return err == nil
	})
	return m
}

// stopStubborn starts a stop of machine id with grace on a, waits until the
// stop is recorded, and returns its recorded deadline. The stop call itself
// runs on until the agent is abandoned.
func stopStubborn(t *testing.T, a *Agent, id string, grace time.Duration) time.Time {
	t.Helper()
	go a.StopMachine(context.Background(), ref(id), api.StopMachineInput{Signal: "SIGTERM", Timeout: &api.Duration{Duration: grace}})
	waitFor(t, "stop recorded", func() bool { return a.lookup(id).rec.Load().State == machine.Stopping })
	o := a.lookup(id).rec.Load().Op
	if o == nil || o.Deadline.IsZero() {
		t.Fatalf("stop recorded without a deadline: %+v", o)
	}
	return o.Deadline
}

// An agent restarted while a machine was stopping with a long grace answers
// its API as soon as it has read its records, not when that stop ends: the
// other machines are adopted and can be operated, readers see the stopping
// machine as recorded, and an operation on it waits for its resume.
func TestRestartAnswersWhileAStopRuns(t *testing.T) {
	// The grace is the bound's yardstick: everything below must happen
	// long before the stop could end by itself.
	const grace = 2 * time.Minute
	const bound = grace / 4
	dir := t.TempDir()
	a := newAgent(t, dir, nil)
	slow := createStubborn(t, a)
	running := create(t, a, shConfig("exec sleep 60"))
	stopped := create(t, a, shConfig("exec sleep 60"))
	if err := a.StopMachine(context.Background(), ref(stopped.ID), api.StopMachineInput{}); err != nil {
		t.Fatal(err)
	}
	slowPid, runningPid := pidOf(t, a, slow.ID), pidOf(t, a, running.ID)
	t.Cleanup(func() { syscall.Kill(slowPid, syscall.SIGKILL) })
	stopStubborn(t, a, slow.ID, grace)
	abandon(a)

	t0 := time.Now()
	b, err := New(Config{DataDir: dir, Region: "ams", Driver: newExecDriver(t), Logger: testLogger(t), Backoff: fastBackoff(), StopTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		b.StopAll(context.Background())
		b.Close()
	})
	started := make(chan error, 1)
	go func() { started <- b.Start(context.Background()) }()
	select {
	case err := <-started:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(bound):
		t.Fatalf("Start did not return within %v while a stop with %v of grace resumed", bound, grace)
	}
	got, err := b.GetMachine(context.Background(), ref(slow.ID))
	if err != nil || got.State != api.StateStopping {
		t.Fatalf("get the stopping machine = %+v, %v; want it stopping", got, err)
	}
	list, err := b.ListMachines(context.Background(), app, api.ListMachinesOptions{})
	if err != nil || len(list) != 3 {
		t.Fatalf("list = %d machines, %v; want 3", len(list), err)
	}

	// An operation on the resuming machine waits for its lock.
	type result struct {
		err   error
		state string
	}
	op := make(chan result, 1)
	go func() {
		err := b.StopMachine(context.Background(), ref(slow.ID), api.StopMachineInput{})
		m, _ := b.GetMachine(context.Background(), ref(slow.ID))
		op <- result{err, m.State}
	}()

	// The other machines resume beside it.
	if pid := pidOf(t, b, running.ID); pid != runningPid {
		t.Errorf("running machine: pid %d, want %d adopted", pid, runningPid)
	}
	if _, err := b.StartMachine(context.Background(), ref(stopped.ID)); err != nil {
		t.Errorf("start a stopped machine while another resumes: %v", err)
	}
	waitState(t, b, stopped.ID, api.StateStarted)
	if elapsed := time.Since(t0); elapsed > bound {
		t.Errorf("the restarted agent took %v to answer, want well below the %v grace", elapsed, grace)
	}
	if !alive(slowPid) {
		t.Fatal("the stubborn workload ended before its stop's grace")
	}
	select {
	case r := <-op:
		t.Fatalf("an operation on the resuming machine did not wait for its resume: %v (state %s)", r.err, r.state)
	default:
	}

	// The grace ends (here by hand): the resumed stop records stopped, then
	// the waiting operation runs and finds it stopped.
	syscall.Kill(slowPid, syscall.SIGKILL)
	waitState(t, b, slow.ID, api.StateStopped)
	select {
	case r := <-op:
		if !errors.Is(r.err, api.ErrConflict) || r.state != api.StateStopped {
			t.Errorf("waiting stop = %v with the machine %s; want a conflict with it stopped", r.err, r.state)
		}
	case <-time.After(bound):
		t.Fatal("the operation waiting for the resume never ran")
	}
}

// A stop resumed after a restart ends at the deadline recorded when it was
// decided, not a whole grace after the restart; so does a suspend, which
// stops the workload the same way. The restarted agent's clock reads the
// stop's grace as all but spent, and its default stop timeout is as long
// as the grace; the workload, which ignores SIGTERM and SIGINT, is killed
// when the rest has passed.
func TestResumedStopKeepsItsDeadline(t *testing.T) {
	const grace = 2 * time.Minute
	const left = time.Second // of the grace, when the agent restarts
	for _, tt := range []struct {
		name string
		edit func(r *record)
	}{
		{"stopping", nil},
		{"suspending", func(r *record) { r.State, r.Op.Kind = machine.Suspending, "suspend" }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			a := newAgent(t, dir, nil)
			slow := createStubborn(t, a)
			pid := pidOf(t, a, slow.ID)
			t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
			deadline := stopStubborn(t, a, slow.ID, grace)
			abandon(a)
			if tt.edit != nil {
				rewrite(t, dir, slow.ID, tt.edit)
			}

			// The first agent's clock is the real one: its deadline is
			// real time. The second one's runs grace-left ahead, as if
			// that long had passed.
			shift := grace - left
			b, err := New(Config{DataDir: dir, Region: "ams", Driver: newExecDriver(t), Logger: testLogger(t),
				StopTimeout: grace, Now: func() time.Time { return time.Now().Add(shift) }})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { b.Close() })
			if err := b.Start(context.Background()); err != nil {
				t.Fatal(err)
			}
			// Well below a grace after the restart; the old behaviour, a
			// whole grace (or stop timeout) again, would be two minutes.
			_, err = b.WaitMachine(context.Background(), ref(slow.ID), api.WaitOptions{State: api.StateStopped, Timeout: grace / 4})
			if err != nil {
				t.Fatalf("resumed %s did not end at its deadline: %v", tt.name, err)
			}
			if now := time.Now(); now.Before(deadline.Add(-shift)) {
				t.Errorf("workload killed %v before its deadline", deadline.Add(-shift).Sub(now))
			}
			if alive(pid) {
				t.Error("workload still runs")
			}
			evs := events(t, b, slow.ID)
			if ee := evs[0].Request; evs[0].Status != api.StateStopped || ee == nil || ee.ExitEvent == nil || ee.ExitEvent.Signal != int(syscall.SIGKILL) {
				t.Errorf("last event = %+v, want stopped by SIGKILL", evs[0])
			}
		})
	}
}

// The grace a resumed operation has left: to its deadline, none once it has
// passed, and for records written before deadlines were, the whole timeout.
func TestOpGrace(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	a := &Agent{cfg: Config{StopTimeout: 5 * time.Second, Now: func() time.Time { return now }}}
	for _, tt := range []struct {
		name string
		op   *op
		want time.Duration
	}{
		{"no op", nil, 5 * time.Second},
		{"deadline ahead", &op{Timeout: time.Hour, Deadline: now.Add(90 * time.Second)}, 90 * time.Second},
		{"deadline passed", &op{Timeout: time.Hour, Deadline: now.Add(-time.Minute)}, 0},
		{"old record: timeout only", &op{Timeout: 7 * time.Second}, 7 * time.Second},
		{"old record: neither", &op{}, 5 * time.Second},
	} {
		if got := a.opGrace(tt.op); got != tt.want {
			t.Errorf("%s: grace %v, want %v", tt.name, got, tt.want)
		}
	}
	var o op
	if err := json.Unmarshal([]byte(`{"kind":"stop","signal":"15","timeout":90000000000}`), &o); err != nil || !o.Deadline.IsZero() || o.Timeout != 90*time.Second {
		t.Errorf("old record's op = %+v, %v", o, err)
	}
}
