// Package cluster gives every host the facts of every other host — its
// machines, their services and health, its load and free capacity — within
// a fraction of a second and without a central server.
//
// # Membership
//
// Hosts form one hashicorp/memberlist cluster (SWIM with Lifeguard) over a
// transport the caller passes in (nil: memberlist's UDP/TCP transport,
// which the package binds itself so that it can share it; see Failure
// detection).
// Each host advertises, in memberlist's node meta (≤ 512 bytes), its
// region, capacity and service addresses. A host that dies or leaves is
// marked dead or left, not forgotten: its facts stay so its machines can be
// shown as unreachable, until it returns, Remove is called, or ReapTimeout
// (72 h) passes. Memberlist's leave event does not say whether a host left
// or died, so a leaving host first re-advertises its meta with a leaving
// flag. Memberlist never talks to hosts it believes dead, so every
// ReconnectInterval each host tries to join one of them: that is how the
// two sides of a healed partition find each other again.
//
// A join swaps the whole membership with one host, and memberlist gossips
// the newcomer to the rest; but when many hosts join at once, that gossip
// competes with itself and dies out before it reaches everyone (at N=100
// started together, the last host learnt of the last other after ~40 s).
// So one and four seconds after joining, a host swaps the membership again
// with a random live host (settleAfter): the cluster converges in seconds.
//
// # Failure detection
//
// Detection is two-level. A cluster-wide detector has to wait out the
// round trip to the farthest host on every probe (~300 ms across the
// world), which puts a death seconds away everywhere. So each host also
// runs a second memberlist of the hosts of its own region only, with LAN
// timings, and the rest of the cluster takes that region's word:
//
//   - The regional memberlist shares the cluster-wide one's transport, so
//     it needs no address, port or wiring of its own: a mux (mux.go) tags
//     its datagrams with a leading byte and has its streams send that byte
//     first; everything untagged is the cluster-wide memberlist's, byte for
//     byte as without the mux. Hosts of a region find each other in the
//     cluster-wide membership and join at the same address; the regional
//     memberlist refuses hosts that advertise another region.
//   - When the regional memberlist holds a host of the region dead, this
//     host first pings it itself (three pings a probe interval apart):
//     memberlist believes a dead message from any member, so a host that
//     was cut off from its region would otherwise, on its return, make its
//     peers repeat that the rest of the region is dead. It also keeps quiet
//     while its own Lifeguard health score is above zero (it has been
//     missing acks and nacks it should have had): a host that is slow or
//     cut off itself is the likelier culprit. Otherwise the death becomes a
//     verdict: {issuer, host, dead, time}, a record of a few dozen bytes,
//     validated like every record and gossiped ahead of facts, three times
//     as often, by every host it tells something new. Facts have
//     anti-entropy to mend what gossip misses; verdicts have only their
//     flood, and at memberlist's usual count of sends a host now and then
//     got one issuer's verdict only, short of the quorum below. When the
//     regional detector sees the host back, the issuer says so with an
//     alive verdict.
//   - A host takes a dead verdict only from a live host of the accused
//     host's own region, and only once two such hosts agree (or every
//     other host of that region it holds up, when there are fewer): one
//     stalled or broken detector cannot kill a host in everyone's view. A
//     verdict about a leaving host, or older than the last sign of life
//     this host saw (a probe answered, memberlist's news that it is alive,
//     an alive verdict), counts for nothing. A host dead by verdict only is
//     pinged now and then (every ProbeInterval, the gap doubling to 16 of
//     them) until memberlist agrees it is dead; any answer overrides the
//     verdict, as does a probe of memberlist's own. Nothing authenticates
//     the sender of a record, so a forged verdict in the name of hosts of
//     the accused's region holds until the accused answers a ping.
//   - The cluster-wide detector goes on as before and has the last word:
//     its verdict replaces the region's, and it alone detects the death of
//     a host alone in its region, or of a whole region at once (nobody is
//     left to issue a verdict), at the cluster-wide timings.
//
// Verdicts are ordered against signs of life by the wall clocks of the
// hosts that saw them, which are assumed to agree to well under a second
// (NTP). A clock far behind makes its verdicts count for nothing, and the
// cluster-wide detector decides.
//
// # Owner-versioned facts
//
// Only a host writes its own facts (Publish). Each change gets the next
// version of that host's counter, which starts from the wall clock in
// nanoseconds so it keeps rising across restarts (and if a host ever sees
// its own facts at a higher version, it republishes above it). A change
// travels as a delta: the machines upserted whole, the ids removed, the
// host-level numbers, and the version it applies to (its base). Receivers
// apply a delta only to its base (a base of zero is a full replacement), so
// every host holds each owner's facts exactly as they were at some version;
// a delta ahead of its base waits in a small buffer, and if the gap is not
// filled within GapWait the host asks for the owner's full facts. Hence
// duplicates, reordering and stale records are harmless, and hosts that
// hold the same versions hold the same facts — partitions heal to one
// state.
//
// Deltas are cut to fit one UDP packet (1,100 bytes; a machine is ~100),
// so a host with hundreds of machines publishes a chain of them. Each
// delta goes straight to the hosts of the publisher's region (one packet
// each) and into memberlist's gossip; a host that learns a new delta gossips
// it on (memberlist does not relay user messages by itself). Anti-entropy
// exchanges digests, owner → version, not facts: every AntiEntropyInterval
// (5 s) with one random host, with a host that comes up, and on
// memberlist's push/pull; each side then sends the other, over a stream,
// the full facts of the owners it holds newer (outside push/pull, the
// receiver of a digest asks back, with a digest of its own, for what the
// sender holds newer). A fact missed by gossip thus reaches most hosts
// in a few exchanges.
//
// Every record is decoded by a bounded binary decoder (wire.go) and
// validated (validate.go) before use: id shapes, enumerated states and
// protocols, port ranges, sizes, counts, versions not beyond the clock
// plus a day. A record that fails is dropped, counted in Stats and logged
// (at most once a second); in a bundle of owners only the bad owner is
// lost. A record about this host itself is never applied.
//
// # Local view
//
// Consumers read an immutable *Snapshot (Cluster.Snapshot: an atomic load,
// never blocking on the network) and Subscribe for coalesced change
// notifications. A snapshot is rebuilt after each change, reusing the
// host values that did not change; its indexes (by id, app, region) are
// built on first use.
//
// # Distances
//
// Every successful direct probe feeds memberlist's RTT into a per-host
// EWMA (weight 1/5), shown in Host.RTT; snapshots take a new value only
// when it moves by a fifth. Probes whose ack comes after ProbeTimeout give
// no sample, so ProbeTimeout should exceed the RTT to the farthest host.
//
// # Tuning
//
// Memberlist's LAN defaults (probe every 1 s, suspicion 4·log10(N)·1 s)
// take about 10 s to declare a host dead at N=100. The defaults here:
//
//   - Within a region: RegionProbeInterval 100 ms, RegionProbeTimeout
//     40 ms. The timeout must stay well under half the interval: a host
//     asked to probe indirectly sends its nack one ProbeTimeout after its
//     own ping, which goes out one ProbeTimeout after the direct one, and a
//     nack after the interval counts as missing, which Lifeguard charges
//     to the prober (at half the interval every failed probe did; at 30 ms
//     scheduling delays in a loaded simulation made false suspicions). The
//     suspicion is 4·max(1, log10 n)·interval once two other hosts
//     confirm it (0.4 s for a region of up to ten hosts) and three times
//     that without confirmation (memberlist expects none in a region of
//     three or fewer). With n hosts each probing one per interval, a dead
//     host is first probed after ~0.7 intervals on average and ~3.6 at p99
//     (n = 10), so the interval bounds detection: at 100 ms a death is a
//     verdict on every host ~1 s after it (p50; p99 ~1.4 s with 100 hosts
//     in ten regions, docs/BENCHMARKS.md), where 200 ms would put p99
//     near 2 s by the same count. The probes cost ~1.3 KB/s per host.
//     With 10% loss a probe fails 19% of the time, each of four indirect
//     paths 34%, and the TCP fallback rarely; a false suspicion has 1.2 s
//     to be refuted, and a false death still has to get past the issuers'
//     own pings, their health and the quorum of two.
//   - ProbeInterval 300 ms, ProbeTimeout 150 ms. A dead host is first
//     probed after about one interval on average (every host probes one
//     peer per interval), ~4.6 intervals at p99. The timeout covers RTTs
//     within a continent; the rest of the interval leaves time for the
//     indirect probes, and an ack that arrives before the interval ends
//     still counts. For clusters whose farthest hosts are more than
//     ~150 ms apart, raise both (ProbeTimeout above the worst RTT, the
//     interval about twice it): with the regional detectors this slows
//     only the detection of lone hosts and whole regions.
//   - IndirectChecks 4 (memberlist: 3). With 10% loss a direct probe fails
//     19% of the time and each indirect path 34%; four paths make a false
//     suspicion rare (0.19·0.34⁴ ≈ 0.3% of probes) before the TCP fallback.
//   - SuspicionMult 3, SuspicionMaxTimeoutMult 4. The suspicion timeout is
//     3·log10(N)·interval once one other host confirms (1.8 s at N=100),
//     and four times that without confirmation: a real death is confirmed
//     by the next prober within an interval or so, while a false suspicion
//     from one lossy probe has seconds to be refuted.
//   - GossipInterval 50 ms, GossipNodes 4, RetransmitMult 4. A delta
//     reaches most hosts in log4(N) rounds; fan-out of 4 every 50 ms is
//     about 80 packets a second per host while there is news, none when
//     there is not.
//   - PushPullInterval 10 s (scaled by memberlist beyond 32 hosts) carries
//     the membership; AntiEntropyInterval 5 s the facts. Memberlist's
//     packet compression is off: records are already compact and its LZW
//     writer was a quarter of the CPU of a 100-host simulation.
//
// The wire format is the package's own binary encoding rather than JSON or
// msgpack: about half the size of JSON, no reflection, and every length
// checked before allocating, so it is cheap to fuzz (FuzzDecodeRecord) and
// a hostile record costs no more than its own size to reject. The limits on
// what a machine's config puts in a record are the api package's, which the
// Machines API enforces first; a machine that breaks them anyway is left out
// of its host's facts (Publish reports it) rather than stopping the host
// from publishing. A machine's record carries its load (requests in flight
// through its host's proxy, at most MaxLoad); the host republishes it at
// most every few hundred milliseconds and only when it changed, and a change
// costs one machine upsert, like a check status. Format 2 added it; format
// 3 added each service's autostop, autostart and min_machines_running, and
// each machine's primary region and draining flag (autostop's). A host
// refuses a record of another format rather than misreading it, so hosts
// of two formats in one cluster do not see each other's facts. The types
// are JSON-encodable for APIs and logs.
//
// # Trust
//
// With a Trust (trust.go) every record is its issuer's own: deltas sign
// their bytes and the state they lead to, full facts carry their owner's
// certificate and state signature, verdicts sign themselves, and a
// receiver checks each new record against a certificate of the CA naming
// the owner (or issuer) before it is used or relayed; a record it cannot
// check yet waits for the owner's full facts, pulled with its certificate.
// Revoked serials (Revoke) drop a host's facts and refuse its records. The
// keyring (Config.GossipKeys, SetGossipKeys) encrypts the gossip itself.
package cluster
