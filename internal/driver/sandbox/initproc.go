package sandbox

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// initProc is an init the driver started, in new namespaces, waiting for its
// configuration on its start socket.
type initProc struct {
	h     handle
	pidfd *os.File
	conn  *net.UnixConn
}

// startInit starts an init that knows nothing of any machine yet: stdio on
// /dev/null, its start socket on fd 3, root of a new user namespace whose
// ids are the host's from ids on (see idmap.go). On cgroup v2 it is born in
// the cgroup called cgroup (clone3 with CLONE_INTO_CGROUP); on v1, and with
// no cgroup, it is born in the calling thread's cgroups.
func (d *Driver) startInit(cgroup string, ids uint32) (_ *initProc, err error) {
	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(pair[0]), "sync"), os.NewFile(uintptr(pair[1]), "sync")
	defer theirs.Close()
	fc, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return nil, fmt.Errorf("sync socket: %w", err)
	}
	conn := fc.(*net.UnixConn)
	defer func() {
		if err != nil {
			conn.Close()
		}
	}()
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		return nil, err
	}
	defer devnull.Close()
	// The maps are written before the init runs its first instruction
	// (it waits for them), so that it executes as root of its namespace,
	// with every capability there; setgroups stays allowed for the
	// workload's supplementary groups.
	sys := &syscall.SysProcAttr{
		Setsid:                     true,
		Cloneflags:                 cloneFlags,
		UidMappings:                idMappings(ids),
		GidMappings:                idMappings(ids),
		GidMappingsEnableSetgroups: true,
		// Root of the namespace (the range's first id outside), not
		// the host's root, which the namespace does not map.
		Credential: &syscall.Credential{Uid: 0, Gid: 0},
	}
	if d.rl != nil {
		// Rootless: the caller's ids, root inside, are all there is;
		// an unprivileged user may map no more and must deny
		// setgroups. The init is root of its namespace without
		// changing ids.
		sys.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: d.rl.uid, Size: 1}}
		sys.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: d.rl.gid, Size: 1}}
		sys.GidMappingsEnableSetgroups, sys.Credential = false, nil
	}
	if d.cg.v2 && cgroup != "" {
		cgdir, err := d.cg.openDir(cgroup)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer cgdir.Close()
		sys.UseCgroupFD, sys.CgroupFD = true, int(cgdir.Fd())
	}
	// The program is executed through a descriptor the host's root
	// opened: the init, root of its namespace only, may not search the
	// directories on the way to it.
	exe, err := os.OpenFile(d.cfg.InitPath, unix.O_PATH, 0)
	if err != nil {
		return nil, fmt.Errorf("init %s: %w", d.cfg.InitPath, err)
	}
	defer exe.Close()
	proc, err := os.StartProcess("/proc/self/fd/"+strconv.Itoa(initExeFd), []string{d.cfg.InitPath, InitCommand, "run"}, &os.ProcAttr{
		Dir:   "/",
		Env:   []string{"GOMAXPROCS=1"},
		Files: []*os.File{devnull, devnull, devnull, theirs, exe},
		Sys:   sys,
	})
	if err != nil {
		return nil, fmt.Errorf("start init %s: %w", d.cfg.InitPath, err)
	}
	pid := proc.Pid
	proc.Release() // reaped through the children registry
	st, serr := hostproc.ReadStat(pid)
	h := handle{Pid: pid, Start: st.Start, BootID: d.bootID}
	children.Store(pid, h)
	pidfd, perr := openInit(h)
	if err := errors.Join(serr, perr); err != nil {
		// Unexpected for our own unreaped child; do not leave it.
		unix.Kill(pid, unix.SIGKILL)
		var ws unix.WaitStatus
		unix.Wait4(pid, &ws, 0, nil)
		children.Delete(pid)
		return nil, fmt.Errorf("watch init: %w", err)
	}
	return &initProc{h: h, pidfd: pidfd, conn: conn}, nil
}

// initExeFd is where an init finds its own program, which it was executed
// from (and closes).
const initExeFd = 4

// alive reports whether the init still runs.
func (ip *initProc) alive() bool {
	return !hostproc.Ended(ip.pidfd)
}

// kill kills an init that is not (or no longer) a running sandbox's — its
// namespaces go with it — reaps it and closes what the driver holds of it.
func (ip *initProc) kill() {
	_ = hostproc.SignalPidfd(ip.pidfd, unix.SIGKILL)
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(ip.h.Pid, &ws, 0, nil)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	children.CompareAndDelete(ip.h.Pid, ip.h)
	ip.pidfd.Close()
	ip.conn.Close()
}

// initFiles are the descriptors the driver sends an init with its
// configuration, in this order: the init's stdout and stderr (the machine's
// log), the machine's directory (where the status file goes), the cgroup
// file counting OOM kills, the root filesystem as a detached mount
// (open_tree), which the init attaches in its own mount namespace, and the
// socket it listens on for commands to run (see execinit.go). So an init
// needs no host path, and a spare made before the machine's root
// filesystem was mounted gets it all the same.
const (
	fileLog = iota
	fileDir
	fileOOM
	fileRoot
	fileExec
	numInitFiles
)

// sendFiles sends fds to the init, with one byte of data.
func sendFiles(conn *net.UnixConn, fds []int) error {
	_, _, err := conn.WriteMsgUnix([]byte{0}, unix.UnixRights(fds...), nil)
	return err
}

// recvFiles receives the n descriptors sendFiles sent; they are
// close-on-exec.
func recvFiles(conn *net.UnixConn, n int) ([]int, error) {
	fds, err := recvSomeFiles(conn, n)
	if err == nil && len(fds) != n {
		closeFds(fds)
		return nil, fmt.Errorf("receive files: got %d, want %d", len(fds), n)
	}
	return fds, err
}

// recvSomeFiles receives at most n descriptors, with their one byte.
func recvSomeFiles(conn *net.UnixConn, n int) ([]int, error) {
	var b [1]byte
	oob := make([]byte, unix.CmsgSpace(n*4))
	got, oobn, _, _, err := conn.ReadMsgUnix(b[:], oob)
	if err != nil {
		return nil, err
	}
	if got == 0 && oobn == 0 {
		return nil, io.EOF
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		return nil, fmt.Errorf("receive files: %w", err)
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			return nil, fmt.Errorf("receive files: %w", err)
		}
		fds = append(fds, got...)
	}
	if len(fds) > n {
		closeFds(fds)
		return nil, fmt.Errorf("receive files: got %d, want at most %d", len(fds), n)
	}
	return fds, nil
}

// openInitFiles opens what sendFiles sends for a machine whose root
// filesystem is the detached mount tree, which it takes (closed on error).
func openInitFiles(logPath, dir, oomFile string, tree int) (fds []int, err error) {
	defer func() {
		if err != nil {
			closeFds(fds)
			fds = nil
		}
	}()
	open := func(path string, flags int, mode uint32) error {
		fd, err := unix.Open(path, flags|unix.O_CLOEXEC, mode)
		if err != nil {
			return &os.PathError{Op: "open", Path: path, Err: err}
		}
		fds = append(fds, fd)
		return nil
	}
	defer func() {
		if tree >= 0 {
			unix.Close(tree)
		}
	}()
	if err := open(logPath, unix.O_WRONLY|unix.O_APPEND|unix.O_CREAT, 0o600); err != nil {
		return fds, err
	}
	if err := open(filepath.Join(dir, statusDir), unix.O_PATH|unix.O_DIRECTORY, 0); err != nil {
		return fds, err
	}
	if err := open(oomFile, unix.O_RDONLY, 0); err != nil {
		return fds, err
	}
	fds = append(fds, tree)
	tree = -1
	ln, err := listenExec(dir)
	if err != nil {
		return fds, err
	}
	return append(fds, ln), nil
}

// listenExec makes the socket an init listens on for commands, in the
// machine's directory dir (replacing one an earlier run left), and returns
// it. The name goes through the directory's descriptor, so that a long
// machine directory does not pass the 108 bytes a socket address holds.
func listenExec(dir string) (int, error) {
	d, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return -1, err
	}
	defer d.Close()
	name := fmt.Sprintf("/proc/self/fd/%d/%s", d.Fd(), execSocket)
	if err := unix.Unlink(name); err != nil && !errors.Is(err, unix.ENOENT) {
		return -1, fmt.Errorf("exec socket: %w", err)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("exec socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: name}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("exec socket: %w", err)
	}
	if err := unix.Listen(fd, 16); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("exec socket: %w", err)
	}
	return fd, nil
}

// dialExec connects to the exec socket of the sandbox whose machine
// directory is dir.
func dialExec(dir string) (*net.UnixConn, error) {
	d, err := os.OpenFile(dir, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	return net.DialUnix("unix", nil, &net.UnixAddr{Name: fmt.Sprintf("/proc/self/fd/%d/%s", d.Fd(), execSocket), Net: "unix"})
}

func closeFds(fds []int) {
	for _, fd := range fds {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}
