package proccluster

import (
	"math"
	"time"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/server"
)

// The bounds tests wait within, derived from the protocols' own timings
// (the cluster's and the reconciler's defaults, which `flame agent` and
// `flame server` run with), never measured: each is the protocol's worst
// case stretched by Slack.

// Slack stretches a protocol's worst case into a bound on a busy machine.
// The members' timers fire on time, but the processes that must answer
// them wait for a core: `go test ./...` runs one test binary per core
// beside a cluster's five processes, and a shared machine may run a few
// suites at once, so a step may take several times its share. Four times
// the worst case covers that; a cluster slower than that is broken.
const Slack = 4

// spread bounds memberlist's dissemination of one broadcast to n members:
// it is retransmitted RetransmitMult·⌈log10(n+1)⌉ times, one gossip
// interval apart.
func spread(n int) time.Duration {
	return time.Duration(cluster.DefaultRetransmitMult*int(math.Ceil(math.Log10(float64(n+1))))) * cluster.DefaultGossipInterval
}

// DetectBound bounds how long after a member of n dies, stalls or is cut
// off every other member holds it dead, by the cluster-wide detector alone
// (the regional one is faster; this one has the last word): each member
// probes the others in a shuffled round robin, so the lost one is probed
// within two rounds; its suspicion lasts at most
// SuspicionMult·SuspicionMaxTimeoutMult·max(1, log10 n) probe intervals;
// then the news spreads.
func DetectBound(n int) time.Duration {
	probe := time.Duration(2*(n-1))*cluster.DefaultProbeInterval + cluster.DefaultProbeTimeout
	suspicion := time.Duration(float64(cluster.DefaultSuspicionMult*cluster.DefaultSuspicionMaxTimeoutMult) *
		max(1, math.Log10(float64(n))) * float64(cluster.DefaultProbeInterval))
	return Slack * (probe + suspicion + spread(n))
}

// HealBound bounds how long after a partition heals, or a member returns,
// every member of n holds every other alive: each member tries to reach
// one it holds dead every ReconnectInterval (the cut-off member holds all
// the others dead and reaches any; the others hold only it dead), a member
// dead by a region's verdict is pinged at most 16 probe intervals apart,
// and the member's news of being alive spreads. A cluster forming, every
// member joining every other at once, converges within the same.
func HealBound(n int) time.Duration {
	return Slack * (cluster.DefaultReconnectInterval + 16*cluster.DefaultProbeInterval + spread(n))
}

// FactsBound bounds how long a host's new facts (a machine started) take
// to reach every other host: gossip carries them at once, and what it
// misses the next anti-entropy exchange mends.
func FactsBound(n int) time.Duration {
	return Slack * (cluster.DefaultAntiEntropyInterval + spread(n))
}

// FormBound bounds how long a new cluster of n members takes to see every
// member alive everywhere once each serves.
func FormBound(n int) time.Duration { return HealBound(n) }

// machineStart bounds how long a host takes to create and start a machine
// of the exec driver (a process of the flame binary: a fork and an exec)
// and publish it.
const machineStart = time.Second

// ReconcileBound bounds how long after a change of hosts — a host dead, or
// back with machines the control plane replaced meanwhile — the catalog
// and the hosts hold a group's declared counts exactly again: the change
// is known within DetectBound (or HealBound); the reconciler replaces a
// lost machine on its next pass (on the change, and every
// DefaultReconcileInterval) and destroys one left behind on a host that
// returned on the first pass after SettleInterval, which starts the
// machine or destroys it within machineStart.
func ReconcileBound(n int) time.Duration {
	return max(DetectBound(n), HealBound(n)) +
		Slack*(server.SettleInterval+server.DefaultReconcileInterval+machineStart)
}
