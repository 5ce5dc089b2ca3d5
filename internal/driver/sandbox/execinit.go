package sandbox

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Commands run by Exec are the init's children, as the workload is: the
// driver hands each sandbox's init a listening socket (execSocket, in the
// machine's directory, which only the host's root reaches), and the init
// forks every command it is asked for from a thread made for it, exactly
// as it forked the workload. So a command is born in every namespace of the
// sandbox (its user and mount namespaces included, which no thread of a
// multithreaded host process could join), in the machine's cgroup whatever
// the cgroup version (no clone3 needed: the init is there already), in a
// cgroup namespace rooted there, with the workload's capability bounding
// set and under the same seccomp filter. The socket outlives the agent: a
// later driver execs in a sandbox it adopted.
//
// The protocol, one connection per command: the driver sends the command's
// stdin, stdout and stderr (with one byte), then an "exec" message with the
// command's launch; the init answers "started" with the command's pid (in
// the sandbox) or "error", and "exited" with its status once it ends. A
// connection that closes before then kills the command's process group.

// execSocket, in the machine's directory, is where an init listens for
// commands.
const execSocket = "sandbox-exec.sock"

// execStdio is how many descriptors go with an exec request.
const execStdio = 3

// execs are the running commands, by pid: supervise's reaper hands each
// command's status to the connection that asked for it.
var execs = struct {
	sync.Mutex
	byPid map[int]chan unix.WaitStatus
}{byPid: map[int]chan unix.WaitStatus{}}

// execExited passes the status of a reaped child to the Exec that started
// it; it reports whether the child was a command.
func execExited(pid int, ws unix.WaitStatus) bool {
	execs.Lock()
	ch, ok := execs.byPid[pid]
	delete(execs.byPid, pid)
	execs.Unlock()
	if ok {
		ch <- ws
	}
	return ok
}

// serveExec accepts the driver's commands on ln until the init ends.
func serveExec(ln *net.UnixListener) {
	for {
		conn, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		go serveOneExec(conn)
	}
}

func serveOneExec(conn *net.UnixConn) {
	defer conn.Close()
	fds, err := recvSomeFiles(conn, execStdio)
	if err != nil {
		return
	}
	rd := bufio.NewReader(conn)
	var m message
	err = readMessage(rd, &m)
	if err == nil && m.Op == "dial" && len(fds) == 0 {
		serveDial(conn, m.Port)
		return
	}
	if err == nil && m.Op == "link" && len(fds) == 0 {
		serveLink(conn)
		return
	}
	if err != nil || m.Op != "exec" || m.Exec == nil || len(m.Exec.Argv) == 0 || len(fds) != execStdio {
		closeFds(fds)
		_ = writeMessage(conn, message{Op: "error", Err: fmt.Sprintf("bad exec request (op %q)", m.Op)})
		return
	}
	ch := make(chan unix.WaitStatus, 1)
	pid, err := forkCommand(*m.Exec, fds, ch)
	if err != nil {
		_ = writeMessage(conn, message{Op: "error", Err: err.Error()})
		return
	}
	if err := writeMessage(conn, message{Op: "started", Pid: pid}); err != nil {
		_ = unix.Kill(-pid, unix.SIGKILL)
		_ = unix.Kill(pid, unix.SIGKILL)
		<-ch
		return
	}
	// The driver says nothing more: a read that ends means it gave up.
	gone := make(chan struct{})
	go func() {
		var b [1]byte
		conn.Read(b[:])
		close(gone)
	}()
	var ws unix.WaitStatus
	select {
	case ws = <-ch:
	case <-gone:
		_ = unix.Kill(-pid, unix.SIGKILL)
		_ = unix.Kill(pid, unix.SIGKILL)
		<-ch
		return
	}
	st := statusOf(ws, false)
	_ = writeMessage(conn, message{Op: "exited", Code: st.Code, Signal: st.Signal})
}

// forkCommand starts l with stdio fds (which it closes) from a thread of its own that took a
// cgroup namespace, the workload's bounding set and the seccomp filter (a
// thread cannot shed them: it is locked and ends with its goroutine). Its
// status goes to ch.
func forkCommand(l launch, fds []int, ch chan unix.WaitStatus) (int, error) {
	type result struct {
		pid int
		err error
	}
	files := make([]*os.File, len(fds))
	for i, fd := range fds {
		files[i] = os.NewFile(uintptr(fd), "stdio")
	}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	res := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
			res <- result{err: fmt.Errorf("cgroup namespace: %w", err)}
			return
		}
		if err := dropBoundingCaps(keptCaps); err != nil {
			res <- result{err: err}
			return
		}
		if err := installSeccomp(); err != nil {
			res <- result{err: err}
			return
		}
		// Held until the pid is recorded: the reaper may see the
		// command end before that.
		execs.Lock()
		p, err := os.StartProcess(l.Path, l.Argv, &os.ProcAttr{
			Dir:   l.Dir,
			Env:   l.Env,
			Files: files,
			Sys: &syscall.SysProcAttr{
				Setsid:     true,
				Credential: credential(l),
			},
		})
		if err == nil {
			execs.byPid[p.Pid] = ch
			_ = p.Release()
		}
		execs.Unlock()
		if err != nil {
			res <- result{err: fmt.Errorf("start %s: %w", l.Path, err)}
			return
		}
		res <- result{pid: p.Pid}
	}()
	r := <-res
	return r.pid, r.err
}
