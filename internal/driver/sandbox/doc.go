// Package sandbox is the driver that runs each machine's workload from its
// image in a sandbox of its own: new user, PID, mount, UTS, IPC and network
// namespaces, a root filesystem from the image store, cgroup limits, a
// size-limited writable layer and an address on the host's private IPv6
// network. It is the default driver when the agent runs as root. Run by
// another user, New makes a rootless driver where the kernel allows it:
// the same init and confinement in a user namespace of the user alone,
// without cgroups or a bridge (see rootless.go).
//
// # Starting a sandbox
//
// Start takes the driver's spare init — Flame's own ("flame sandbox-init
// run", see InitMain), started ahead of time as PID 1 of new namespaces,
// root of a user namespace of its own, and waiting for its configuration —
// or, when no spare is ready, starts one now. It mounts a tmpfs of the
// guest's rootfs_size_mb for the machine's writes (disk.go) and has the
// image store make the machine's copy-on-write root filesystem there
// (Images.MountTree): an overlay whose lower layers are the store's shared
// layer directories, each an idmapped mount for the init's user namespace
// (idmap.go), returned as a detached mount. It resolves how to run the
// workload against that tree: the image's entrypoint and cmd merged with
// the machine's config as container runtimes do (init.entrypoint replaces
// the image's entrypoint and drops its cmd, init.cmd replaces the cmd), the
// image's environment overlaid with the machine's, the image's working
// directory, and its USER (uid[:gid] or names, looked up in the image's
// /etc/passwd and /etc/group). FLY_PRIVATE_IP is set to the machine's real
// address.
//
// The driver talks to the init over a socket during the start only (see
// spare.go). Over it go the machine's log (the init's and the workload's
// stdout and stderr), a directory for its exit status, its cgroup's OOM
// counter, the root filesystem tree and the socket the init takes commands
// on (execinit.go), so that an init needs no host path. The init attaches
// the tree over "/" and makes it its root (pivot_root); before that, while
// the host's are in sight, it mounts /proc, a minimal /dev (a tmpfs with
// the host's null, zero, full, random, urandom and tty bound in, pts, shm)
// and a read-only /sys; after it, it makes /proc/sys and friends read-only,
// masks what runc masks, sets the hostname to the machine id and writes
// /etc/hosts and /etc/resolv.conf (nameserver fdaa::3, as on Fly).
// Meanwhile the driver gives the sandbox's network the machine's name and
// address; then the init starts the workload, from a thread it readied
// beforehand, in a session of its own, with stdin on /dev/null and stdout
// and stderr appended to the machine's log file. Start returns once the
// workload's program has been executed.
//
// # What holds a workload
//
// Root in the sandbox is root of its user namespace only: outside, it is
// the first id of a range of 65536 leased to the machine alone (idmap.go),
// an unprivileged user of the host, and its capabilities hold over the
// sandbox's namespaces and the files of its root filesystem, nothing of
// the host's. The image's files keep their owners (a file uid 0 owns on
// disk is root's inside) without a copy: its layers are idmapped mounts
// under the overlay, and what the machine writes is stored, in its tmpfs,
// with the range's ids. A kernel without what this takes (overlayfs
// layers given as descriptors, Linux 6.13; idmapped mounts) fails the
// start: the driver never runs a sandbox without its user namespace.
//
// Within that, the workload's capability bounding set is that of common
// container runtimes without CAP_MKNOD and CAP_NET_RAW, and every process
// of the sandbox runs under a seccomp filter (seccomp.go) at least as
// strict as Docker's default (no new namespaces, user namespaces included,
// no keyring, bpf, perf events, userfaultfd, io_uring, modules, clocks,
// mounts), in a cgroup namespace rooted at the machine's cgroup, with /proc
// and /sys masked as runc masks them (rootfs.go).
//
// # The init
//
// The init forwards the signals it gets to the workload's process group,
// reaps orphans, and when the workload ends kills what is left and writes
// the workload's exit (code or signal, and whether the OOM killer struck in
// the sandbox's cgroup) to sandbox-exit/sandbox-exit.json in the machine's
// directory (sandbox-exit/ is the sandbox root's: the only place on the
// host the init may write). So
// the exit status is exact even for a sandbox a later agent adopted: the
// driver watches the init through a pidfd and reads the file when it ends.
// SIGKILL from the driver is turned into a request to the init to kill
// every process of the sandbox (the last real-time signal), so that the init
// can still record the end; Stop escalates to killing the init itself only
// if the sandbox has not ended two seconds later. The init asks not to be
// chosen by the OOM killer (oom_score_adj -1000) where the host allows it;
// where it cannot (no CAP_SYS_RESOURCE) and the init is killed, the driver
// reads the OOM count from the cgroup itself.
//
// # Handles and adoption
//
// A handle is "<pid>:<starttime>:<boot id>" of the init (for a spare, its
// start time is when the spare was made, before the machine's start);
// Adopt accepts it only for a live process with that pid, start time and
// boot. Start also records the handle, with how the workload was launched
// (its environment left out: it holds the machine's secrets), in
// sandbox.json (0600) in the machine's directory, which Adopt with an empty
// handle, Exec and Cleanup read. A half-started sandbox whose agent died
// ends by itself: its init exits when the start socket closes before it was
// told to go; so does a spare. Close kills the spare and removes its
// cgroup.
//
// # Exec
//
// Exec runs a command in a running sandbox through its init (execinit.go):
// the driver connects to the socket the init listens on (sandbox-exec.sock
// in the machine's directory, which only the host's root reaches), hands it
// the command's stdin, stdout and stderr, and the command with the
// workload's environment (read from the workload's /proc/<pid>/environ:
// the init's oldest child), directory and user; the init forks it from a
// thread of its own that took a cgroup namespace, the workload's bounding
// set and the seccomp filter. So the command is born in every namespace of
// the sandbox, its user and mount namespaces included, and in the machine's
// cgroup, on cgroup v1 and v2 alike. Closing the connection (ctx ending)
// kills the command's process group.
//
// # Resources
//
// Each machine gets a cgroup under Config.CgroupParent ("flame-<instance>-<host>",
// see instance.go), on cgroup
// v2 when its root offers the memory, cpu and pids controllers, else on the
// v1 hierarchies of those controllers (detected by New):
//
//   - memory: the guest's memory_mb (256 when unset) as a hard limit, swap
//     included (memory.max and memory.swap.max 0; memory.limit_in_bytes and
//     memory.memsw.limit_in_bytes, written in the order the kernel takes
//     them: memsw first when the limit grows, memory first when it
//     shrinks). Going over OOM-kills, reported as
//     Exit.OOMKilled.
//   - cpu: guests have shared vCPUs, as Fly's shared cpu_kind: each cpu is
//     a weight of 1/16 of a core (cpu.shares 64 per cpu on v1, the
//     equivalent cpu.weight on v2), which is what a machine is guaranteed
//     when the host is busy, and a quota of one full core per cpu
//     (cpu.cfs_quota_us / cpu.max, period 100 ms), which caps its bursts. A
//     "performance" cpu would be a weight of 1024 per cpu; driver.Spec does
//     not carry cpu_kind yet.
//   - pids: at most 4096 tasks.
//   - disk: what the machine writes to its root filesystem goes to a tmpfs
//     of the guest's rootfs_size_mb (api.DefaultGuestRootfsSizeMB when
//     unset), mounted under its directory: past it, ENOSPC. Its pages are
//     charged to the machine's memory (see disk.go for why not a disk).
//
// The spare init waits in a spare cgroup. On cgroup v1, where moving a
// process into a cgroup waits for an RCU grace period (milliseconds), Start
// renames that cgroup to the machine's; on v2, which cannot rename a cgroup,
// the init is moved into the machine's while the network is set up. An init
// started at Start (or for a spare) is born in its cgroup on v2 (clone3
// with CLONE_INTO_CGROUP) and moved on v1 (see spare.go).
//
// # Network
//
// The host has one bridge (Config.Bridge, "fl<instance>-<host>"), created on
// first use, and a place in the private network (6PN, internal/mesh/layout):
// Config.Network (the instance id's 32 bits) and Config.Host (the host's
// index + 1; see instance.go). A machine's address is in its org's network
// on this host, layout.Place{Network, spec.Org, Host}.HostPrefix() (a /80),
// its 48 machine bits hashed from its id; the bridge holds that place's
// Gateway (machine number 1) from the org's first machine here to its last
// (orgnet.go), and the link-local fe80::1, which every sandbox's default
// route goes through, whatever its org. A spec without an org is refused. A
// legacy instance (no Network) keeps its one prefix, Config.HostPrefix, for
// every machine, the bridge its first host address, and no filter. New
// holds the host's place until Close — a lock file under /run/flame,
// removed by Close — and refuses, before it makes anything, a place another
// driver holds or another link routes a prefix of. The bridge is made
// without spanning tree or forward delay, so that a new port forwards at
// once, and with a fixed MAC address. Each sandbox has a veth pair into it
// (host side named "f<machine id>", "eth0" inside; the driver deletes a veth
// by name only when it is a port of its own bridge or of none). The spare's
// pair is made with the spare, its host end under a name of its own,
// already a port of the bridge and up (without IPv6: a port needs no
// address), eth0 up with its default route; Start then only adds the
// machine's name to the host end, as an alternative name (renaming would
// take the link down and up again), the machine's address to eth0 (its
// org's /80 on-link) and the machine to the filter. Addresses are added
// without duplicate address detection, and the workload starts only once
// eth0 is operationally up, so the machine is reachable at [private ip]:port
// from the host as soon as it listens. Addresses are leased under
// Config.StateDir (from Prepare until Cleanup) so no two machines share
// one; PrivateIP reports a machine's.
//
// The filter (filter.go: nftables, two tables of the driver's own) lets a
// machine send only from its MAC and address, only IPv6, and only to its
// org's network, to layout.DNS port 53 or to the world, which the host
// reaches for it by masquerading (the driver turns IPv6 forwarding on while
// it lives, see internal/leftover);
// nothing from the bridge reaches the host but replies to its own
// connections, neighbour discovery and DNS. The machine's facts go into the
// filter before its workload runs. The host answers layout.DNS for the
// machines (dnssock.go: the address on the bridge, sockets bound to it, see
// internal/dns for the answers).
//
// # Cleanup
//
// A sandbox that ends leaves its cgroup and root filesystem until the
// machine starts again (a start is from a fresh copy of the image, as on
// Fly) or Cleanup removes them. Cleanup kills the init if it still runs
// (every process of the sandbox goes with it, and with the last one its
// namespaces), deletes the veth, removes the cgroup, unmounts the
// writable layer (what the machine wrote goes with it) and the root
// filesystem, removes the state files, and gives back the id range, once
// no process of the sandbox is left, and the address.
//
// What a driver killed leaves on the host (its bridge, cgroups, filter
// tables, mounts, lock files) its record names, and the next driver to start
// on the host of another network removes it (sweep.go, internal/leftover).
package sandbox
