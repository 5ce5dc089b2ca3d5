package exec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/driver"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// TestMain doubles as a short-lived agent for TestAdoptAfterAgentDied: it
// starts one workload, prints its handle and exits without stopping it.
func TestMain(m *testing.M) {
	if os.Getenv("FLAME_EXEC_TEST_AGENT") == "1" {
		runTestAgent()
		return
	}
	os.Exit(m.Run())
}

func runTestAgent() {
	d := New(Config{}, nil)
	p, err := d.Start(context.Background(), driver.Spec{
		MachineID: "agent",
		LogPath:   os.Getenv("FLAME_EXEC_TEST_LOG"),
		Image:     "exec:/bin/sh",
		Cmd:       []string{"-c", os.Getenv("FLAME_EXEC_TEST_SCRIPT")},
		Env:       map[string]string{"PATH": os.Getenv("PATH")},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(p.Handle())
	os.Exit(0)
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func newDriver(t testing.TB, cfg Config) *Driver {
	d := New(cfg, slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	t.Cleanup(func() { d.Close() })
	return d
}

func shSpec(t testing.TB, script string) driver.Spec {
	dir := t.TempDir()
	return driver.Spec{
		MachineID: "m1",
		Dir:       dir,
		LogPath:   filepath.Join(dir, "log"),
		Image:     "exec:/bin/sh",
		Cmd:       []string{"-c", script},
		Env:       map[string]string{"PATH": os.Getenv("PATH")},
	}
}

// start starts spec and makes sure the workload is gone when the test ends.
func start(t testing.TB, d *Driver, spec driver.Spec) driver.Process {
	t.Helper()
	p, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kill(t, p) })
	return p
}

func kill(t testing.TB, p driver.Process) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := p.Stop(ctx, syscall.SIGKILL, 0); err != nil && !errors.Is(err, ErrClosed) {
		t.Errorf("kill: %v", err)
	}
}

func waitExit(t testing.TB, p driver.Process) driver.Exit {
	t.Helper()
	select {
	case <-p.Done():
		return p.Exit()
	case <-time.After(10 * time.Second):
		t.Fatalf("pid %d did not exit", p.Pid())
		return driver.Exit{}
	}
}

// waitLog polls the log file until it contains want.
func waitLog(t testing.TB, path, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("log %s never contained %q; has %q", path, want, b)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestStartExitCode(t *testing.T) {
	d := newDriver(t, Config{})
	p := start(t, d, shSpec(t, "exit 3"))
	if p.Pid() <= 0 || p.Handle() == "" {
		t.Fatalf("pid %d handle %q", p.Pid(), p.Handle())
	}
	e := waitExit(t, p)
	if e.Code != 3 || e.Signal != 0 || e.Unknown || !e.Failed() || e.At.IsZero() {
		t.Fatalf("exit = %+v, want code 3", e)
	}
	p = start(t, d, shSpec(t, "exit 0"))
	if e := waitExit(t, p); e.Failed() {
		t.Fatalf("exit = %+v, want success", e)
	}
}

func TestKilledBySignal(t *testing.T) {
	d := newDriver(t, Config{})
	p := start(t, d, shSpec(t, "kill -KILL $$"))
	if e := waitExit(t, p); e.Code != -1 || e.Signal != syscall.SIGKILL || e.Unknown {
		t.Fatalf("exit = %+v, want SIGKILL", e)
	}

	spec := shSpec(t, "echo ready; exec sleep 30")
	p = start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if e := waitExit(t, p); e.Signal != syscall.SIGTERM {
		t.Fatalf("exit = %+v, want SIGTERM", e)
	}
	if err := p.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("signal after exit: %v, want os.ErrProcessDone", err)
	}
}

func TestEnvIsExactlySpecEnv(t *testing.T) {
	t.Setenv("FLAME_AGENT_ONLY", "leak")
	d := newDriver(t, Config{})
	spec := shSpec(t, "")
	spec.Image = "exec:/usr/bin/env"
	spec.Cmd = nil
	spec.Env = map[string]string{"FLY_APP_NAME": "demo", "B": "two words", "A": "1=1"}
	waitExit(t, start(t, d, spec))
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Split(strings.TrimSpace(string(b)), "\n")
	slices.Sort(got)
	want := []string{"A=1=1", "B=two words", "FLY_APP_NAME=demo"}
	if !slices.Equal(got, want) {
		t.Fatalf("env = %q, want %q", got, want)
	}
}

func TestOutputAppendedToLog(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, "echo out; echo err >&2; echo out2; pwd")
	if err := os.WriteFile(spec.LogPath, []byte("old\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	waitExit(t, start(t, d, spec))
	b, err := os.ReadFile(spec.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if want := "old\nout\nerr\nout2\n" + spec.Dir + "\n"; string(b) != want {
		t.Fatalf("log = %q, want %q", b, want)
	}
}

func TestStopEscalatesToKill(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, `trap "" TERM; echo ready; exec sleep 30`)
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	const timeout = 200 * time.Millisecond
	t0 := time.Now()
	e, err := p.Stop(context.Background(), syscall.SIGTERM, timeout)
	took := time.Since(t0)
	if err != nil {
		t.Fatal(err)
	}
	if e.Signal != syscall.SIGKILL {
		t.Fatalf("exit = %+v, want SIGKILL", e)
	}
	if took < timeout || took > timeout+2*time.Second {
		t.Fatalf("stop took %v with timeout %v", took, timeout)
	}
	// Stopping again returns the same exit.
	e2, err := p.Stop(context.Background(), syscall.SIGTERM, timeout)
	if err != nil || e2 != e {
		t.Fatalf("second stop = %+v, %v; want %+v", e2, err, e)
	}
}

func TestStopGraceful(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, `trap "echo bye; exit 0" INT; echo ready; while :; do sleep 0.01; done`)
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	e, err := p.Stop(context.Background(), syscall.SIGINT, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if e.Failed() {
		t.Fatalf("exit = %+v, want a clean exit", e)
	}
}

func TestSignalReachesGroup(t *testing.T) {
	d := newDriver(t, Config{})
	// The shell survives SIGTERM (its trap), so it only exits once the
	// signal has also ended the sleep it waits for.
	spec := shSpec(t, `sleep 30 & trap "echo got-term" TERM; echo ready; wait; wait; exit 7`)
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if e := waitExit(t, p); e.Code != 7 {
		t.Fatalf("exit = %+v, want 7", e)
	}
	waitLog(t, spec.LogPath, "got-term")
}

func TestLeftoversKilledWithMain(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, `sleep 30 & echo $! > child; echo ready`)
	p := start(t, d, spec)
	waitExit(t, p)
	b, err := os.ReadFile(filepath.Join(spec.Dir, "child"))
	if err != nil {
		t.Fatal(err)
	}
	var child int
	fmt.Sscan(string(b), &child)
	// The sleep is the shell's child and got SIGKILL; once its parent
	// is gone init reaps it.
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := hostproc.ReadStat(child)
		if errors.Is(err, hostproc.ErrNoProcess) || (err == nil && (st.State == 'Z' || st.Pgrp != p.Pid())) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("child %d still runs: %+v", child, st)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestAdoptInSameProcess(t *testing.T) {
	d1 := newDriver(t, Config{})
	spec := shSpec(t, "echo ready; exec sleep 30")
	p1 := start(t, d1, spec)
	waitLog(t, spec.LogPath, "ready")

	// While d1 watches it, another driver shares d1's watcher.
	d2 := newDriver(t, Config{})
	p2, err := d2.Adopt(context.Background(), spec, p1.Handle())
	if err != nil {
		t.Fatal(err)
	}
	if p2.Pid() != p1.Pid() || p2.Handle() != p1.Handle() {
		t.Fatalf("adopted %d %q, want %d %q", p2.Pid(), p2.Handle(), p1.Pid(), p1.Handle())
	}

	// d1 stops watching, as if its agent had died; a new driver adopts
	// the workload and, since it is still this process's child, learns
	// its exact status.
	d1.Close()
	d3 := newDriver(t, Config{})
	p3, err := d3.Adopt(context.Background(), spec, p1.Handle())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kill(t, p3) })
	if err := p3.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if e := waitExit(t, p3); e.Signal != syscall.SIGTERM || e.Unknown {
		t.Fatalf("exit = %+v, want SIGTERM", e)
	}
	if _, err := d3.Adopt(context.Background(), spec, p1.Handle()); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt after exit: %v, want ErrGone", err)
	}
}

func TestAdoptAfterAgentDied(t *testing.T) {
	dir := t.TempDir()
	logPath := filepath.Join(dir, "log")
	cmd := osexec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		"FLAME_EXEC_TEST_AGENT=1",
		"FLAME_EXEC_TEST_LOG="+logPath,
		`FLAME_EXEC_TEST_SCRIPT=trap "echo term; exit 0" TERM; echo ready; while :; do sleep 0.01; done`,
	)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("agent: %v", err)
	}
	handle := strings.TrimSpace(string(out))
	waitLog(t, logPath, "ready")

	d := newDriver(t, Config{})
	spec := driver.Spec{MachineID: "agent", LogPath: logPath}
	p, err := d.Adopt(context.Background(), spec, handle)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { kill(t, p) })
	select {
	case <-p.Done():
		t.Fatal("adopted workload reported done while running")
	default:
	}
	e, err := p.Stop(context.Background(), syscall.SIGTERM, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !e.Unknown || e.Code != -1 || !e.Failed() {
		t.Fatalf("exit = %+v, want unknown", e)
	}
	waitLog(t, logPath, "term")
	if _, err := d.Adopt(context.Background(), spec, handle); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt after exit: %v, want ErrGone", err)
	}
}

func TestAdoptRejectsGoneAndReused(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, "echo ready; exec sleep 30")
	p := start(t, d, spec)
	h, err := hostproc.ParseHandle(p.Handle())
	if err != nil {
		t.Fatal(err)
	}
	reused := h
	reused.Start++
	otherBoot := h
	otherBoot.BootID = "00000000-0000-0000-0000-000000000000"
	done := start(t, d, shSpec(t, "exit 0"))
	waitExit(t, done)

	for name, handle := range map[string]string{
		"reused pid": reused.String(),
		"other boot": otherBoot.String(),
		"exited":     done.Handle(),
		"garbage":    "not-a-handle",
		"no pid":     fmt.Sprintf("%d:1:%s", 1<<22+1, h.BootID),
	} {
		if _, err := d.Adopt(context.Background(), spec, handle); !errors.Is(err, driver.ErrGone) {
			t.Errorf("%s: adopt %q: %v, want ErrGone", name, handle, err)
		}
	}
}

func TestPrepareImages(t *testing.T) {
	dir := t.TempDir()
	notExec := filepath.Join(dir, "notexec")
	if err := os.WriteFile(notExec, []byte("#!/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := newDriver(t, Config{Images: map[string][]string{
		"demo":                  {"/bin/echo", "demo"},
		"demo:v2":               {"/bin/echo", "v2"},
		"registry:5000/app":     {"/bin/echo", "app"},
		"named":                 {"sh", "-c"},
		"broken":                {"/nonexistent/program"},
		"empty":                 {},
		"flame/notexec":         {notExec},
		"flame/dir":             {dir},
		"relative/needs-no-dir": {"echo"},
	}})
	good := []struct {
		image      string
		entrypoint []string
		cmd        []string
		want       []string
	}{
		{"demo", nil, nil, []string{"/bin/echo", "demo"}},
		{"demo:v1", nil, []string{"x"}, []string{"/bin/echo", "demo", "x"}},
		{"demo:v2", nil, nil, []string{"/bin/echo", "v2"}},
		{"demo@sha256:abcd", nil, nil, []string{"/bin/echo", "demo"}},
		{"registry:5000/app:latest", nil, nil, []string{"/bin/echo", "app"}},
		{"exec:/bin/sh", nil, []string{"-c", "true"}, []string{"/bin/sh", "-c", "true"}},
		{"demo", []string{"/bin/sh", "-c"}, []string{"echo hi"}, []string{"/bin/sh", "-c", "echo hi"}},
	}
	for _, tc := range good {
		spec := driver.Spec{Image: tc.image, Entrypoint: tc.entrypoint, Cmd: tc.cmd}
		if _, err := d.Prepare(context.Background(), spec); err != nil {
			t.Errorf("prepare %q: %v", tc.image, err)
			continue
		}
		got, _ := d.argv(spec)
		if !slices.Equal(got, tc.want) {
			t.Errorf("argv of %q = %q, want %q", tc.image, got, tc.want)
		}
	}
	// A bare name is found in the machine's PATH.
	spec := driver.Spec{Image: "named", Env: map[string]string{"PATH": "/nonexistent:/bin"}}
	if got, err := d.argv(spec); err != nil || got[0] != "/bin/sh" {
		t.Errorf("argv of named = %q, %v", got, err)
	}

	bad := []driver.Spec{
		{Image: ""},
		{Image: "unknown"},
		{Image: "unknown:v1"},
		{Image: "exec:bin/sh"},
		{Image: "exec:/nonexistent"},
		{Image: "exec:" + notExec},
		{Image: "exec:" + dir},
		{Image: "broken"},
		{Image: "empty"},
		{Image: "flame/notexec"},
		{Image: "flame/dir"},
		{Image: "named", Env: map[string]string{"PATH": "/nonexistent"}},
		{Image: "demo", Entrypoint: []string{"no-such-program-anywhere"}},
	}
	for _, spec := range bad {
		_, err := d.Prepare(context.Background(), spec)
		if !errors.Is(err, driver.ErrImage) {
			t.Errorf("prepare %+v: %v, want ErrImage", spec, err)
			continue
		}
		if !strings.Contains(err.Error(), fmt.Sprintf("%q", spec.Image)) {
			t.Errorf("error %q does not name image %q", err, spec.Image)
		}
		spec.LogPath = filepath.Join(dir, "log")
		if _, err := d.Start(context.Background(), spec); !errors.Is(err, driver.ErrImage) {
			t.Errorf("start %+v: %v, want ErrImage", spec, err)
		}
	}
}

func TestExec(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, "")
	spec.Env["FOO"] = "bar"
	ctx := context.Background()

	res, err := d.Exec(ctx, spec, []string{"sh", "-c", `echo $FOO; echo err >&2; pwd; cat; exit 4`}, []byte("in"))
	if err != nil {
		t.Fatal(err)
	}
	if want := "bar\n" + spec.Dir + "\nin"; string(res.Stdout) != want || string(res.Stderr) != "err\n" || res.ExitCode != 4 {
		t.Fatalf("exec = %d %q %q, want 4 %q %q", res.ExitCode, res.Stdout, res.Stderr, want, "err\n")
	}

	res, err = d.Exec(ctx, spec, []string{"no-such-command"}, nil)
	if err != nil || res.ExitCode != 127 || len(res.Stderr) == 0 {
		t.Fatalf("exec missing = %+v, %v; want 127", res, err)
	}

	res, err = d.Exec(ctx, spec, []string{"sh", "-c", "kill -TERM $$"}, nil)
	if err != nil || res.ExitCode != 128+int(syscall.SIGTERM) {
		t.Fatalf("exec killed = %+v, %v; want %d", res, err, 128+int(syscall.SIGTERM))
	}

	if _, err := d.Exec(ctx, spec, nil, nil); err == nil {
		t.Fatal("exec of an empty command succeeded")
	}

	tctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	t0 := time.Now()
	_, err = d.Exec(tctx, spec, []string{"sh", "-c", "sleep 30 & sleep 30"}, nil)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("exec past deadline: %v, want DeadlineExceeded", err)
	}
	if took := time.Since(t0); took > 5*time.Second {
		t.Fatalf("exec past deadline took %v", took)
	}
}

// TestCleanupIdempotent: Cleanup of a workload that ran succeeds, and so
// does Cleanup again, and neither leaves the workload findable.
func TestCleanupIdempotent(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, "echo ready; exec sleep 30")
	p := start(t, d, spec)
	waitLog(t, spec.LogPath, "ready")
	kill(t, p)
	for i := range 2 {
		if err := d.Cleanup(context.Background(), spec); err != nil {
			t.Fatalf("cleanup %d: %v", i+1, err)
		}
		if _, err := d.Adopt(context.Background(), spec, p.Handle()); !errors.Is(err, driver.ErrGone) {
			t.Fatalf("cleanup %d: adopt = %v, want ErrGone", i+1, err)
		}
	}
}

// BenchmarkStart measures Start of a program that exits at once, from the
// call to its return (the program has been executed).
func BenchmarkStart(b *testing.B) {
	d := New(Config{}, nil)
	defer d.Close()
	dir := b.TempDir()
	spec := driver.Spec{
		MachineID: "bench",
		Dir:       dir,
		LogPath:   filepath.Join(dir, "log"),
		Image:     "exec:/bin/true",
		Env:       map[string]string{"PATH": "/usr/bin:/bin"},
	}
	ctx := context.Background()
	for b.Loop() {
		p, err := d.Start(ctx, spec)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		<-p.Done()
		b.StartTimer()
	}
}

func TestAdoptUnrecorded(t *testing.T) {
	d := newDriver(t, Config{})
	spec := shSpec(t, "echo ready; exec sleep 30")
	spec.InstanceID = "01J0000000000000000000000A"
	spec.Env["FLY_MACHINE_VERSION"] = fmt.Sprintf("%s-%d", spec.InstanceID, time.Now().UnixNano())
	p := start(t, d, spec)
	// Between fork and exec a child still shows its parent's environment;
	// an agent recovering later never looks that early.
	waitLog(t, spec.LogPath, "ready")

	// A driver that shares nothing with the one that started it but /proc
	// finds the workload by its identity variables.
	d2 := New(Config{}, nil)
	defer d2.Close()
	got, err := d2.Adopt(context.Background(), spec, "")
	if err != nil || got.Handle() != p.Handle() {
		t.Fatalf("adopt by env = %v, %v; want %s", got, err, p.Handle())
	}

	kill(t, p)
	if _, err := d2.Adopt(context.Background(), spec, ""); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt after exit: %v, want ErrGone", err)
	}
	empty := spec
	empty.Env = nil
	empty.Dir = t.TempDir()
	if _, err := d2.Adopt(context.Background(), empty, ""); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt with nothing to go by: %v, want ErrGone", err)
	}
	for range 2 {
		if err := d.Cleanup(context.Background(), spec); err != nil {
			t.Fatal(err)
		}
	}
}
