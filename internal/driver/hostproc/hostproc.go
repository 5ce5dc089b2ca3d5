// Package hostproc names host processes durably — pid, start time and boot
// id, so a reused pid is never mistaken for the process — and opens pidfds
// that are verified to refer to them. Drivers record a Handle and adopt the
// process again after an agent restart. It also holds what the drivers do
// alike with a process: signal it and wait for its end through its pidfd,
// and stop it by escalation (Stop: ask, wait, then force).
package hostproc

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"
)

// Handle identifies a process durably: its pid, its start time in clock
// ticks since boot (field 22 of /proc/<pid>/stat) and the kernel's boot id.
// It prints as "pid:start:bootid".
type Handle struct {
	Pid    int
	Start  uint64
	BootID string
}

func (h Handle) String() string {
	return strconv.Itoa(h.Pid) + ":" + strconv.FormatUint(h.Start, 10) + ":" + h.BootID
}

// ParseHandle reads what Handle.String wrote.
func ParseHandle(s string) (Handle, error) {
	pidStr, rest, ok1 := strings.Cut(s, ":")
	startStr, bootID, ok2 := strings.Cut(rest, ":")
	if !ok1 || !ok2 {
		return Handle{}, fmt.Errorf("bad handle %q: want pid:starttime:bootid", s)
	}
	pid, err := strconv.Atoi(pidStr)
	if err != nil || pid <= 0 {
		return Handle{}, fmt.Errorf("bad handle %q: bad pid", s)
	}
	start, err := strconv.ParseUint(startStr, 10, 64)
	if err != nil {
		return Handle{}, fmt.Errorf("bad handle %q: bad start time", s)
	}
	return Handle{Pid: pid, Start: start, BootID: bootID}, nil
}

// Stat is what drivers need of /proc/<pid>/stat.
type Stat struct {
	State byte   // field 3: R, S, D, Z, X, ...
	Pgrp  int    // field 5
	Start uint64 // field 22, clock ticks since boot
}

// ErrNoProcess means /proc has no such pid.
var ErrNoProcess = errors.New("no such process")

// ReadStat reads /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return Stat{}, ErrNoProcess
		}
		return Stat{}, err
	}
	return ParseStat(b)
}

// ParseStat decodes the contents of /proc/<pid>/stat. The command name
// (field 2) is in parentheses and may itself hold spaces and parentheses, so
// fields are counted from the last ')'.
func ParseStat(b []byte) (Stat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, errors.New("parse /proc stat: no command name")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3.
	if len(f) < 20 || len(f[0]) != 1 {
		return Stat{}, errors.New("parse /proc stat: too few fields")
	}
	pgrp, err := strconv.Atoi(f[5-3])
	if err != nil {
		return Stat{}, fmt.Errorf("parse /proc stat: pgrp: %w", err)
	}
	start, err := strconv.ParseUint(f[22-3], 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("parse /proc stat: starttime: %w", err)
	}
	return Stat{State: f[0][0], Pgrp: pgrp, Start: start}, nil
}

// BootID returns the kernel's boot id, or "" when it cannot be read.
func BootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// OpenPidfd opens a non-blocking pidfd for h's process and checks, after
// opening it, that the process is still the one h names (same start time,
// not a zombie): the pidfd then refers to it and not to a later process that
// reused the pid. A process that is gone is driver.ErrGone.
func OpenPidfd(h Handle) (*os.File, error) {
	fd, err := unix.PidfdOpen(h.Pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, fmt.Errorf("pid %d: %w", h.Pid, driver.ErrGone)
	}
	if err != nil {
		return nil, fmt.Errorf("pidfd_open %d: %w", h.Pid, err)
	}
	pidfd := os.NewFile(uintptr(fd), "pidfd")
	st, err := ReadStat(h.Pid)
	switch {
	case errors.Is(err, ErrNoProcess):
		err = fmt.Errorf("pid %d: %w", h.Pid, driver.ErrGone)
	case err != nil:
	case st.Start != h.Start:
		err = fmt.Errorf("pid %d was reused: %w", h.Pid, driver.ErrGone)
	case st.State == 'Z' || st.State == 'X':
		err = fmt.Errorf("pid %d has exited: %w", h.Pid, driver.ErrGone)
	}
	if err != nil {
		pidfd.Close()
		return nil, err
	}
	return pidfd, nil
}

// ExecResult turns the outcome of running cmd (err from its Run or Wait)
// into what a driver's Exec answers: a non-zero exit is a result, not an
// error (128+n when killed by signal n, 126 when it could not run); only a
// context that ended is an error.
func ExecResult(ctx context.Context, machineID string, cmd *exec.Cmd, err error, stdout, stderr []byte) (driver.ExecResult, error) {
	res := driver.ExecResult{Stdout: stdout, Stderr: stderr}
	if ctxErr := ctx.Err(); ctxErr != nil {
		res.ExitCode = -1
		return res, fmt.Errorf("exec %s %s: %w", machineID, cmd.Args[0], ctxErr)
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		res.ExitCode = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			res.ExitCode = 128 + int(ws.Signal())
		}
	case errors.Is(err, exec.ErrWaitDelay):
		// The command exited but something it started kept the output
		// open; what it printed is kept.
		res.ExitCode = cmd.ProcessState.ExitCode()
	default:
		res.ExitCode = 126
		res.Stderr = fmt.Appendf(res.Stderr, "%s: %v\n", cmd.Args[0], err)
	}
	return res, nil
}
