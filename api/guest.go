package api

// The guest a machine gets when its config names none (or leaves a field
// zero): Fly's smallest, one shared CPU and 256 MB. Every part of Flame that
// sizes a machine (admission on a host, placement, cgroup limits, the
// capacity shown per region) reads these through Size.
const (
	DefaultGuestCPUs     = 1
	DefaultGuestMemoryMB = 256
	// DefaultGuestRootfsSizeMB is what a machine may write to its root
	// filesystem when its guest says nothing; MaxGuestRootfsSizeMB the
	// most it may ask for.
	DefaultGuestRootfsSizeMB = 1024
	MaxGuestRootfsSizeMB     = 64 * 1024
)

// RootfsSizeMB is what a machine of this config may write to its root
// filesystem: the guest's, defaulted when unset.
func (c *MachineConfig) RootfsSizeMB() int {
	if c == nil || c.Guest == nil || c.Guest.RootfsSizeMB <= 0 {
		return DefaultGuestRootfsSizeMB
	}
	return c.Guest.RootfsSizeMB
}

// Size is the CPUs and memory a machine of this config takes: the guest's,
// each defaulted when unset. A nil config is the default guest.
func (c *MachineConfig) Size() (cpus, memoryMB int) {
	cpus, memoryMB = DefaultGuestCPUs, DefaultGuestMemoryMB
	if c == nil || c.Guest == nil {
		return cpus, memoryMB
	}
	if c.Guest.CPUs > 0 {
		cpus = c.Guest.CPUs
	}
	if c.Guest.MemoryMB > 0 {
		memoryMB = c.Guest.MemoryMB
	}
	return cpus, memoryMB
}
