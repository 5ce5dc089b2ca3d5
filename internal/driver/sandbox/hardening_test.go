package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// probeCommand makes the test binary, copied into the test image as
// /bin/probe, try from inside a sandbox what a hostile tenant tries first,
// and print how each attempt ended ("name: ok" or "name: <errno>").
const probeCommand = "sandbox-probe"

// probeAttacks are the probe's attempts and how each must end.
var probeAttacks = []struct {
	name string
	want string
	try  func() error
}{
	{"unshare-user", "EPERM", func() error { return unix.Unshare(unix.CLONE_NEWUSER | unix.CLONE_NEWNET | unix.CLONE_NEWNS) }},
	{"unshare-net", "EPERM", func() error { return unix.Unshare(unix.CLONE_NEWNET) }},
	{"clone-user", "EPERM", func() error { return cloneExit(unix.CLONE_NEWUSER) }},
	{"clone3", "ENOSYS", func() error {
		_, _, e := unix.RawSyscall(unix.SYS_CLONE3, 0, 0, 0)
		return errnoOrNil(e)
	}},
	{"setns", "EPERM", func() error {
		f, err := os.Open("/proc/self/ns/net")
		if err != nil {
			return err
		}
		defer f.Close()
		return unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
	}},
	{"keyctl-user-keyring", "EPERM", func() error {
		_, err := unix.KeyctlInt(unix.KEYCTL_GET_KEYRING_ID, unix.KEY_SPEC_USER_KEYRING, 0, 0, 0)
		return err
	}},
	{"add_key", "EPERM", func() error {
		_, err := unix.AddKey("user", "probe", []byte("x"), unix.KEY_SPEC_PROCESS_KEYRING)
		return err
	}},
	{"request_key", "EPERM", func() error {
		_, err := unix.RequestKey("user", "probe", "", unix.KEY_SPEC_PROCESS_KEYRING)
		return err
	}},
	{"bpf", "EPERM", func() error {
		var attr [128]byte
		_, _, e := unix.Syscall(unix.SYS_BPF, unix.BPF_MAP_CREATE, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
		return errnoOrNil(e)
	}},
	{"perf_event_open", "EPERM", func() error {
		attr := unix.PerfEventAttr{Type: unix.PERF_TYPE_SOFTWARE, Config: unix.PERF_COUNT_SW_CPU_CLOCK, Size: uint32(unsafe.Sizeof(unix.PerfEventAttr{}))}
		fd, err := unix.PerfEventOpen(&attr, 0, -1, -1, 0)
		if err == nil {
			unix.Close(fd)
		}
		return err
	}},
	{"userfaultfd", "EPERM", func() error {
		fd, _, e := unix.Syscall(unix.SYS_USERFAULTFD, unix.O_CLOEXEC, 0, 0)
		if e == 0 {
			unix.Close(int(fd))
		}
		return errnoOrNil(e)
	}},
	{"io_uring_setup", "EPERM", func() error {
		var params [120]byte
		fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, 1, uintptr(unsafe.Pointer(&params[0])), 0)
		if e == 0 {
			unix.Close(int(fd))
		}
		return errnoOrNil(e)
	}},
	{"finit_module", "EPERM", func() error {
		_, _, e := unix.Syscall(unix.SYS_FINIT_MODULE, ^uintptr(0), 0, 0)
		return errnoOrNil(e)
	}},
	{"clock_settime", "EPERM", func() error {
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_REALTIME, &ts); err != nil {
			return err
		}
		return unix.ClockSettime(unix.CLOCK_REALTIME, &ts)
	}},
	{"raw-socket", "EPERM", func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_RAW, unix.IPPROTO_ICMP)
		if err == nil {
			unix.Close(fd)
		}
		return err
	}},
	{"packet-socket", "EPERM", func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, 0)
		if err == nil {
			unix.Close(fd)
		}
		return err
	}},
	{"mount", "EPERM", func() error { return unix.Mount("tmpfs", "/tmp", "tmpfs", 0, "") }},
	{"read-proc-keys", "empty", func() error { return readsNothing("/proc/keys") }},
	{"read-proc-timer_list", "empty", func() error { return readsNothing("/proc/timer_list") }},
	{"read-proc-sched_debug", "empty", func() error { return readsNothing("/proc/sched_debug") }},
	{"read-proc-kcore", "empty", func() error { return readsNothing("/proc/kcore") }},
	{"write-sysrq-trigger", "EROFS", func() error { return os.WriteFile("/proc/sysrq-trigger", []byte("h"), 0) }},
	{"write-proc-sys", "EROFS", func() error { return os.WriteFile("/proc/sys/kernel/hostname", []byte("x"), 0) }},
	// Its stdout is a file (the machine's log) or a pipe of the host's
	// root, mode 0600, reachable through /proc/self/fd: root of the
	// sandbox's user namespace only, the probe may not open it anew.
	{"reopen-host-file", "EACCES", func() error {
		f, err := os.OpenFile("/proc/self/fd/1", os.O_WRONLY|os.O_APPEND, 0)
		if err == nil {
			f.Close()
		}
		return err
	}},
	{"uid", "0", func() error {
		if os.Getuid() != 0 {
			return fmt.Errorf("%d", os.Getuid())
		}
		return errors.New("0")
	}},
}

var errEmpty = errors.New("empty")

// readsNothing is errEmpty when path reads as empty (or does not exist),
// nil when it has content.
func readsNothing(path string) error {
	b, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if len(b) == 0 {
		return errEmpty
	}
	return nil
}

func errnoOrNil(e unix.Errno) error {
	if e == 0 {
		return nil
	}
	return e
}

// cloneExit clones with flags; a child, should there be one, exits at
// once.
func cloneExit(flags uintptr) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	pid, _, e := unix.RawSyscall6(unix.SYS_CLONE, flags|uintptr(unix.SIGCHLD), 0, 0, 0, 0, 0)
	if e != 0 {
		return e
	}
	if pid == 0 {
		unix.RawSyscall(unix.SYS_EXIT_GROUP, 0, 0, 0)
	}
	var ws unix.WaitStatus
	unix.Wait4(int(pid), &ws, 0, nil)
	return nil
}

func probeMain() int {
	for _, a := range probeAttacks {
		res := "ok"
		switch err := a.try(); {
		case errors.Is(err, errEmpty):
			res = "empty"
		case err != nil && err.Error() == "0":
			res = "0"
		case err != nil:
			var errno unix.Errno
			if errors.As(err, &errno) {
				res = unix.ErrnoName(errno)
			} else {
				res = err.Error()
			}
		}
		fmt.Printf("%s: %s\n", a.name, res)
	}
	// Its own cgroups, then the init's: both at the root of the cgroup
	// namespace means the probe was in the init's (the machine's) cgroups
	// from the start.
	b, _ := os.ReadFile("/proc/self/cgroup")
	fmt.Printf("cgroup:\n%s", b)
	b, _ = os.ReadFile("/proc/1/cgroup")
	fmt.Printf("init-cgroup:\n%s", b)
	return 0
}

// installProbe copies the test binary into base as /bin/probe, with the
// host libraries it needs.
func installProbe(base string) error {
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	out, err := exec.Command("ldd", exe).Output()
	if err != nil {
		return fmt.Errorf("ldd %s: %w", exe, err)
	}
	files := []string{}
	for _, m := range regexp.MustCompile(`(?m)(/\S+) \(0x`).FindAllStringSubmatch(string(out), -1) {
		files = append(files, m[1])
	}
	for _, f := range files {
		if err := copyFile(f, filepath.Join(base, f), 0o755); err != nil {
			return err
		}
	}
	return copyFile(exe, filepath.Join(base, "bin/probe"), 0o755)
}

func copyFile(from, to string, mode os.FileMode) error {
	b, err := os.ReadFile(from)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	return os.WriteFile(to, b, mode)
}

// checkProbe checks the probe's report: every attack failed as it must,
// and the process was in the machine's cgroups (the root of its cgroup
// namespace) from its first instruction.
func checkProbe(t *testing.T, who, out string) {
	t.Helper()
	out, _, _ = strings.Cut(out, "probed\n")
	for _, a := range probeAttacks {
		want := a.want
		if a.name == "write-sysrq-trigger" {
			if _, err := os.Stat("/proc/sysrq-trigger"); errors.Is(err, os.ErrNotExist) {
				want = "ENOENT" // a kernel without magic SysRq
			}
		}
		if !strings.Contains(out, a.name+": "+want+"\n") {
			i := strings.Index(out, a.name+": ")
			got := "(missing)"
			if i >= 0 {
				got, _, _ = strings.Cut(out[i:], "\n")
			}
			t.Errorf("%s: attack %s: got %q, want %q", who, a.name, got, want)
		}
	}
	_, cgs, ok := strings.Cut(out, "cgroup:\n")
	own, initCg, ok2 := strings.Cut(cgs, "init-cgroup:\n")
	if !ok || !ok2 || strings.TrimSpace(own) == "" || strings.TrimSpace(initCg) == "" {
		t.Fatalf("%s: no cgroups in %q", who, out)
	}
	for _, line := range strings.Split(strings.TrimSpace(own)+"\n"+strings.TrimSpace(initCg), "\n") {
		// hierarchy:controllers:path; the machine's hierarchies
		// (memory, cpu, pids) must show the namespace's root.
		f := strings.SplitN(line, ":", 3)
		if len(f) != 3 {
			t.Errorf("%s: cgroup line %q", who, line)
			continue
		}
		for _, c := range []string{"memory", "pids"} {
			if strings.Contains(","+f[1]+",", ","+c+",") && f[2] != "/" {
				t.Errorf("%s: in %s cgroup %q, want the machine's (the namespace root, /)", who, c, f[2])
			}
		}
	}
}

// TestHardening tries, from inside a real sandbox, as the workload and as
// an exec'd command (both root in the sandbox), each attack a hostile
// tenant starts with; each must fail.
func TestHardening(t *testing.T) {
	d := newDriver(t, testConfig(t))
	spec := testSpec(t, "busybox", "-c", "/bin/probe "+probeCommand+"; echo probed; exec sleep 1000")
	start(t, d, spec)
	out := waitLog(t, spec.LogPath, "probed")
	t.Logf("workload:\n%s", out)
	checkProbe(t, "workload", out)

	res, err := d.Exec(context.Background(), spec, []string{"/bin/probe", probeCommand}, nil)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec probe: %v %+v", err, res)
	}
	t.Logf("exec:\n%s", res.Stdout)
	checkProbe(t, "exec", string(res.Stdout))

	// busybox's own unshare, as a shell user would try it.
	res, err = d.Exec(context.Background(), spec, []string{"unshare", "-U", "-r", "-n", "-m", "id"}, nil)
	if err != nil || res.ExitCode == 0 {
		t.Errorf("unshare -U -r -n -m from exec: %v %+v", err, res)
	}
}
