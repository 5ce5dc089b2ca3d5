package hostproc

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// OpenChildPidfd opens a non-blocking pidfd for pid without checking whom
// it names: for a child of this process that is not reaped yet, whose pid
// cannot have been reused. Any other process is opened with OpenPidfd.
func OpenChildPidfd(pid int) (*os.File, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	return os.NewFile(uintptr(fd), "pidfd"), nil
}

// SignalPidfd sends sig to the process behind pidfd. A process that is gone
// (reaped) is os.ErrProcessDone; a closed pidfd is an error too.
func SignalPidfd(pidfd *os.File, sig syscall.Signal) error {
	err := ControlPidfd(pidfd, func(fd int) error { return unix.PidfdSendSignal(fd, sig, nil, 0) })
	if errors.Is(err, unix.ESRCH) {
		return os.ErrProcessDone
	}
	return err
}

// ControlPidfd calls fn with pidfd's descriptor, which stays open meanwhile.
func ControlPidfd(pidfd *os.File, fn func(fd int) error) error {
	rc, err := pidfd.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// Ended reports, without blocking, whether the process behind pidfd has
// ended. A pidfd that cannot be polled (closed) counts as ended.
func Ended(pidfd *os.File) bool {
	ended := true
	if err := ControlPidfd(pidfd, func(fd int) error { ended = PidfdReadable(fd); return nil }); err != nil {
		return true
	}
	return ended
}

// WaitPidfd blocks, in the runtime poller and not on a thread, until the
// process behind pidfd ends. It fails when pidfd is closed meanwhile (which
// is how a watcher is told to stop) or its read deadline passes.
func WaitPidfd(pidfd *os.File) error {
	rc, err := pidfd.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Read(func(fd uintptr) bool { return PidfdReadable(int(fd)) })
}

// PidfdReadable reports, without blocking, whether the process behind the
// pidfd fd has ended: a pidfd becomes readable when its process exits.
func PidfdReadable(fd int) bool {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		n, err := unix.Poll(fds, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return err == nil && n > 0 && fds[0].Revents&unix.POLLIN != 0
	}
}
