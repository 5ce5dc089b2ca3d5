// Package dns answers Flame's private .internal names, from the answering
// host's own view of the cluster, so every host can serve them without
// asking anyone else. Each query is answered from one View (one snapshot),
// taken once from the Source when the query arrives: an answer never mixes
// two moments of the cluster.
//
// Names resolve to the 6PN addresses of started machines only (AAAA; a
// machine with an IPv4 address is answered to A queries instead):
//
//	<app>.internal, global.<app>.internal    every started machine of the app
//	<region>.<app>.internal                  those in the region
//	top<N>.nearest.of.<app>.internal         the N nearest by RTT from this host
//	<machine_id>.vm.<app>.internal           one machine
//	<group>.process.<app>.internal           those of a process group
//
// Every address list is ordered nearest first (RTT from the answering host,
// regions without a known RTT last), ties by region then machine ID, so a
// client that takes the first address reaches the closest machine; the order
// is deterministic, not rotated. This order is what "nearest machine"
// means, defined once (sortNearest over the View's RTT to regions).
//
// TXT names, each one record whose text is cut into 255-byte strings that
// resolvers join back:
//
//	vms.<app>.internal       "<id> <region>,<id> <region>" per started machine, by ID
//	regions.<app>.internal   "<region>,<region>" with a started machine, sorted
//	_apps.internal           "<app>,<app>" every app of the network, sorted
//
// The vms format is the one Fly's own clients parse: split on commas, then on
// the space. An empty list is NODATA rather than an empty string.
//
// Names are matched case-insensitively and answered with the question's own
// spelling. A name under .internal that stands for nothing (an unknown app,
// region, machine, group, or a malformed top<N>) is NXDOMAIN; a name that
// exists but has no record of the asked type (an A query for an app on
// IPv6, an app with no started machine) is NODATA — NOERROR with no answer.
// Both carry the zone's SOA, whose minimum is the TTL, so resolvers cache
// the negative answer no longer than a positive one. Names outside .internal
// are REFUSED: the server is authoritative only, it does not recurse.
//
// Every answer has a short TTL (DefaultTTL, 5 s) so a deploy is seen
// within seconds. Answer (query, view → reply) is the pure core; Server
// wraps it with UDP (answers over the client's EDNS size, at most 1232
// bytes, are truncated with TC set) and TCP. A query that does not parse gets FORMERR when its header is
// readable and is dropped otherwise; responses are never answered.
package dns
