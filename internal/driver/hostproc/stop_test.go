package hostproc

import (
	"bufio"
	"context"
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"
)

// child is a real process started by the test, watched through a pidfd.
type child struct {
	cmd   *exec.Cmd
	pidfd *os.File
	done  chan struct{} // closed when the process has ended (not reaped)
}

// startChild runs script under sh and returns once it printed "ready", so
// its signal dispositions are in place.
func startChild(t *testing.T, script string) *child {
	t.Helper()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Fatalf("the stop tests need a shell: %v", err)
	}
	cmd := exec.Command(sh, "-c", script)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pidfd, err := OpenChildPidfd(cmd.Process.Pid)
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatal(err)
	}
	c := &child{cmd: cmd, pidfd: pidfd, done: make(chan struct{})}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if WaitPidfd(pidfd) == nil {
			close(c.done)
		}
	}()
	t.Cleanup(func() {
		_ = SignalPidfd(pidfd, syscall.SIGKILL)
		pidfd.Close() // ends the watcher if the process did not end
		wg.Wait()
		cmd.Wait()
	})
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "ready\n" {
		t.Fatalf("child said %q, %v; want ready", line, err)
	}
	return c
}

// status reaps the ended child and returns how it ended.
func (c *child) status(t *testing.T) syscall.WaitStatus {
	t.Helper()
	err := c.cmd.Wait()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("wait: %v", err)
	}
	return c.cmd.ProcessState.Sys().(syscall.WaitStatus)
}

// steps is the usual two-step stop of c, recording what was sent.
func (c *child) steps(timeout time.Duration, sent *[]syscall.Signal) []Step {
	send := func(sig syscall.Signal) func() error {
		return func() error {
			*sent = append(*sent, sig)
			return SignalPidfd(c.pidfd, sig)
		}
	}
	return []Step{{Send: send(syscall.SIGTERM), Wait: timeout}, {Send: send(syscall.SIGKILL)}}
}

func TestStopKillsWhatIgnoresTheSignal(t *testing.T) {
	c := startChild(t, `trap "" TERM; echo ready; exec sleep 600`)
	const timeout = 300 * time.Millisecond
	var sent []syscall.Signal
	start := time.Now()
	if err := Stop(context.Background(), c.done, c.steps(timeout, &sent)...); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	ws := c.status(t)
	if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("child ended with %v, want killed by SIGKILL", ws)
	}
	if len(sent) != 2 || sent[0] != syscall.SIGTERM || sent[1] != syscall.SIGKILL {
		t.Fatalf("sent %v, want SIGTERM then SIGKILL", sent)
	}
	// The kill comes only once the timeout has passed.
	if took < timeout {
		t.Fatalf("stopped after %v, before the %v timeout", took, timeout)
	}
}

func TestStopDoesNotKillWhatEndsOnTheSignal(t *testing.T) {
	c := startChild(t, `echo ready; exec sleep 600`)
	// A timeout no run reaches: the child must end on SIGTERM alone. The
	// context only keeps a broken Stop from hanging the test.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	var sent []syscall.Signal
	if err := Stop(ctx, c.done, c.steps(time.Hour, &sent)...); err != nil {
		t.Fatal(err)
	}
	ws := c.status(t)
	if !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Fatalf("child ended with %v, want killed by SIGTERM", ws)
	}
	if len(sent) != 1 {
		t.Fatalf("sent %v, want SIGTERM alone", sent)
	}
}

func TestStopOfAnEndedProcessSendsNothing(t *testing.T) {
	c := startChild(t, `echo ready; exec sleep 600`)
	if err := SignalPidfd(c.pidfd, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-c.done
	var sent []syscall.Signal
	if err := Stop(context.Background(), c.done, c.steps(time.Hour, &sent)...); err != nil || len(sent) != 0 {
		t.Fatalf("stop = %v, sent %v; want nil and nothing sent", err, sent)
	}
	if !Ended(c.pidfd) {
		t.Fatal("Ended = false for an ended process")
	}
	c.status(t)
	if err := SignalPidfd(c.pidfd, syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("signal of a reaped process = %v, want os.ErrProcessDone", err)
	}
}

func TestStopEndsWithTheContext(t *testing.T) {
	c := startChild(t, `trap "" TERM; echo ready; exec sleep 600`)
	ctx, cancel := context.WithCancel(context.Background())
	steps := []Step{
		{Send: func() error {
			cancel() // the context ends while the process ignores the signal
			return SignalPidfd(c.pidfd, syscall.SIGTERM)
		}, Wait: time.Hour},
		{Send: func() error { t.Error("escalated after the context ended"); return nil }},
	}
	if err := Stop(ctx, c.done, steps...); !errors.Is(err, context.Canceled) {
		t.Fatalf("stop = %v, want context.Canceled", err)
	}
	if Ended(c.pidfd) {
		t.Fatal("the process ended though only ignored signals were sent")
	}
}

func TestStopReportsAFailedSend(t *testing.T) {
	c := startChild(t, `echo ready; exec sleep 600`)
	boom := errors.New("boom")
	err := Stop(context.Background(), c.done, Step{Send: func() error { return boom }, Wait: time.Hour}, Step{Send: func() error {
		t.Error("escalated after a failed send")
		return nil
	}})
	if !errors.Is(err, boom) {
		t.Fatalf("stop = %v, want the send's error", err)
	}
}
