package fake

import (
	"context"
	"errors"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/flamehq/flame/internal/driver"
)

func spec(id string) driver.Spec {
	return driver.Spec{MachineID: id, Image: "demo", Env: map[string]string{"A": "1"}}
}

func TestStartExitCrash(t *testing.T) {
	d := New()
	ctx := context.Background()
	if d.Process("m1") != nil {
		t.Fatal("process before any start")
	}
	if _, err := d.Prepare(ctx, spec("m1")); err != nil {
		t.Fatal(err)
	}
	pr, err := d.Start(ctx, spec("m1"))
	if err != nil {
		t.Fatal(err)
	}
	p := d.Process("m1")
	if p == nil || p.Handle() != pr.Handle() || p.Pid() != pr.Pid() || !p.Running() || p.Spec().Env["A"] != "1" {
		t.Fatalf("process = %+v", p)
	}
	p.Exit(3)
	p.Exit(4) // no effect
	<-pr.Done()
	if e := pr.Exit(); e.Code != 3 || e.Signal != 0 || e.At.IsZero() {
		t.Fatalf("exit = %+v", e)
	}

	pr2, _ := d.Start(ctx, spec("m1"))
	p2 := d.Process("m1")
	if p2 == p || p2.Handle() == p.Handle() {
		t.Fatal("second start returned the first process")
	}
	p2.Crash(syscall.SIGSEGV)
	if e := pr2.Exit(); e.Signal != syscall.SIGSEGV || e.Code != -1 || !e.Failed() {
		t.Fatalf("exit = %+v", e)
	}
	pr3, _ := d.Start(ctx, spec("m1"))
	d.Process("m1").OOM()
	if e := pr3.Exit(); !e.OOMKilled {
		t.Fatalf("exit = %+v", e)
	}
	if got := len(d.Processes("m1")); got != 3 {
		t.Fatalf("%d processes, want 3", got)
	}
	if c := d.Counts("m1"); c != (Counts{Prepare: 1, Start: 3}) {
		t.Fatalf("counts = %+v", c)
	}
}

func TestSignalAndStop(t *testing.T) {
	d := New()
	ctx := context.Background()
	pr, _ := d.Start(ctx, spec("m1"))
	if err := pr.Signal(0); err != nil {
		t.Fatal(err)
	}
	e, err := pr.Stop(ctx, syscall.SIGINT, time.Hour)
	if err != nil || e.Signal != syscall.SIGINT {
		t.Fatalf("stop = %+v, %v", e, err)
	}
	if got := d.Process("m1").Signals(); !slices.Equal(got, []syscall.Signal{syscall.SIGINT}) {
		t.Fatalf("signals = %v", got)
	}
	if err := pr.Signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("signal after exit: %v", err)
	}
	if e2, err := pr.Stop(ctx, syscall.SIGTERM, 0); err != nil || e2 != e {
		t.Fatalf("second stop = %+v, %v", e2, err)
	}
}

func TestStopEscalates(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := New()
		d.IgnoreStop("m1", true)
		ctx := context.Background()
		pr, _ := d.Start(ctx, spec("m1"))
		if err := pr.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		e, err := pr.Stop(ctx, syscall.SIGTERM, 5*time.Second)
		if err != nil || e.Signal != syscall.SIGKILL {
			t.Fatalf("stop = %+v, %v", e, err)
		}
		if took := time.Since(t0); took != 5*time.Second {
			t.Fatalf("stop took %v, want the timeout", took)
		}
		want := []syscall.Signal{syscall.SIGHUP, syscall.SIGTERM, syscall.SIGKILL}
		if got := d.Process("m1").Signals(); !slices.Equal(got, want) {
			t.Fatalf("signals = %v, want %v", got, want)
		}

		// A stop whose ctx ends first fails and leaves it running.
		d.IgnoreStop("m1", false)
		pr, _ = d.Start(ctx, spec("m1"))
		d.Process("m1").IgnoreSignals(true)
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if _, err := pr.Stop(cctx, syscall.SIGTERM, time.Minute); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("stop = %v, want DeadlineExceeded", err)
		}
		if !d.Process("m1").Running() {
			t.Fatal("stopped despite the ctx")
		}
	})
}

func TestFailures(t *testing.T) {
	d := New()
	ctx := context.Background()
	bad := spec("m1")
	bad.Image = "fake/bad-image:v1"
	if _, err := d.Prepare(ctx, bad); !errors.Is(err, driver.ErrImage) {
		t.Fatalf("prepare bad image: %v", err)
	}
	if _, err := d.Start(ctx, bad); !errors.Is(err, driver.ErrImage) {
		t.Fatalf("start bad image: %v", err)
	}

	boom := errors.New("boom")
	d.FailStart("m1", boom)
	if _, err := d.Start(ctx, spec("m1")); !errors.Is(err, boom) {
		t.Fatalf("start: %v, want boom", err)
	}
	if _, err := d.Start(ctx, spec("m2")); err != nil {
		t.Fatalf("other machine: %v", err)
	}
	d.FailStart("m1", nil)
	if _, err := d.Start(ctx, spec("m1")); err != nil {
		t.Fatal(err)
	}
	if c := d.Counts("m1"); c.Start != 3 || c.Prepare != 1 {
		t.Fatalf("counts = %+v", c)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := d.Start(cctx, spec("m3")); !errors.Is(err, context.Canceled) {
		t.Fatalf("start with ended ctx: %v", err)
	}
}

func TestAdoptAcrossAgents(t *testing.T) {
	d := New()
	ctx := context.Background()
	old, _ := d.Start(ctx, spec("m1"))
	handle := old.Handle()

	// A new agent with the same driver finds it by handle.
	adopted, err := d.Adopt(ctx, spec("m1"), handle)
	if err != nil {
		t.Fatal(err)
	}
	if adopted.Pid() != old.Pid() {
		t.Fatal("adopted another process")
	}
	if _, err := d.Adopt(ctx, spec("m2"), handle); err == nil || errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt by another machine: %v", err)
	}
	d.Process("m1").Exit(0)
	<-adopted.Done()
	if e := adopted.Exit(); e.Code != 0 || e.At.IsZero() {
		t.Fatalf("exit = %+v", e)
	}
	if _, err := d.Adopt(ctx, spec("m1"), handle); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt ended: %v", err)
	}
	if _, err := d.Adopt(ctx, spec("m1"), "fake-999"); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt unknown: %v", err)
	}
	if c := d.Counts("m1"); c.Adopt != 3 || c.Start != 1 {
		t.Fatalf("counts = %+v", c)
	}
}

func TestAdoptUnrecorded(t *testing.T) {
	d := New()
	ctx := context.Background()
	s1 := spec("m1")
	s1.InstanceID = "v1"
	d.Start(ctx, s1)
	d.Process("m1").Exit(1)
	d.Start(ctx, s1) // the agent died before recording this one
	s2 := s1
	s2.InstanceID = "v2"
	if _, err := d.Adopt(ctx, s2, ""); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt of another instance: %v", err)
	}
	pr, err := d.Adopt(ctx, s1, "")
	if err != nil || pr.Handle() != d.Process("m1").Handle() {
		t.Fatalf("adopt = %v, %v", pr, err)
	}
	d.Process("m1").Exit(0)
	if _, err := d.Adopt(ctx, s1, ""); !errors.Is(err, driver.ErrGone) {
		t.Fatalf("adopt after exit: %v", err)
	}
}

func TestExecAndCleanup(t *testing.T) {
	d := New()
	ctx := context.Background()
	res, err := d.Exec(ctx, spec("m1"), []string{"echo", "hi"}, nil)
	if err != nil || string(res.Stdout) != "echo hi\n" || res.ExitCode != 0 {
		t.Fatalf("default exec = %+v, %v", res, err)
	}
	d.SetExec("m1", func(command []string, stdin []byte) (driver.ExecResult, error) {
		return driver.ExecResult{ExitCode: 2, Stdout: stdin, Stderr: []byte(command[0])}, nil
	})
	res, err = d.Exec(ctx, spec("m1"), []string{"cat"}, []byte("in"))
	if err != nil || res.ExitCode != 2 || string(res.Stdout) != "in" || string(res.Stderr) != "cat" {
		t.Fatalf("exec = %+v, %v", res, err)
	}
	if _, err := d.Exec(ctx, spec("m1"), nil, nil); err == nil {
		t.Fatal("empty command accepted")
	}
	for range 2 {
		if err := d.Cleanup(ctx, spec("m1")); err != nil {
			t.Fatal(err)
		}
	}
	if c := d.Counts("m1"); c.Exec != 3 || c.Cleanup != 2 {
		t.Fatalf("counts = %+v", c)
	}
}

func TestWaitProcess(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := New()
		ctx := context.Background()
		got := make(chan *Proc, 2)
		go func() {
			p, err := d.WaitProcess(ctx, "m1", nil)
			if err != nil {
				t.Error(err)
			}
			got <- p
			p2, err := d.WaitProcess(ctx, "m1", p)
			if err != nil {
				t.Error(err)
			}
			got <- p2
		}()
		synctest.Wait()
		d.Start(ctx, spec("m2"))
		synctest.Wait()
		if len(got) != 0 {
			t.Fatal("woke for another machine")
		}
		d.Start(ctx, spec("m1"))
		p := <-got
		if p != d.Process("m1") {
			t.Fatal("wrong process")
		}
		d.Start(ctx, spec("m1"))
		if p2 := <-got; p2 == p || p2 != d.Process("m1") {
			t.Fatal("did not wait for the next process")
		}
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if _, err := d.WaitProcess(cctx, "m3", nil); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("wait = %v", err)
		}
	})
}

func TestConcurrentUse(t *testing.T) {
	d := New()
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			id := string(rune('a' + i))
			for range 50 {
				d.Prepare(ctx, spec(id))
				pr, err := d.Start(ctx, spec(id))
				if err != nil {
					t.Error(err)
					return
				}
				go d.Process(id).Exit(0)
				pr.Stop(ctx, syscall.SIGTERM, time.Second)
				d.Cleanup(ctx, spec(id))
			}
		})
	}
	wg.Wait()
	for i := range 8 {
		if c := d.Counts(string(rune('a' + i))); c != (Counts{Prepare: 50, Start: 50, Cleanup: 50}) {
			t.Fatalf("counts = %+v", c)
		}
	}
}
