package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch = unix.AUDIT_ARCH_X86_64
	// x32Bit marks the x32 ABI's syscall numbers, refused whole.
	x32Bit = 0x40000000
	// cloneFlagsOffset is where clone's flags argument is (its first).
	cloneFlagsOffset = offArg0
)

var archDeniedSyscalls = []uintptr{
	unix.SYS_CREATE_MODULE, unix.SYS_GET_KERNEL_SYMS, unix.SYS_QUERY_MODULE,
	unix.SYS_IOPL, unix.SYS_IOPERM, unix.SYS_NFSSERVCTL, unix.SYS_SYSFS,
	unix.SYS__SYSCTL, unix.SYS_USELIB, unix.SYS_USTAT,
}
