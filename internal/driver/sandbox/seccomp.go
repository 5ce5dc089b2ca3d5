package sandbox

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The seccomp filter every process of a sandbox runs under (the init
// installs it on the thread that forks the workload, Exec on the thread
// that forks a command; children inherit it and cannot remove it). It
// refuses, with EPERM, what Docker's default profile refuses a container
// without extra capabilities: new namespaces (unshare, setns, clone with
// namespace flags), the kernel keyring, bpf, perf events, userfaultfd,
// io_uring, kernel modules and kexec, the clocks, mounts, swap, quotas,
// reboot, reading other processes' memory and the rest of denied below.
// clone3, whose flags a filter cannot read, fails with ENOSYS, so that
// libcs fall back to clone, whose flags it can. A syscall of another ABI
// than the native one (x32, i386) is refused too.

// deniedSyscalls are refused whatever their arguments.
var deniedSyscalls = append([]uintptr{
	unix.SYS_ACCT, unix.SYS_ADD_KEY, unix.SYS_KEYCTL, unix.SYS_REQUEST_KEY,
	unix.SYS_BPF, unix.SYS_PERF_EVENT_OPEN, unix.SYS_USERFAULTFD,
	unix.SYS_IO_URING_SETUP, unix.SYS_IO_URING_ENTER, unix.SYS_IO_URING_REGISTER,
	unix.SYS_CLOCK_ADJTIME, unix.SYS_CLOCK_SETTIME, unix.SYS_SETTIMEOFDAY,
	unix.SYS_INIT_MODULE, unix.SYS_FINIT_MODULE, unix.SYS_DELETE_MODULE,
	unix.SYS_KEXEC_LOAD, unix.SYS_KEXEC_FILE_LOAD,
	unix.SYS_UNSHARE, unix.SYS_SETNS,
	unix.SYS_MOUNT, unix.SYS_UMOUNT2, unix.SYS_PIVOT_ROOT, unix.SYS_MOVE_MOUNT,
	unix.SYS_OPEN_TREE, unix.SYS_FSOPEN, unix.SYS_FSCONFIG, unix.SYS_FSMOUNT,
	unix.SYS_FSPICK, unix.SYS_MOUNT_SETATTR,
	unix.SYS_OPEN_BY_HANDLE_AT, unix.SYS_NAME_TO_HANDLE_AT,
	unix.SYS_QUOTACTL, unix.SYS_QUOTACTL_FD, unix.SYS_REBOOT,
	unix.SYS_SWAPON, unix.SYS_SWAPOFF, unix.SYS_SYSLOG, unix.SYS_VHANGUP,
	unix.SYS_PROCESS_VM_READV, unix.SYS_PROCESS_VM_WRITEV, unix.SYS_KCMP,
	unix.SYS_GET_MEMPOLICY, unix.SYS_SET_MEMPOLICY, unix.SYS_MBIND, unix.SYS_MOVE_PAGES,
	unix.SYS_LOOKUP_DCOOKIE, unix.SYS_FANOTIFY_INIT,
}, archDeniedSyscalls...)

// namespaceFlags are the clone flags that make new namespaces.
const namespaceFlags = unix.CLONE_NEWNS | unix.CLONE_NEWCGROUP | unix.CLONE_NEWUTS |
	unix.CLONE_NEWIPC | unix.CLONE_NEWUSER | unix.CLONE_NEWPID | unix.CLONE_NEWNET

// allowedPersonalities are the personality(2) values Docker's default
// profile lets through: PER_LINUX, PER_LINUX32, UNAME26 with each, and the
// query 0xffffffff.
var allowedPersonalities = []uint32{0x0, 0x8, 0x20000, 0x20008, 0xffffffff}

// seccompData offsets (struct seccomp_data).
const (
	offNr   = 0
	offArch = 4
	offArg0 = 16 // the low 32 bits on a little-endian machine
)

var retEPERM = unix.SECCOMP_RET_ERRNO | uint32(unix.EPERM)

// seccompFilter is the sandbox's filter as a BPF program.
var seccompFilter = buildSeccompFilter()

func buildSeccompFilter() []unix.SockFilter {
	stmt := func(code uint16, k uint32) unix.SockFilter { return unix.SockFilter{Code: code, K: k} }
	jump := func(code uint16, k uint32, jt, jf uint8) unix.SockFilter {
		return unix.SockFilter{Code: code, K: k, Jt: jt, Jf: jf}
	}
	const (
		ld  = unix.BPF_LD | unix.BPF_W | unix.BPF_ABS
		jeq = unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K
		jge = unix.BPF_JMP | unix.BPF_JGE | unix.BPF_K
		and = unix.BPF_ALU | unix.BPF_AND | unix.BPF_K
		ret = unix.BPF_RET | unix.BPF_K
	)
	p := []unix.SockFilter{
		stmt(ld, offArch),
		jump(jeq, auditArch, 1, 0),
		stmt(ret, unix.SECCOMP_RET_KILL_PROCESS),
		stmt(ld, offNr),
	}
	if x32Bit != 0 {
		p = append(p, jump(jge, x32Bit, 0, 1), stmt(ret, retEPERM))
	}
	for _, nr := range deniedSyscalls {
		p = append(p, jump(jeq, uint32(nr), 0, 1), stmt(ret, retEPERM))
	}
	p = append(p, jump(jeq, unix.SYS_CLONE3, 0, 1), stmt(ret, unix.SECCOMP_RET_ERRNO|uint32(unix.ENOSYS)))
	// personality: only the values allowed.
	p = append(p, jump(jeq, unix.SYS_PERSONALITY, 0, uint8(2*len(allowedPersonalities)+2)), stmt(ld, offArg0))
	for _, v := range allowedPersonalities {
		p = append(p, jump(jeq, v, 0, 1), stmt(ret, unix.SECCOMP_RET_ALLOW))
	}
	p = append(p, stmt(ret, retEPERM))
	// clone: no namespace flags.
	p = append(p,
		jump(jeq, unix.SYS_CLONE, 0, 5),
		stmt(ld, cloneFlagsOffset),
		stmt(and, namespaceFlags),
		jump(jeq, 0, 0, 1),
		stmt(ret, unix.SECCOMP_RET_ALLOW),
		stmt(ret, retEPERM),
		stmt(ret, unix.SECCOMP_RET_ALLOW),
	)
	return p
}

// installSeccomp puts the sandbox's filter on the calling thread, which
// must be locked (runtime.LockOSThread) and never unlocked: the filter
// holds for the thread and everything it forks from now on. The caller
// needs CAP_SYS_ADMIN (no_new_privs is left alone, so that set-user-id
// programs of an image work as under Docker).
func installSeccomp() error {
	if len(seccompFilter) > 4096 {
		return fmt.Errorf("seccomp filter of %d instructions", len(seccompFilter))
	}
	prog := unix.SockFprog{Len: uint16(len(seccompFilter)), Filter: &seccompFilter[0]}
	err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&prog)), 0, 0)
	runtime.KeepAlive(&prog)
	if err != nil {
		return fmt.Errorf("install seccomp filter: %w", err)
	}
	return nil
}
