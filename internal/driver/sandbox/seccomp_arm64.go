package sandbox

import "golang.org/x/sys/unix"

const (
	auditArch        = unix.AUDIT_ARCH_AARCH64
	x32Bit           = 0 // no second ABI
	cloneFlagsOffset = offArg0
)

var archDeniedSyscalls = []uintptr{unix.SYS_NFSSERVCTL}
