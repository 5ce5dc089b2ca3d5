package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	osexec "os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// maxExecOutput caps what Exec keeps of each of stdout and stderr.
const maxExecOutput = 1 << 20

// execNamespaces are the namespaces Exec joins. The mount namespace cannot
// be joined by a multithreaded process: the command is chrooted into the
// sandbox's root (/proc/<init>/root) instead, which shows the same tree.
var execNamespaces = []struct {
	name string
	flag int
}{
	{"ipc", unix.CLONE_NEWIPC},
	{"uts", unix.CLONE_NEWUTS},
	{"net", unix.CLONE_NEWNET},
	{"pid", unix.CLONE_NEWPID},
}

// execCaps are the capabilities an Exec'd command may keep: the workload's,
// minus CAP_SYS_CHROOT, which would let it out of its chroot into the host's
// mount namespace.
var execCaps = func() []int {
	var out []int
	for _, c := range keptCaps {
		if c != unix.CAP_SYS_CHROOT {
			out = append(out, c)
		}
	}
	return out
}()

// Exec runs command inside spec's running sandbox: in its namespaces, root
// filesystem and cgroup, with the workload's environment, directory and
// user. A command that runs and fails is a result with its exit code, not
// an error; one that cannot be found exits 127, one killed by a signal
// 128+signal. The error is for a bad request, a sandbox that does not run,
// or an expired ctx.
func (d *Driver) Exec(ctx context.Context, spec driver.Spec, command []string, stdin []byte) (driver.ExecResult, error) {
	if len(command) == 0 {
		return driver.ExecResult{}, fmt.Errorf("exec %s: empty command", spec.MachineID)
	}
	st, err := readState(spec.Dir)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: machine not running: %w", spec.MachineID, driver.ErrGone)
	}
	h, err := hostproc.ParseHandle(st.Handle)
	if err != nil || h.BootID != d.bootID {
		return driver.ExecResult{}, fmt.Errorf("exec %s: machine not running: %w", spec.MachineID, driver.ErrGone)
	}
	pidfd, err := openInit(h)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: machine not running: %w", spec.MachineID, err)
	}
	defer pidfd.Close()

	rootPath := "/proc/" + strconv.Itoa(h.Pid) + "/root"
	root, err := os.OpenFile(rootPath, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: %w", spec.MachineID, err)
	}
	defer root.Close()
	env, err := workloadEnv(h.Pid)
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: machine not running: %w: %w", spec.MachineID, err, driver.ErrGone)
	}
	pathEnv := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv = v
		}
	}
	prog, err := lookProgram(command[0], st.Launch.Dir, pathEnv, func(p string) error { return executableInRoot(int(root.Fd()), p) })
	if err != nil {
		return driver.ExecResult{ExitCode: 127, Stderr: fmt.Appendf(nil, "%v\n", err)}, nil
	}
	// The init must still be the one the namespaces were opened for.
	if hostproc.Ended(pidfd) {
		return driver.ExecResult{}, fmt.Errorf("exec %s: machine not running: %w", spec.MachineID, driver.ErrGone)
	}

	var stdout, stderr cappedBuffer
	cmd := &osexec.Cmd{
		Path:   prog,
		Args:   command,
		Env:    env,
		Dir:    st.Launch.Dir,
		Stdout: &stdout,
		Stderr: &stderr,
		SysProcAttr: &syscall.SysProcAttr{
			Chroot:     rootPath,
			Setsid:     true,
			Credential: &syscall.Credential{Uid: st.Launch.UID, Gid: st.Launch.GID, Groups: st.Launch.Groups},
		},
		WaitDelay: time.Second,
	}
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	if d.cg.v2 {
		// Born in a cgroup on v2 takes clone3, which the seccomp
		// filter the command must be born under refuses.
		return driver.ExecResult{}, fmt.Errorf("exec %s: commands are not run on cgroup v2 hosts yet: %w", spec.MachineID, driver.ErrUnavailable)
	}
	home, err := d.cg.processDirs()
	if err != nil {
		return driver.ExecResult{}, fmt.Errorf("exec %s: %w", spec.MachineID, err)
	}
	if err := startInNamespaces(ctx, cmd, h.Pid, d.cg.dirs(spec.MachineID), home); err != nil {
		return driver.ExecResult{ExitCode: 126, Stderr: fmt.Appendf(nil, "%s: %v\n", command[0], err)}, nil
	}
	waited := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			cmd.Process.Kill()
		case <-waited:
		}
	}()
	err = cmd.Wait()
	close(waited)
	return hostproc.ExecResult(ctx, spec.MachineID, cmd, err, stdout.Bytes(), stderr.Bytes())
}

// startInNamespaces starts cmd from a thread that joined the namespaces of
// pid and the cgroups cgroupDirs (cgroup v1, where a thread moves alone: so
// the command is born in the machine's cgroups and never runs a
// instruction outside them), took a cgroup namespace rooted there, dropped
// capabilities from its bounding set and took the sandbox's seccomp
// filter. The thread is spoiled for anything else, so it stays locked and
// exits with its goroutine, after it went back to the cgroups home.
func startInNamespaces(ctx context.Context, cmd *osexec.Cmd, pid int, cgroupDirs, home []string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		for _, ns := range execNamespaces {
			f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/ns/" + ns.name)
			if err != nil {
				errc <- err
				return
			}
			err = unix.Setns(int(f.Fd()), ns.flag)
			f.Close()
			if err != nil {
				errc <- fmt.Errorf("join %s namespace: %w", ns.name, err)
				return
			}
		}
		tid := strconv.Itoa(unix.Gettid())
		errc <- func() (err error) {
			// The thread leaves the machine's cgroups before Exec
			// returns (else it could still be there when the
			// machine's cgroup must be empty).
			defer func() {
				for _, dir := range home {
					if herr := writeFile(filepath.Join(dir, "tasks"), tid); herr != nil && err == nil {
						err = fmt.Errorf("leave cgroup: %w", herr)
					}
				}
			}()
			for _, dir := range cgroupDirs {
				if err := writeFile(filepath.Join(dir, "tasks"), tid); err != nil {
					return fmt.Errorf("join cgroup: %w", err)
				}
			}
			if err := unix.Unshare(unix.CLONE_NEWCGROUP); err != nil {
				return fmt.Errorf("cgroup namespace: %w", err)
			}
			if err := dropBoundingCaps(execCaps); err != nil {
				return err
			}
			if err := installSeccomp(); err != nil {
				return err
			}
			// cmd.Start forks from this thread: the child is in
			// the sandbox's namespaces (its pid namespace
			// included, which only applies to children) and
			// cgroups.
			return cmd.Start()
		}()
	}()
	return <-errc
}

// cappedBuffer keeps the first maxExecOutput bytes written to it.
type cappedBuffer struct{ buf bytes.Buffer }

func (b *cappedBuffer) Write(p []byte) (int, error) {
	if room := maxExecOutput - b.buf.Len(); room > 0 {
		b.buf.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

func (b *cappedBuffer) Bytes() []byte { return b.buf.Bytes() }

// maxEnviron caps what workloadEnv reads of a workload's environment (the
// kernel lets exec take at most a quarter of an 8 MiB stack for argv and
// environment together).
const maxEnviron = 2 << 20

// workloadEnv is the environment the workload of the sandbox whose init is
// initPid was started with. The driver keeps no copy (it holds the
// machine's secrets): it reads the workload's own, as the kernel keeps it.
// The workload is the init's oldest child: the first process it started,
// and the orphans it adopts are the workload's descendants, younger.
func workloadEnv(initPid int) (env []string, err error) {
	// The kernel's list of a task's children is not read atomically: a
	// read that races a fork or a reap may miss one, so an answer that
	// does not hold still is read again before it counts.
	for range 5 {
		if env, err = readWorkloadEnv(initPid); err != errWorkloadMoved {
			return env, err
		}
		time.Sleep(time.Millisecond)
	}
	return nil, err
}

// errWorkloadMoved is a workload found, then gone or another, while its
// environment was read.
var errWorkloadMoved = errors.New("workload ended")

func readWorkloadEnv(initPid int) ([]string, error) {
	pid, start, err := oldestChild(initPid)
	if err != nil {
		return nil, err
	}
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		return nil, fmt.Errorf("workload environment: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxEnviron+1))
	if err != nil {
		return nil, fmt.Errorf("workload environment: %w", err)
	}
	if len(b) > maxEnviron {
		return nil, fmt.Errorf("workload environment: over %d bytes", maxEnviron)
	}
	// The pid must still be the workload's: it could have ended, and
	// its pid been reused, meanwhile.
	if again, st, err := oldestChild(initPid); err != nil || again != pid || st != start {
		return nil, errWorkloadMoved
	}
	var env []string
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		if len(kv) > 0 {
			env = append(env, string(kv))
		}
	}
	return env, nil
}

// oldestChild finds the child of initPid (forked by any of its threads)
// that started first; between children started in the same clock tick,
// the one with the lower pid in the sandbox.
func oldestChild(initPid int) (pid int, start uint64, err error) {
	tasks, err := os.ReadDir("/proc/" + strconv.Itoa(initPid) + "/task")
	if err != nil {
		return 0, 0, err
	}
	bestNS := 0
	for _, t := range tasks {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(initPid) + "/task/" + t.Name() + "/children")
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			c, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			st, err := hostproc.ReadStat(c)
			if err != nil {
				continue
			}
			ns, _ := innermostPid(c)
			if pid == 0 || st.Start < start || (st.Start == start && ns < bestNS) {
				pid, start, bestNS = c, st.Start, ns
			}
		}
	}
	if pid == 0 {
		return 0, 0, errors.New("workload not found")
	}
	return pid, start, nil
}

// innermostPid is pid's pid in its innermost pid namespace (NSpid's last).
func innermostPid(pid int) (int, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "NSpid:"); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return 0, false
			}
			n, err := strconv.Atoi(f[len(f)-1])
			return n, err == nil
		}
	}
	return 0, false
}
