package exec

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/hostproc"
)

// children holds, by pid, the workloads this OS process started and still
// watches, so that Adopt from another Driver in the same process shares the
// watcher instead of racing it to reap the child.
var children sync.Map // int → *process

func lookupChild(h handle) *process {
	v, ok := children.Load(h.Pid)
	if !ok {
		return nil
	}
	p := v.(*process)
	if p.h != h {
		return nil
	}
	return p
}

// process is a workload the driver watches, started or adopted.
type process struct {
	d     *Driver
	h     handle
	hstr  string
	proc  *os.Process // the child this driver started; nil when adopted
	pidfd *os.File    // non-blocking, so it waits in the runtime poller

	mu        sync.Mutex
	ended     bool // the main process ended: its group must not be signalled
	abandoned bool // the driver closed: no longer watched
	done      chan struct{}
	exit      driver.Exit // written before done is closed
}

var _ driver.Process = (*process)(nil)

// watchChild starts watching proc, just started by d.
func (d *Driver) watchChild(proc *os.Process) (*process, error) {
	st, err := hostproc.ReadStat(proc.Pid)
	if err != nil {
		return nil, fmt.Errorf("read start time of pid %d: %w", proc.Pid, err)
	}
	pidfd, err := hostproc.OpenChildPidfd(proc.Pid)
	if err != nil {
		return nil, err
	}
	h := handle{Pid: proc.Pid, Start: st.Start, BootID: d.bootID}
	p := &process{
		d:     d,
		h:     h,
		hstr:  h.String(),
		proc:  proc,
		pidfd: pidfd,
		done:  make(chan struct{}),
	}
	if err := d.track(p); err != nil {
		p.pidfd.Close()
		return nil, err
	}
	children.Store(proc.Pid, p)
	go p.watch()
	return p, nil
}

// watchAdopted starts watching the live workload h names, or fails with
// driver.ErrGone.
func (d *Driver) watchAdopted(h handle) (*process, error) {
	pidfd, err := hostproc.OpenPidfd(h)
	if err != nil {
		return nil, err
	}
	p := &process{
		d:     d,
		h:     h,
		hstr:  h.String(),
		pidfd: pidfd,
		done:  make(chan struct{}),
	}
	if err := d.track(p); err != nil {
		pidfd.Close()
		return nil, err
	}
	go p.watch()
	return p, nil
}

func (p *process) Handle() string        { return p.hstr }
func (p *process) Pid() int              { return p.h.Pid }
func (p *process) Done() <-chan struct{} { return p.done }

func (p *process) Exit() driver.Exit {
	select {
	case <-p.done:
		return p.exit
	default:
		return driver.Exit{}
	}
}

// Signal delivers sig to the workload's process group. Once the workload has
// ended it fails with an error wrapping os.ErrProcessDone.
func (p *process) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.ended:
		return fmt.Errorf("signal pid %d: %w", p.h.Pid, os.ErrProcessDone)
	case p.abandoned:
		return fmt.Errorf("signal pid %d: %w", p.h.Pid, ErrClosed)
	case p.proc == nil && hostproc.Ended(p.pidfd):
		// An adopted workload that ended: its pid is not reserved
		// for us any more.
		return fmt.Errorf("signal pid %d: %w", p.h.Pid, os.ErrProcessDone)
	}
	err := unix.Kill(-p.h.Pid, sig)
	if errors.Is(err, unix.ESRCH) {
		// The main process left its group: signal it alone.
		err = hostproc.SignalPidfd(p.pidfd, sig)
	}
	if err != nil {
		return fmt.Errorf("signal pid %d: %w", p.h.Pid, err)
	}
	return nil
}

// Stop delivers sig (SIGTERM when 0) to the workload, waits up to timeout
// for it to end, then kills its group with SIGKILL and waits again. Stopping
// a workload that already ended returns its Exit.
func (p *process) Stop(ctx context.Context, sig syscall.Signal, timeout time.Duration) (driver.Exit, error) {
	if sig == 0 {
		sig = unix.SIGTERM
	}
	err := hostproc.Stop(ctx, p.done,
		hostproc.Step{
			Send: func() error { return p.Signal(sig) },
			Wait: timeout,
			OnTimeout: func() {
				p.d.logger.Debug("stop timed out, killing", "pid", p.h.Pid, "signal", sig, "timeout", timeout)
			},
		},
		hostproc.Step{Send: func() error { return p.Signal(unix.SIGKILL) }},
	)
	if err != nil {
		return driver.Exit{}, fmt.Errorf("stop pid %d: %w", p.h.Pid, err)
	}
	return p.exit, nil
}

// watch waits in the runtime poller for the pidfd to become readable, which
// it does when the main process ends, then collects the exit.
func (p *process) watch() {
	defer p.d.wg.Done()
	if err := hostproc.WaitPidfd(p.pidfd); err != nil {
		// abandon closed the pidfd.
		return
	}
	p.finish()
}

func (p *process) finish() {
	p.mu.Lock()
	if p.abandoned {
		p.mu.Unlock()
		return
	}
	p.ended = true
	var exit driver.Exit
	if p.proc != nil {
		// Kill what is left of the group before reaping: the zombie
		// main process keeps the group's id from being reused.
		_ = unix.Kill(-p.h.Pid, unix.SIGKILL)
		state, err := p.proc.Wait()
		exit = exitOf(state, err)
	} else {
		exit = p.finishAdopted()
	}
	exit.At = time.Now()
	p.pidfd.Close()
	p.mu.Unlock()

	children.CompareAndDelete(p.h.Pid, p)
	p.d.untrack(p)
	p.exit = exit
	close(p.done)
	p.d.logger.Debug("exited", "pid", p.h.Pid, "code", exit.Code, "signal", exit.Signal, "unknown", exit.Unknown)
}

// finishAdopted ends the group of an adopted workload whose main process
// ended, and learns its status when it is this process's child.
func (p *process) finishAdopted() driver.Exit {
	unknown := driver.Exit{Code: -1, Unknown: true}
	var info unix.Siginfo
	err := hostproc.ControlPidfd(p.pidfd, func(fd int) error {
		return unix.Waitid(unix.P_PIDFD, fd, &info, unix.WEXITED|unix.WNOHANG|unix.WNOWAIT, nil)
	})
	if err == nil && info.Signo != 0 {
		// Our child, still a zombie: its id is reserved until reaped.
		_ = unix.Kill(-p.h.Pid, unix.SIGKILL)
		var ws syscall.WaitStatus
		wpid, err := syscall.Wait4(p.h.Pid, &ws, syscall.WNOHANG, nil)
		if err != nil || wpid != p.h.Pid {
			return unknown
		}
		return exitOfStatus(ws)
	}
	// Not our child. While the zombie is still there or the pid is free,
	// a group with this id can only be the workload's leftovers.
	st, err := hostproc.ReadStat(p.h.Pid)
	if errors.Is(err, hostproc.ErrNoProcess) || (err == nil && st.Start == p.h.Start) {
		_ = unix.Kill(-p.h.Pid, unix.SIGKILL)
	}
	return unknown
}

// abandon stops watching p and leaves the workload running.
func (p *process) abandon() {
	p.mu.Lock()
	if !p.ended && !p.abandoned {
		p.abandoned = true
		p.pidfd.Close()
		if p.proc != nil {
			_ = p.proc.Release()
		}
	}
	p.mu.Unlock()
	children.CompareAndDelete(p.h.Pid, p)
	p.d.untrack(p)
}

func exitOf(state *os.ProcessState, err error) driver.Exit {
	if err != nil || state == nil {
		return driver.Exit{Code: -1, Unknown: true}
	}
	ws, ok := state.Sys().(syscall.WaitStatus)
	if !ok {
		return driver.Exit{Code: state.ExitCode()}
	}
	return exitOfStatus(ws)
}

func exitOfStatus(ws syscall.WaitStatus) driver.Exit {
	switch {
	case ws.Exited():
		return driver.Exit{Code: ws.ExitStatus()}
	case ws.Signaled():
		return driver.Exit{Code: -1, Signal: ws.Signal()}
	default:
		return driver.Exit{Code: -1, Unknown: true}
	}
}
