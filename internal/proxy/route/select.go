package route

import (
	"fmt"
	"strings"
)

// Query is one request's routing input.
type Query struct {
	// Port is the public port the request arrived on.
	Port int
	// The routing headers of the request (fly-prefer-region,
	// fly-force-region, fly-prefer-instance-id, fly-force-instance-id).
	// An instance is named by machine id or instance id.
	PreferRegion   string
	ForceRegion    string
	PreferInstance string
	ForceInstance  string
	// Rand breaks ties between equally good machines; the caller draws it
	// per request.
	Rand uint64
	// TCP is set for a raw TCP connection: only ports served as raw TCP
	// take it, as only ports served as HTTP take an HTTP request.
	TCP bool
}

// Load gives the live concurrency of a machine as the proxy counts it (its
// own requests in flight). A nil Load counts only what hosts published.
type Load interface {
	InFlight(machineID string) int
}

// Demoter is implemented by a Load that also knows which machines and hosts
// failed recently (a refused or timed-out connect): their machines are
// still candidates, but after every other.
type Demoter interface {
	Demoted(machineID, host string) bool
}

// Doubter is implemented by a Load that doubts some hosts (the edge
// suspects them, without a verdict): their machines rank after the other
// machines of their tier and region, and a preferred instance on one loses
// its preference — but they still rank before any other region's machines
// (a doubt alone never sends a request across the world).
type Doubter interface {
	Doubted(host string) bool
}

// doubted is the penalty a doubted host's machines take within their tier.
const doubted = int64(1) << 40

// key orders candidates: lower first.
type key struct {
	tier    int
	a, b, c int64
	tie     uint64
}

func (k key) less(o key) bool {
	switch {
	case k.tier != o.tier:
		return k.tier < o.tier
	case k.a != o.a:
		return k.a < o.a
	case k.b != o.b:
		return k.b < o.b
	case k.c != o.c:
		return k.c < o.c
	}
	return k.tie < o.tie
}

// Tiers, best first. A machine on a suspect host sorts after every machine
// on a live one, one in a shed region after both, and a demoted one after
// all of them.
const (
	tierPreferred = iota // fly-prefer-instance-id
	tierHomeUnderSoft
	tierHomeOverSoft
	tierAwayUnderSoft
	tierAwayOverSoft
	tiers
)

// picker keeps the best k candidates seen so far, sorted.
type picker struct {
	keys [MaxCandidates]key
	out  []*Target
	k    int
}

func (p *picker) offer(t *Target, k key) {
	n := len(p.out)
	if n == p.k {
		if !k.less(p.keys[n-1]) {
			return
		}
		n-- // the worst one drops out
	} else {
		p.out = p.out[:n+1]
	}
	i := n
	for i > 0 && k.less(p.keys[i-1]) {
		p.keys[i], p.out[i] = p.keys[i-1], p.out[i-1]
		i--
	}
	p.keys[i], p.out[i] = k, t
}

// Select orders the machines that can take a request for the app's service
// on q.Port, best first, into out (whose capacity, at most MaxCandidates,
// bounds how many are returned) and returns it. It returns no candidate when
// none can take the request: Explain then says why.
func (t *Table) Select(appName string, q Query, load Load, out []*Target) []*Target {
	p := picker{out: out[:0], k: min(cap(out), MaxCandidates)}
	a := t.apps[appName]
	if a == nil || p.k == 0 {
		return p.out
	}
	home := t.region
	if q.PreferRegion != "" {
		home = q.PreferRegion
	}
	if q.ForceRegion != "" {
		home = q.ForceRegion
	}
	dm, _ := load.(Demoter)
	sh, _ := load.(Shedder)
	dt, _ := load.(Doubter)
	idx := a.byPort[q.Port]
	if len(idx) > 0 {
		for _, i := range idx {
			t.consider(&p, &a.targets[i], &q, home, load, dm, sh, dt)
		}
	} else {
		for _, i := range a.ranges {
			if tg := &a.targets[i]; tg.lo <= q.Port && q.Port <= tg.hi {
				t.consider(&p, tg, &q, home, load, dm, sh, dt)
			}
		}
	}
	return p.out
}

func (t *Table) consider(p *picker, tg *Target, q *Query, home string, load Load, dm Demoter, sh Shedder, dt Doubter) {
	if tg.Excluded != Included || tg.Handler.Raw() != q.TCP {
		return
	}
	if q.ForceInstance != "" && q.ForceInstance != tg.MachineID && q.ForceInstance != tg.InstanceID {
		return
	}
	if q.ForceRegion != "" && tg.Region != q.ForceRegion {
		return
	}
	n := tg.Published
	if load != nil {
		n = max(n, load.InFlight(tg.MachineID))
	}
	if n >= tg.HardLimit {
		return
	}
	k := key{tie: mix(tg.slot ^ q.Rand)}
	over := n >= tg.SoftLimit
	doubt := dt != nil && dt.Doubted(tg.Host)
	switch {
	case q.PreferInstance != "" && (q.PreferInstance == tg.MachineID || q.PreferInstance == tg.InstanceID) && !doubt:
		k.tier = tierPreferred
	case tg.Region == home:
		k.tier = tierHomeUnderSoft
		if over {
			k.tier = tierHomeOverSoft
		}
		k.a, k.b = int64(n), int64(tg.RTT)
		if doubt {
			k.a += doubted
		}
	default:
		k.tier = tierAwayUnderSoft
		if over {
			k.tier = tierAwayOverSoft
		}
		k.a, k.b, k.c = int64(tg.regionRank), int64(n), int64(tg.RTT)
		if doubt {
			k.b += doubted
		}
	}
	// Penalties, each outweighing the ones before: a suspect host, a shed
	// region, a demoted machine or host.
	if tg.suspect {
		k.tier += tiers
	}
	if sh != nil && sh.Shed(tg.App, tg.Region, q.Rand) {
		k.tier += 2 * tiers
	}
	if dm != nil && dm.Demoted(tg.MachineID, tg.Host) {
		k.tier += 4 * tiers
	}
	p.offer(tg, k)
}

// Explain says why Select found no candidate for the query: which rule left
// each of the app's machines out. It allocates, and is meant for the answer
// to a request that could not be routed.
func (t *Table) Explain(appName string, q Query, load Load) string {
	a := t.apps[appName]
	if a == nil {
		return fmt.Sprintf("no machine of app %q is known", appName)
	}
	targets := t.Targets(appName, q.Port)
	if len(targets) == 0 {
		return fmt.Sprintf("app %q has %d machine(s) but none with a service on port %d", appName, a.machines, q.Port)
	}
	var counts [len(exclusionText) + 1]int
	const atHard = len(exclusionText)
	considered := 0
	for _, tg := range targets {
		if q.ForceInstance != "" && q.ForceInstance != tg.MachineID && q.ForceInstance != tg.InstanceID {
			continue
		}
		if q.ForceRegion != "" && tg.Region != q.ForceRegion {
			continue
		}
		considered++
		if tg.Excluded != Included {
			counts[tg.Excluded]++
			continue
		}
		n := tg.Published
		if load != nil {
			n = max(n, load.InFlight(tg.MachineID))
		}
		if n >= tg.HardLimit {
			counts[atHard]++
		}
	}
	switch {
	case q.ForceInstance != "" && considered == 0 && q.ForceRegion != "":
		return fmt.Sprintf("instance %q (fly-force-instance-id) is not a machine of app %q in region %q (fly-force-region) with a service on port %d", q.ForceInstance, appName, q.ForceRegion, q.Port)
	case q.ForceInstance != "" && considered == 0:
		return fmt.Sprintf("instance %q (fly-force-instance-id) is not a machine of app %q with a service on port %d", q.ForceInstance, appName, q.Port)
	case q.ForceRegion != "" && considered == 0:
		return fmt.Sprintf("app %q has no machine in region %q (fly-force-region) with a service on port %d", appName, q.ForceRegion, q.Port)
	}
	var parts []string
	for e := NotStarted; int(e) < len(exclusionText); e++ {
		if counts[e] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[e], e))
		}
	}
	if counts[atHard] > 0 {
		parts = append(parts, fmt.Sprintf("%d at hard limit", counts[atHard]))
	}
	what := "machine(s)"
	switch {
	case q.ForceInstance != "":
		what = fmt.Sprintf("machine(s) matching instance %q (fly-force-instance-id)", q.ForceInstance)
	case q.ForceRegion != "":
		what = fmt.Sprintf("machine(s) in region %q (fly-force-region)", q.ForceRegion)
	}
	if len(parts) == 0 {
		return fmt.Sprintf("none of %d %s of app %q can take the request", considered, what, appName)
	}
	return fmt.Sprintf("none of %d %s of app %q can take the request: %s", considered, what, appName, strings.Join(parts, ", "))
}
