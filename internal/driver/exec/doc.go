// Package exec is the driver that runs a machine's workload as a plain host
// process: no isolation, no image pulls. It exists for development, for
// trusted single-tenant hosts and for the demo app.
//
// # Images
//
// An image reference resolves to a host argv through [Config.Images]
// (repository[:tag]; an exact match wins, then the reference without its tag
// or digest), or through the scheme "exec:/abs/path/to/program", which runs any
// local executable. The machine's init.entrypoint, when set, replaces the
// image's argv; init.cmd is appended. A program named without a slash is
// looked up in the PATH of the machine's environment, or the host's PATH when
// the machine has none.
//
// # Processes
//
// A workload runs in its own process group with exactly the machine's
// environment, stdin on /dev/null, and stdout and stderr appended to the
// machine's log file through one shared descriptor. Nothing ties it to the
// agent: no parent-death signal, no pipes. An agent that dies leaves its
// workloads running, and a new agent finds them again with Adopt.
//
// When the main process ends, whatever is left of its process group is
// killed, as when a container's init exits.
//
// # Handles
//
// A handle is "<pid>:<starttime>:<boot id>": the main process id, its start
// time in clock ticks since boot (field 22 of /proc/<pid>/stat) and the
// kernel's boot id. Adopt accepts a handle only when a live process with that
// pid started at that time on this boot, so a reused pid is never mistaken for
// the workload.
//
// # Unrecorded workloads
//
// An agent can die after starting a workload and before recording its handle.
// For that case Adopt with an empty handle looks in /proc for a
// live process-group leader whose environment holds the spec's
// FLY_MACHINE_ID, FLY_MACHINE_VERSION and FLY_ALLOC_ID (those it sets; all of
// the spec's environment when it sets none). A workload that execs a program
// with an environment lacking them is not found that way.
//
// # Exit status
//
// For a workload this process started, the exit code or killing signal is
// exact. A workload adopted from another agent process is not this process's
// child, so its status cannot be collected: the driver learns that it ended
// (through a pidfd) and reports Exit{Code: -1, Unknown: true}. When the adopted
// process happens to be a child of this process (the driver instance that
// started it stopped watching, or this process is a child subreaper), the
// exact status is collected after all. OOM kills are not detected.
//
// Signalling a process group by number races with the kernel reusing that
// number once the group is gone. The driver keeps the window to microseconds:
// for its own children it signals only while the main process is unreaped,
// which keeps the number reserved; for adopted workloads it checks the pidfd
// and /proc first.
package exec
