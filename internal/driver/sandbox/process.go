package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/hostproc"
)

// killGrace is how long a sandbox gets to end after its init was asked to
// kill everything, before the init itself is killed.
const killGrace = 2 * time.Second

// children holds the inits this OS process started and has not reaped, by
// pid: only those may be waited for, and their pids cannot be reused until
// they are.
var children sync.Map // int → handle

// sandbox is a running sandbox the driver watches, through its init.
type sandbox struct {
	d     *Driver
	h     handle
	hstr  string
	dir   string   // the machine's directory, holding the status file
	oom   string   // the cgroup file counting OOM kills
	pidfd *os.File // non-blocking, waited on in the runtime poller

	mu        sync.Mutex
	fwd       *forwarder // a rootless sandbox's: closed before done is
	ended     bool
	abandoned bool
	done      chan struct{}
	exit      driver.Exit // written before done is closed
}

var _ driver.Process = (*sandbox)(nil)

// openInit opens a pidfd for the live init h names, or fails with
// driver.ErrGone.
func openInit(h handle) (*os.File, error) { return hostproc.OpenPidfd(h) }

// watch starts watching the init h names through pidfd.
func (d *Driver) watch(h handle, pidfd *os.File, dir, oomFile string) (*sandbox, error) {
	s := &sandbox{d: d, h: h, hstr: h.String(), dir: dir, oom: oomFile, pidfd: pidfd, done: make(chan struct{})}
	if err := d.track(s); err != nil {
		return nil, err
	}
	go s.run()
	return s, nil
}

func (s *sandbox) Handle() string        { return s.hstr }
func (s *sandbox) Pid() int              { return s.h.Pid }
func (s *sandbox) Done() <-chan struct{} { return s.done }

func (s *sandbox) Exit() driver.Exit {
	select {
	case <-s.done:
		return s.exit
	default:
		return driver.Exit{}
	}
}

// Signal delivers sig to the workload: the init forwards it to the
// workload's process group. SIGKILL makes the init kill every process of the
// sandbox. Once the sandbox has ended it fails with os.ErrProcessDone.
func (s *sandbox) Signal(sig syscall.Signal) error {
	if sig == unix.SIGKILL {
		sig = sigKillAll
	}
	return s.signalInit(sig)
}

func (s *sandbox) signalInit(sig syscall.Signal) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.ended:
		return fmt.Errorf("signal sandbox %d: %w", s.h.Pid, os.ErrProcessDone)
	case s.abandoned:
		return fmt.Errorf("signal sandbox %d: %w", s.h.Pid, ErrClosed)
	}
	if err := hostproc.SignalPidfd(s.pidfd, sig); err != nil {
		return fmt.Errorf("signal sandbox %d: %w", s.h.Pid, err)
	}
	return nil
}

// Stop delivers sig (SIGTERM when 0), waits up to timeout for the workload
// to end, then kills every process of the sandbox and waits again; an init
// that does not end within killGrace is killed itself. Stopping a sandbox
// that already ended returns its Exit.
func (s *sandbox) Stop(ctx context.Context, sig syscall.Signal, timeout time.Duration) (driver.Exit, error) {
	if sig == 0 {
		sig = unix.SIGTERM
	}
	err := hostproc.Stop(ctx, s.done,
		hostproc.Step{
			Send: func() error { return s.Signal(sig) },
			Wait: timeout,
			OnTimeout: func() {
				s.d.logger.Debug("stop timed out, killing", "pid", s.h.Pid, "signal", sig, "timeout", timeout)
			},
		},
		hostproc.Step{
			Send: func() error { return s.Signal(unix.SIGKILL) }, // sigKillAll: the init records the end
			Wait: killGrace,
			OnTimeout: func() {
				s.d.logger.Warn("sandbox init did not end, killing it", "pid", s.h.Pid)
			},
		},
		// The init itself; waits for as long as ctx allows.
		hostproc.Step{Send: func() error { return s.signalInit(unix.SIGKILL) }},
	)
	if err != nil {
		return driver.Exit{}, fmt.Errorf("stop sandbox %d: %w", s.h.Pid, err)
	}
	return s.exit, nil
}

// run waits in the runtime poller for the pidfd to become readable, which
// it does when the init has ended, then collects the exit.
func (s *sandbox) run() {
	defer s.d.wg.Done()
	if err := hostproc.WaitPidfd(s.pidfd); err != nil {
		return // abandon closed the pidfd
	}
	s.mu.Lock()
	if s.abandoned {
		s.mu.Unlock()
		return
	}
	s.ended = true
	exit := s.collect()
	s.pidfd.Close()
	fwd := s.fwd
	s.mu.Unlock()
	if fwd != nil {
		// An ended machine's ports refuse once Done is closed.
		s.d.dropForwarder(fwd)
	}

	s.d.untrack(s)
	s.exit = exit
	close(s.done)
	s.d.logger.Debug("sandbox ended", "pid", s.h.Pid, "code", exit.Code, "signal", exit.Signal, "oom", exit.OOMKilled, "unknown", exit.Unknown)
}

// collect reaps the init if this process started it and reads the exit
// status the init recorded. Without a record (the init itself was killed,
// or failed before the workload ran) the init's own status stands in,
// when this process can know it, and the cgroup tells whether the OOM
// killer struck (it may have chosen the init).
func (s *sandbox) collect() driver.Exit {
	exit := driver.Exit{Code: -1, Unknown: true}
	if v, ok := children.Load(s.h.Pid); ok && v.(handle) == s.h {
		var ws unix.WaitStatus
		if pid, err := unix.Wait4(s.h.Pid, &ws, unix.WNOHANG, nil); err == nil && pid == s.h.Pid {
			children.CompareAndDelete(s.h.Pid, s.h)
			switch {
			case ws.Exited():
				exit = driver.Exit{Code: ws.ExitStatus()}
			case ws.Signaled():
				exit = driver.Exit{Code: -1, Signal: ws.Signal()}
			}
		}
	}
	if st, ok := readStatus(s.dir); ok {
		exit = driver.Exit{Code: st.Code, Signal: syscall.Signal(st.Signal), OOMKilled: st.OOMKilled}
		if exit.Signal != 0 {
			exit.Code = -1
		}
	} else if b, err := os.ReadFile(s.oom); err == nil {
		if n, _ := readCounter(b, "oom_kill"); n > 0 {
			exit.OOMKilled = true
		}
	}
	exit.At = time.Now()
	return exit
}

func readStatus(dir string) (exitStatus, bool) {
	b, err := os.ReadFile(filepath.Join(dir, statusDir, statusFile))
	if errors.Is(err, os.ErrNotExist) {
		b, err = os.ReadFile(filepath.Join(dir, statusFile)) // started before user namespaces
	}
	if err != nil {
		return exitStatus{}, false
	}
	var st exitStatus
	if json.Unmarshal(b, &st) != nil {
		return exitStatus{}, false
	}
	return st, true
}

// abandon stops watching: the sandbox keeps running and Done never closes.
func (s *sandbox) abandon() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ended {
		return
	}
	s.abandoned = true
	s.pidfd.Close() // wakes run
}
