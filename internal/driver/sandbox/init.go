package sandbox

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// InitCommand is the hidden subcommand of the flame binary that runs
// InitMain; the driver starts its sandboxes' init as
// "<Config.InitPath> sandbox-init run".
const InitCommand = "sandbox-init"

// statusFile, in statusDir of the machine's directory, is where the init
// writes how the workload ended. statusDir belongs to the sandbox's root
// (the first id of its range): the init, root of its user namespace only,
// can write nowhere else on the host. Sandboxes started before user
// namespaces wrote statusFile in the machine's directory itself.
const (
	statusFile = "sandbox-exit.json"
	statusDir  = "sandbox-exit"
)

// sigKillAll asks the init to SIGKILL every process of the sandbox, so that
// it can still record the workload's end (a SIGKILL of the init itself
// would not let it). It is the last real-time signal, which the init
// catches and the workload never receives from outside.
const sigKillAll = syscall.Signal(64)

// forwarded are the signals the init passes on to the workload's process
// group. SIGURG is the Go runtime's own and cannot be forwarded; SIGKILL
// and SIGSTOP cannot be caught (the driver turns SIGKILL into sigKillAll).
var forwarded = []os.Signal{
	unix.SIGHUP, unix.SIGINT, unix.SIGQUIT, unix.SIGUSR1, unix.SIGUSR2,
	unix.SIGTERM, unix.SIGALRM, unix.SIGWINCH, unix.SIGCONT, unix.SIGTSTP,
	unix.SIGTTIN, unix.SIGTTOU, unix.SIGPWR, unix.SIGXCPU, unix.SIGXFSZ,
	unix.SIGVTALRM, unix.SIGPROF, unix.SIGABRT, unix.SIGPIPE,
}

// message is one line of the protocol between the driver and a starting
// init, over the socket the init finds as fd 3. The driver sends the
// machine's files (see initFiles), then "config",
// the init answers "ready" once the root filesystem is in place, the driver
// sends "go" once the network is up, and the init answers "started" with the
// workload's pid (in the sandbox) or "error". The socket is closed then:
// nothing ties a running sandbox to the agent.
type message struct {
	Op     string      `json:"op"`
	Config *initConfig `json:"config,omitempty"`
	Pid    int         `json:"pid,omitempty"`
	Err    string      `json:"err,omitempty"`
	// Exec is the command of an "exec" request; Code and Signal how it
	// "exited" (see execinit.go).
	Exec   *launch `json:"exec,omitempty"`
	Code   int     `json:"code,omitempty"`
	Signal int     `json:"signal,omitempty"`
	// Port is the port of a "dial" request (rootless sandboxes, see
	// rootless_net.go).
	Port int `json:"port,omitempty"`
}

// initConfig is what the init needs to set up the sandbox from inside.
type initConfig struct {
	Dir      string `json:"dir"`      // machine directory
	Hostname string `json:"hostname"` // the machine id
	Hosts    string `json:"hosts"`    // /etc/hosts
	Resolv   string `json:"resolv"`   // /etc/resolv.conf
	OOMFile  string `json:"oom_file"` // cgroup file counting OOM kills
	Launch   launch `json:"launch"`
	// Rootless is set for a sandbox of a driver run by a user other
	// than root (see rootless.go).
	Rootless *rootlessInit `json:"rootless,omitempty"`
}

// exitStatus is the status file's content.
type exitStatus struct {
	Code      int   `json:"code"`   // -1 when killed by a signal
	Signal    int   `json:"signal"` // 0 if none
	OOMKilled bool  `json:"oom_killed"`
	At        int64 `json:"at"` // Unix nanoseconds
}

// InitMain is the sandbox's init, PID 1 of its namespaces: it finishes the
// sandbox from inside (mounts, pivot_root, hostname), starts the workload,
// forwards signals to it, reaps orphans and, when the workload ends, kills
// what is left, writes the exit status to the machine's directory and
// returns the exit code for the process. The flame binary runs it as the
// hidden "sandbox-init" command; args are the command's arguments.
func InitMain(args []string) int {
	if len(args) == 2 && args[0] == probeArg {
		return probeRootlessMain(args[1])
	}
	if len(args) != 1 || args[0] != "run" {
		fmt.Fprintln(os.Stderr, "usage: flame sandbox-init run (started by the sandbox driver)")
		return 2
	}
	code, err := runInit()
	if err != nil {
		fmt.Fprintf(os.Stderr, "flame sandbox-init: %v\n", err)
	}
	return code
}

func runInit() (int, error) {
	unix.Close(initExeFd)
	f := os.NewFile(3, "sync")
	if f == nil {
		return 1, errors.New("no sync socket on fd 3")
	}
	fc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return 1, fmt.Errorf("sync socket: %w", err)
	}
	conn, ok := fc.(*net.UnixConn)
	if !ok {
		return 1, errors.New("sync socket: not a unix socket")
	}
	defer conn.Close()
	// Nothing done here may propagate back to the host. Done before the
	// configuration comes, with all else that does not depend on it: a
	// spare init waits for it for a while.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return 1, fmt.Errorf("make mounts private: %w", err)
	}
	// Signals are caught from now on, and passed on once the workload
	// runs.
	sigs := make(chan os.Signal, 128)
	signal.Notify(sigs, append(forwarded, unix.SIGCHLD, sigKillAll)...)
	ln := newLauncher()
	earlyLink()
	fds, err := recvFiles(conn, numInitFiles)
	if err != nil {
		if errors.Is(err, io.EOF) {
			return 1, nil // a spare the driver discarded
		}
		return 1, fmt.Errorf("read config: %w", err)
	}
	// The machine's log becomes the init's stdout and stderr, and the
	// workload's.
	for _, to := range []int{1, 2} {
		if err := unix.Dup3(fds[fileLog], to, 0); err != nil {
			return 1, fmt.Errorf("log: %w", err)
		}
	}
	unix.Close(fds[fileLog])
	rd := bufio.NewReader(conn)
	var m message
	if err := readMessage(rd, &m); err != nil || m.Op != "config" || m.Config == nil {
		return 1, fmt.Errorf("read config: %v (op %q)", err, m.Op)
	}
	cfg := m.Config
	fail := func(err error) (int, error) {
		_ = writeMessage(conn, message{Op: "error", Err: err.Error()})
		return 1, err
	}
	// Handles on the host's side, which pivot_root hides.
	dirfd, oomfd := fds[fileDir], fds[fileOOM]
	execLn, err := net.FileListener(os.NewFile(uintptr(fds[fileExec]), execSocket))
	if err != nil {
		return fail(fmt.Errorf("exec socket: %w", err))
	}
	unix.Close(fds[fileExec])
	if cfg.Rootless != nil {
		// fileRoot is the flattened image: the root filesystem is
		// made here, in the init's own namespaces.
		if fds[fileRoot], err = setupRootless(cfg.Rootless, fds[fileRoot]); err != nil {
			return fail(err)
		}
	}
	if err := setupRoot(cfg, fds[fileRoot]); err != nil {
		return fail(err)
	}
	if err := writeMessage(conn, message{Op: "ready"}); err != nil {
		return 1, err
	}
	if err := readMessage(rd, &m); err != nil || m.Op != "go" {
		// The driver gave up (or died) before the workload started.
		return 1, fmt.Errorf("wait for go: %v (op %q)", err, m.Op)
	}

	pid, err := ln.start(cfg.Launch)
	if err != nil {
		return fail(err)
	}
	if err := writeMessage(conn, message{Op: "started", Pid: pid}); err != nil {
		// The driver is gone; the workload runs all the same.
		fmt.Fprintf(os.Stderr, "flame sandbox-init: report start: %v\n", err)
	}
	conn.Close()
	go serveExec(execLn.(*net.UnixListener))
	// The OOM killer must never choose the init: the workload was
	// started with the default score and keeps it. Lowering the score
	// takes CAP_SYS_RESOURCE, which some hosts withhold even from root;
	// there the driver reads the OOM count itself (see collect).
	if err := writeFile("/proc/self/oom_score_adj", "-1000"); err != nil && !errors.Is(err, unix.EACCES) && !errors.Is(err, unix.EPERM) {
		fmt.Fprintf(os.Stderr, "flame sandbox-init: oom_score_adj: %v\n", err)
	}
	return supervise(pid, sigs, dirfd, oomfd), nil
}

func readMessage(rd *bufio.Reader, m *message) error {
	line, err := rd.ReadBytes('\n')
	if err != nil {
		if errors.Is(err, io.EOF) && len(line) == 0 {
			return io.EOF
		}
		return err
	}
	*m = message{}
	return json.Unmarshal(line, m)
}

func writeMessage(w io.Writer, m message) error {
	b, err := json.Marshal(m)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// keptCaps are the capabilities a workload running as root keeps in its
// bounding set: those container runtimes grant by default, minus CAP_MKNOD
// (device nodes could reach the host's disks: no device cgroup is set up)
// and CAP_NET_RAW (raw sockets forge packets on the host's bridge).
var keptCaps = []int{
	unix.CAP_CHOWN, unix.CAP_DAC_OVERRIDE, unix.CAP_FOWNER, unix.CAP_FSETID,
	unix.CAP_KILL, unix.CAP_SETGID, unix.CAP_SETUID, unix.CAP_SETPCAP,
	unix.CAP_NET_BIND_SERVICE, unix.CAP_SYS_CHROOT,
	unix.CAP_AUDIT_WRITE, unix.CAP_SETFCAP,
}

// dropBoundingCaps removes every capability but keep from the calling
// thread's bounding set, which a process it forks inherits. The thread must
// be locked and never unlocked.
func dropBoundingCaps(keep []int) error {
	for c := 0; c < 64; c++ {
		kept := false
		for _, k := range keep {
			if k == c {
				kept = true
				break
			}
		}
		if kept {
			continue
		}
		err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0)
		if errors.Is(err, unix.EINVAL) {
			return nil // past the kernel's last capability
		}
		if err != nil {
			return fmt.Errorf("drop capability %d: %w", c, err)
		}
	}
	return nil
}

// launcher starts the workload from a thread made ready before the
// machine's configuration comes: locked, with the reduced capability
// bounding set, so that starting the workload creates no thread (which on
// cgroup v1 can wait for a cgroup move elsewhere on the host).
type launcher struct {
	req chan launch
	res chan launched
}

type launched struct {
	pid int
	err error
}

func newLauncher() *launcher {
	ln := &launcher{req: make(chan launch), res: make(chan launched, 1)}
	go func() {
		// The thread's bounding set changes for good; it exits with
		// this goroutine because it stays locked.
		runtime.LockOSThread()
		err := dropBoundingCaps(keptCaps)
		l := <-ln.req
		if err != nil {
			ln.res <- launched{err: err}
			return
		}
		pid, err := forkWorkload(l)
		ln.res <- launched{pid: pid, err: err}
	}()
	return ln
}

// start starts l as the init's child in a session of its own; it can be
// called once.
func (ln *launcher) start(l launch) (int, error) {
	ln.req <- l
	r := <-ln.res
	return r.pid, r.err
}

// forkWorkload starts l, from the launcher's thread, once the init is in
// the machine's cgroup: the thread takes a cgroup namespace rooted there
// and the seccomp filter, and the workload inherits both.
func forkWorkload(l launch) (int, error) {
	if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
		return 0, fmt.Errorf("cgroup namespace: %w", err)
	}
	if err := installSeccomp(); err != nil {
		return 0, err
	}
	devnull, err := os.Open("/dev/null")
	if err != nil {
		return 0, err
	}
	defer devnull.Close()
	p, err := os.StartProcess(l.Path, l.Argv, &os.ProcAttr{
		Dir:   l.Dir,
		Env:   l.Env,
		Files: []*os.File{devnull, os.Stdout, os.Stderr},
		Sys: &syscall.SysProcAttr{
			Setsid:     true,
			Credential: credential(l),
		},
	})
	if err != nil {
		return 0, fmt.Errorf("start %s: %w", l.Path, err)
	}
	pid := p.Pid
	_ = p.Release() // reaped by supervise with wait4(-1)
	return pid, nil
}

// supervise forwards signals to the workload and reaps every child until
// the workload (pid main) ends; then it kills the rest, records the status
// and returns the init's exit code.
func supervise(main int, sigs <-chan os.Signal, dirfd, oomfd int) int {
	for sig := range sigs {
		s, _ := sig.(syscall.Signal)
		switch s {
		case unix.SIGCHLD:
			ws, done := reap(main)
			if !done {
				continue
			}
			// Everything else in the namespace goes with the workload.
			_ = unix.Kill(-1, unix.SIGKILL)
			for {
				var w unix.WaitStatus
				pid, err := unix.Wait4(-1, &w, 0, nil)
				if err != nil && !errors.Is(err, unix.EINTR) {
					break
				}
				if pid > 0 {
					execExited(pid, w)
				}
			}
			st := statusOf(ws, oomKills(oomfd) > 0)
			if err := writeStatus(dirfd, st); err != nil {
				fmt.Fprintf(os.Stderr, "flame sandbox-init: write exit status: %v\n", err)
			}
			if st.Signal != 0 {
				return 128 + st.Signal
			}
			return st.Code
		case sigKillAll:
			_ = unix.Kill(-1, unix.SIGKILL)
		default:
			if err := unix.Kill(-main, s); errors.Is(err, unix.ESRCH) {
				_ = unix.Kill(main, s)
			}
		}
	}
	return 1
}

// reap collects every exited child; done reports whether main was one.
func reap(main int) (ws unix.WaitStatus, done bool) {
	for {
		var w unix.WaitStatus
		pid, err := unix.Wait4(-1, &w, unix.WNOHANG, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil || pid <= 0 {
			return ws, done
		}
		if pid == main {
			ws, done = w, true
		} else {
			execExited(pid, w)
		}
	}
}

func statusOf(ws unix.WaitStatus, oom bool) exitStatus {
	st := exitStatus{Code: -1, OOMKilled: oom, At: time.Now().UnixNano()}
	switch {
	case ws.Exited():
		st.Code = ws.ExitStatus()
	case ws.Signaled():
		st.Signal = int(ws.Signal())
	}
	return st
}

// oomKills reads the OOM kill counter of the sandbox's cgroup.
func oomKills(fd int) int64 {
	if fd < 0 {
		return 0
	}
	buf := make([]byte, 4096)
	n, err := unix.Pread(fd, buf, 0)
	if err != nil || n <= 0 {
		return 0
	}
	v, _ := readCounter(buf[:n], "oom_kill")
	return v
}

// writeStatus replaces the status file in the directory dirfd refers to.
func writeStatus(dirfd int, st exitStatus) error {
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	tmp := statusFile + ".tmp"
	fd, err := unix.Openat(dirfd, tmp, unix.O_WRONLY|unix.O_CREAT|unix.O_TRUNC|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	_, err = unix.Write(fd, b)
	if cerr := unix.Close(fd); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return unix.Renameat(dirfd, tmp, dirfd, statusFile)
}
