// Package mesh is the private network (6PN) between hosts: a WireGuard
// interface per host (wireguard-go in userspace, over a TUN), keyed by a
// pair generated per host and kept in its data dir, with every other live
// host of the cluster as a peer whose allowed IPs are the prefixes its
// machines hold.
//
// What a host publishes (advertise.go) rides in its cluster facts: the
// public key and the UDP endpoint as two of its advertised addresses
// ("mesh-key", "mesh"), and its prefixes as what they already are, the
// private addresses of its machines (each in its org's HostPrefix, see
// internal/mesh/layout). Which peers a host configures is a pure function
// of its cluster view (Plan); the Mesh applies the plan to its device as
// the view changes, adding, replacing and removing peers.
//
// Packets reach the device through a TUN and leave it through a conn.Bind:
// the kernel's UDP (wireguard's StdNetBind) on a real host, or any
// net.PacketConn (PacketBind), which is how `flame dev` runs the tunnels
// over its simulated network so that a cross-region hop pays its latency.
// The kernel side of a host (link_linux.go) makes the TUN, routes the
// cluster's NetworkPrefix into it and, when several hosts share one kernel
// as in `flame dev`, steers only what comes in from the host's own bridge
// there, by a policy rule and a routing table of its own.
package mesh
