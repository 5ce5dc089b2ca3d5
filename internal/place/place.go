// Package place provides Flame's placement decisions: which hosts a new
// machine should be asked to run on, best first, and, when capacity is
// scarce, whose pending request is served next and whose burst is given
// back first (Dominant Resource Fairness).
//
// # Placement
//
// Every host that is healthy (Health > 0), not excluded, and has room for
// the guest in its free capacity is a candidate, scored
//
//	S = α/L + β·C/Cmax + γ·H − spread·k
//
// where L is the round trip in milliseconds from the target region to the
// host's region, floored at 1 ms (so every host of the target region has the
// same latency term); C is the host's free capacity normalised by its
// dominant resource, the smaller of free/capacity over CPUs and memory, with
// Cmax = 1; H is the host's health; and k is how many machines of the same
// app the host already runs, so an app's machines spread over hosts.
//
// A request names its regions as a preference list. Candidates of an earlier
// entry always come before those of a later one, whatever their scores:
// ["syd", "any"] ranks every fitting syd host first, then every other host
// by its score with L measured from syd. "any" stands for every region not
// named before it and measures L from the first named region of the list;
// an empty list, or "any" with no named region, means any host with no
// latency preference (the latency term is left out).
//
// An Index is an immutable view of the hosts of one cluster snapshot, grouped
// by region with the round trips between its regions computed once, so that
// a decision scans only the regions it may use and keeps a bounded top-n
// rather than sorting every host. Equal scores are ordered by the caller's
// random source, so equal hosts share the load; the same seed gives the same
// order. The control plane uses a ranking like a market: it asks the best
// candidate's host, and on a refusal asks the next one, or ranks again with
// the refusing host in Request.Exclude. After a placement, Index.With gives a
// new view with the host's new free capacity.
//
// # Fairness
//
// Fair keeps what each org has been allocated against the cluster's total.
// An org's dominant share is the larger of its share of all CPUs and its
// share of all memory; under contention the pending request of the org with
// the lowest dominant share is served first (Fair.Next), which is Dominant
// Resource Fairness: orgs left waiting end within one task of each other.
//
// Allocation is elastic in time: Fair.Allocate never refuses, so an org may
// run above its fair share (one over the number of active orgs) while the
// capacity would otherwise sit idle. When another org below its fair share
// is then waiting for room, Fair.Reclaim names the orgs that are bursting
// above their share, most over first, and how much of each should be given
// back; orgs at or below their share are never named.
//
// The package is pure: no I/O, no clock, no goroutines. Randomness comes in
// as a Rand (a *math/rand/v2.Rand satisfies it); the package never draws its
// own.
package place

import (
	"fmt"
	"time"
)

// Resources is an amount of compute: CPUs and memory. It is the one type
// for it: a guest's size, a host's capacity and what it has free, in
// placement, in the cluster's records (cluster.Resources) and in a host's
// admission (agent.Capacity).
type Resources struct {
	CPUs     int `json:"cpus"`
	MemoryMB int `json:"memory_mb"`
}

// Add returns r + o.
func (r Resources) Add(o Resources) Resources {
	return Resources{CPUs: r.CPUs + o.CPUs, MemoryMB: r.MemoryMB + o.MemoryMB}
}

// Sub returns r − o; the result may be negative.
func (r Resources) Sub(o Resources) Resources {
	return Resources{CPUs: r.CPUs - o.CPUs, MemoryMB: r.MemoryMB - o.MemoryMB}
}

// Fits reports whether r fits in `in`: no resource of r exceeds that of in.
// guest.Fits(host.Free) asks whether a guest has room on a host.
func (r Resources) Fits(in Resources) bool {
	return r.CPUs <= in.CPUs && r.MemoryMB <= in.MemoryMB
}

// IsZero reports whether r has no CPUs and no memory.
func (r Resources) IsZero() bool { return r.CPUs == 0 && r.MemoryMB == 0 }

func (r Resources) String() string { return fmt.Sprintf("%dcpu/%dMB", r.CPUs, r.MemoryMB) }

// Host is what placement knows of one host.
type Host struct {
	ID       string
	Region   string
	Capacity Resources
	Free     Resources
	// Health is in [0,1]; a host at 0 or below (dead, draining) is never a
	// candidate.
	Health float64
}

// FreeFraction returns the host's free capacity normalised by its dominant
// resource: the smaller of Free/Capacity over CPUs and memory, in [0,1]. A
// resource with no capacity is left out; a host with none at all has 0.
func (h Host) FreeFraction() float64 {
	c, known := 1.0, false
	if h.Capacity.CPUs > 0 {
		c, known = min(c, float64(h.Free.CPUs)/float64(h.Capacity.CPUs)), true
	}
	if h.Capacity.MemoryMB > 0 {
		c, known = min(c, float64(h.Free.MemoryMB)/float64(h.Capacity.MemoryMB)), true
	}
	if !known {
		return 0
	}
	return max(0, c)
}

// Weights are the coefficients of the placement score.
type Weights struct {
	// Alpha weighs the latency term α/L, L being the round trip in ms from
	// the target region to the host's region, floored at 1 ms.
	Alpha float64
	// Beta weighs the capacity term β·C/Cmax (Host.FreeFraction, Cmax = 1).
	Beta float64
	// Gamma weighs the health term γ·H.
	Gamma float64
	// Spread is subtracted for each machine of the same app already on the
	// host.
	Spread float64
}

// DefaultWeights returns the weights the control plane places with:
// α = 10000, β = 1, γ = 1, spread = 3.
//
// Latency dominates across regions: with α = 10000 a region 1 ms away
// scores 10000 and one 10 ms away 1000, and between two far regions the
// latency term still differs by more than everything capacity and health
// can add (β + γ = 2) whenever their round trips differ by more than
// 2·L²/α — 2 ms at 100 ms away, 12.5 ms at 250 ms. Regions closer to each
// other than that are peers, and the less loaded, healthier one wins.
//
// Within a region every host has the same latency term, so capacity and
// spread decide: spread = 3 exceeds the most that capacity and health
// together can tell two hosts apart by (2), so an app's next machine goes to
// a host that runs fewer of its machines whenever one has room, and the
// emptier, healthier host wins between hosts that run equally many.
func DefaultWeights() Weights {
	return Weights{Alpha: 10000, Beta: 1, Gamma: 1, Spread: 3}
}

// NoLatency, passed as the round trip to Score, leaves the latency term out:
// the request has no region preference.
const NoLatency time.Duration = -1

// Score returns a host's placement score for a machine of an app that
// already has `machines` machines on it, rtt away from the target region
// (NoLatency when there is none). It does not check that the host is a
// candidate. Index.Rank scores with the same arithmetic.
func Score(h Host, rtt time.Duration, machines int, w Weights) float64 {
	lat := 0.0
	if rtt >= 0 {
		lat = w.Alpha / latencyMs(rtt)
	}
	return score(lat, h.FreeFraction(), health(h.Health), machines, w)
}

// score is the one place the terms are added up, so that Score and the
// index agree to the last bit.
func score(lat, free, health float64, machines int, w Weights) float64 {
	s := lat + w.Beta*free + w.Gamma*health
	if machines != 0 {
		s -= w.Spread * float64(machines)
	}
	return s
}

// latencyMs is L: the round trip in milliseconds, floored at 1 ms.
func latencyMs(rtt time.Duration) float64 {
	return max(1, float64(rtt)/float64(time.Millisecond))
}

// health clamps a health above 1 to 1.
func health(h float64) float64 { return min(h, 1) }

// Request asks where one machine should go.
type Request struct {
	// Org and App name the requester, for the caller's books and Fair;
	// ranking reads AppHosts, not these.
	Org, App string
	// Regions is the preference list, e.g. ["syd"] or ["syd", "any"]. An
	// empty list means any host, with no latency preference.
	Regions []string
	// Guest must fit in a candidate's Free.
	Guest Resources
	// AppHosts counts the app's machines already on each host, by host ID.
	AppHosts map[string]int
	// Exclude names hosts not to return (already asked, refused).
	Exclude map[string]bool
}

// Any, in Request.Regions, stands for every region not named before it.
const Any = "any"

// Candidate is a host that fits a request, with its score.
type Candidate struct {
	Host  Host
	Score float64
}

// RTT gives the round-trip time between two regions: the geo model's, or
// measured.
type RTT func(from, to string) time.Duration

// Rand is the random source that breaks ties between equal scores and
// chooses samples. A *math/rand/v2.Rand satisfies it; seed it to replay a
// decision.
type Rand interface {
	Uint64() uint64
}
