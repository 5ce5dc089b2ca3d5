// Package leftover keeps, for each part of a Flame that makes things on its
// host outside its own directories (a sandbox driver's bridge, cgroups and
// packet filter tables, a mesh link's policy rule and routing table, the
// host's IPv6 forwarding switch), a record of them under a host-wide
// runtime directory, held under a lock for as long as its process lives,
// so that a later Flame removes what a dead one left, and only that.
//
// A record names its owner durably (pid, start time and boot id, see
// internal/driver/hostproc) and lists each thing before it is made. A
// sweep removes the things of records whose lock is free and whose owner
// is provably gone, never those of a live owner, and never anything a
// record does not name: a bridge whose name merely looks like Flame's is
// not Flame's. A part closed cleanly removes its record, handing what it
// keeps on purpose (a sandbox driver's running machines) over to whoever
// runs on its state next; a part killed leaves its record, and the next
// Flame to start sweeps it (except the things of its own group, which it
// takes over, as a driver restarted on its state adopts its machines).
package leftover
