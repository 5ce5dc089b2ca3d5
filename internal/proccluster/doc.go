// Package proccluster runs a Flame cluster as real processes on a real
// kernel network, for end-to-end tests: `flame server` and several
// `flame agent`s, each a separate process in a network namespace of its
// own, with its own address on a bridge the package makes, so that the
// faults tests inject are the kernel's:
//
//   - a partition between hosts (or regions) is a drop rule in the
//     nftables table of each side's namespace, and heal flushes the rules;
//   - a killed host is SIGKILLed: the agent and every process left in its
//     namespace (its machines: the hosts run the exec driver, so machines
//     are host processes in the agent's namespace), and a revived host is
//     a new agent started on the same data dir;
//   - a stalled host is every process of its namespace SIGSTOPped, as a
//     paused VM, and SIGCONT resumes it.
//
// With Config.Sandbox the hosts run the sandbox driver and the private
// network: each agent's WireGuard tunnels go over the bridge from its own
// address (so a partition cuts them too), it pulls images from the control
// plane's registry through a forwarder on its namespace's loopback, and a
// killed agent's machines, in namespaces of their own, run on until it is
// revived and adopts them. Removing such a host stops its agent with
// SIGTERM first, then kills what is left in its instance's cgroups and
// detaches the mounts below its data dir before removing the cgroups.
//
// Everything a cluster makes — namespaces, bridge, veth pairs, nftables
// tables (which live and die with their namespaces), processes and their
// children, temporary directories — is removed when its test ends, passed,
// failed or panicked. Names are derived from the running test binary's pid
// and a random id (prefix "flpc", then the pid in base 36, then the id), so
// runs on one machine never meet; Sweep removes what a run that was itself
// SIGKILLed left behind, and only when that run's pid is dead. Servers and
// agents die with the test binary (parent-death signal); their machines,
// which the exec driver keeps apart from the agent on purpose, are left to
// Sweep.
//
// The flame binary is built once per test binary by Main, which a test
// package calls from its TestMain. The package needs root; as another user
// New skips the test, and as root a missing prerequisite fails it.
//
// Schedule draws a seeded sequence of these faults for short chaos runs.
package proccluster
