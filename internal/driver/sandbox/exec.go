package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/driver"

	"github.com/flamehq/flame/internal/driver/hostproc"
)

// maxExecOutput caps what Exec keeps of each of stdout and stderr.
const maxExecOutput = 1 << 20

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

	l := launch{Path: prog, Argv: command, Env: env, Dir: st.Launch.Dir, UID: st.Launch.UID, GID: st.Launch.GID, Groups: st.Launch.Groups}
	return runInSandbox(ctx, spec, l, stdin)
}

// runInSandbox has the init of spec's sandbox run l (see execinit.go) and
// collects its output and status. ctx ending kills the command.
func runInSandbox(ctx context.Context, spec driver.Spec, l launch, stdin []byte) (driver.ExecResult, error) {
	conn, err := dialExec(spec.Dir)
	if err != nil {
		// A sandbox started before its init took commands, or one
		// that ended meanwhile.
		return driver.ExecResult{}, fmt.Errorf("exec %s: sandbox takes no commands (restart the machine): %v: %w", spec.MachineID, err, driver.ErrUnavailable)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()

	var ours, theirs []*os.File
	defer func() {
		for _, f := range append(ours, theirs...) {
			f.Close()
		}
	}()
	for i := range execStdio {
		r, w, err := os.Pipe()
		if err != nil {
			return driver.ExecResult{}, fmt.Errorf("exec %s: %w", spec.MachineID, err)
		}
		if i == 0 {
			ours, theirs = append(ours, w), append(theirs, r)
		} else {
			ours, theirs = append(ours, r), append(theirs, w)
		}
	}
	fds := make([]int, len(theirs))
	for i, f := range theirs {
		fds[i] = int(f.Fd())
	}
	if err := sendFiles(conn, fds); err != nil {
		return execFailed(ctx, spec, err)
	}
	if err := writeMessage(conn, message{Op: "exec", Exec: &l}); err != nil {
		return execFailed(ctx, spec, err)
	}
	// The init holds the command's ends now.
	for _, f := range theirs {
		f.Close()
	}
	theirs = nil
	var stdout, stderr cappedBuffer
	copied := make(chan struct{}, 2)
	for i, buf := range []*cappedBuffer{&stdout, &stderr} {
		go func() {
			io.Copy(buf, ours[i+1])
			copied <- struct{}{}
		}()
	}
	go func() {
		if len(stdin) > 0 {
			ours[0].Write(stdin)
		}
		ours[0].Close()
	}()
	rd := bufio.NewReader(conn)
	var m message
	if err := readMessage(rd, &m); err != nil {
		return execFailed(ctx, spec, err)
	}
	if m.Op == "error" {
		return driver.ExecResult{ExitCode: 126, Stderr: fmt.Appendf(nil, "%s: %s\n", l.Argv[0], m.Err)}, nil
	}
	if err := readMessage(rd, &m); err != nil || m.Op != "exited" {
		return execFailed(ctx, spec, fmt.Errorf("no exit status: %v (op %q)", err, m.Op))
	}
	res := driver.ExecResult{ExitCode: m.Code}
	if m.Signal != 0 {
		res.ExitCode = 128 + m.Signal
	}
	// What the command printed is read to its end, but not past a second
	// when something it started keeps the output open.
	t := time.NewTimer(time.Second)
	defer t.Stop()
	for range 2 {
		select {
		case <-copied:
		case <-t.C:
			ours[1].SetReadDeadline(time.Now())
			ours[2].SetReadDeadline(time.Now())
			<-copied
		}
	}
	res.Stdout, res.Stderr = stdout.Bytes(), stderr.Bytes()
	return res, nil
}

// execFailed is the result of an Exec whose conversation with the init
// broke off: ctx's error when it ended, else the sandbox is gone.
func execFailed(ctx context.Context, spec driver.Spec, err error) (driver.ExecResult, error) {
	if ctxErr := ctx.Err(); ctxErr != nil {
		return driver.ExecResult{ExitCode: -1}, fmt.Errorf("exec %s: %w", spec.MachineID, ctxErr)
	}
	return driver.ExecResult{}, fmt.Errorf("exec %s: sandbox ended: %v: %w", spec.MachineID, err, driver.ErrGone)
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
