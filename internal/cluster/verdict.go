package cluster

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"time"
)

// verdictQuorum is how many hosts of a host's region must declare it dead
// before this host believes them (fewer when the region has fewer other
// hosts up): one host's detector, stalled or broken, cannot kill another
// host in everyone's view.
const verdictQuorum = 2

// verdictRetransmits multiplies RetransmitMult for verdicts. Facts have
// anti-entropy to mend what gossip misses; a verdict has only its flood,
// in which every host passes each verdict new to it to RetransmitMult·
// log10(N) others: at 10% loss that misses a given host with probability
// e^(-0.9·4·2) ≈ 0.07% at N=100, which, over a hundred hosts and a region
// with few issuers left, left a host short of the quorum now and then.
// Three times as many sends make a miss about e^-22. Verdicts are a few
// dozen bytes, one per issuer per death.
const verdictRetransmits = 3

// maxVerifies bounds the direct pings in flight to hosts dead by verdict, and
// maxVerifyGap their spacing, in probe intervals, once a host keeps not
// answering.
const (
	maxVerifies  = 16
	maxVerifyGap = 16
)

// The rules below decide what a host believes of another from its region's
// verdicts and from signs of life. They do no I/O and read no clock.

// accuse applies a dead verdict issued at `at` by `from`, a host of m's
// region, when `need` distinct hosts must agree. fresh says the verdict
// told this host something new (worth passing on); changed, that m is now
// dead by verdict.
func (m *member) accuse(from string, at int64, need int, now time.Time) (fresh, changed bool) {
	if m.verdict == 0 && m.status != StatusAlive && m.status != StatusSuspect {
		return false, false // dead or left by memberlist's own word
	}
	if at <= m.heard || m.accusers[from] >= at {
		return false, false // it showed life since, or this verdict is known
	}
	if m.accusers == nil {
		m.accusers = map[string]int64{}
	}
	m.accusers[from] = at
	if m.verdict != 0 {
		m.verdict = max(m.verdict, at)
		return true, false
	}
	if len(m.accusers) < need {
		return true, false
	}
	for _, t := range m.accusers {
		m.verdict = max(m.verdict, t)
	}
	m.status, m.since = StatusDead, now
	return true, true
}

// vouch applies a sign of life dated `at` on the clock of whoever saw it (an
// alive verdict): accusations made before it no longer count, and m returns
// to alive if every one that held it dead is older. fresh says it was news.
func (m *member) vouch(at int64, now time.Time) (fresh, changed bool) {
	if at <= m.heard {
		return false, false
	}
	m.heard = at
	for f, t := range m.accusers {
		if t <= at {
			delete(m.accusers, f)
		}
	}
	if m.verdict == 0 || at <= m.verdict {
		return true, false
	}
	m.verdict = 0
	m.status, m.since = StatusAlive, now
	return true, true
}

// sawAlive applies direct evidence of life seen by this host now — a probe
// answered, memberlist's news that the host is alive — which overrides any
// verdict. It reports whether m returns to alive.
func (m *member) sawAlive(now time.Time) bool {
	if !m.acquit(now) {
		return false
	}
	m.status, m.since = StatusAlive, now
	return true
}

// acquit is sawAlive without the status change, for callers that set the
// status themselves. It reports whether a verdict held m dead.
func (m *member) acquit(now time.Time) bool {
	m.heard = max(m.heard, now.UnixNano())
	clear(m.accusers)
	held := m.verdict != 0
	m.verdict = 0
	return held
}

// sawDown records memberlist's own verdict (dead or left), which replaces
// the region's.
func (m *member) sawDown() {
	m.verdict = 0
	clear(m.accusers)
}

// deadByVerdict reports whether m is dead on its region's word only: this
// host's own memberlist still holds it up.
func (m *member) deadByVerdict() bool { return m.verdict != 0 }

// verdictOutcome is what a verdict did here.
type verdictOutcome int

const (
	verdictIgnored  verdictOutcome = iota // nothing new, or not for this host to judge
	verdictRejected                       // from a host that may not issue it
	verdictNews                           // recorded; pass it on
	verdictChanged                        // changed the host's status; pass it on
)

// judgeLocked applies a verdict, received or this host's own; c.mu is held.
// Another host's dead verdict counts towards the quorum; this host's own
// regional detector is enough for its own view, as its cluster-wide one is.
func (c *Cluster) judgeLocked(v *verdict, now time.Time) (verdictOutcome, error) {
	if v.Host == c.cfg.HostID {
		return verdictIgnored, nil // this host knows it is alive
	}
	x, from := c.members[v.Host], c.members[v.From]
	if x == nil || x.meta == nil || from == nil || from.meta == nil {
		return verdictIgnored, nil // not known here yet
	}
	if from.meta.Region != x.meta.Region {
		return verdictRejected, fmt.Errorf("verdict about %s (%s) from %s of %s", v.Host, x.meta.Region, v.From, from.meta.Region)
	}
	if from.status != StatusAlive && from.status != StatusSuspect {
		return verdictIgnored, nil
	}
	var fresh, changed bool
	if v.Dead {
		if x.meta.Leaving {
			return verdictIgnored, nil // it is leaving, not dying
		}
		need := 1
		if v.From != c.cfg.HostID {
			need = c.quorumLocked(v.Host, x.meta.Region)
		}
		fresh, changed = x.accuse(v.From, int64(v.At), need, now)
		if changed {
			x.verifyAt, x.verifyGap = now, c.cfg.ProbeInterval
			c.log.Info("host dead by its region's verdict", "id", v.Host, "from", v.From, "accusers", len(x.accusers))
		}
	} else {
		fresh, changed = x.vouch(int64(v.At), now)
		if changed {
			c.log.Info("host alive by its region's verdict", "id", v.Host, "from", v.From)
		}
	}
	switch {
	case changed:
		c.changedLocked(v.Host)
		c.stats.verdicts.Add(1)
		return verdictChanged, nil
	case fresh:
		return verdictNews, nil
	}
	return verdictIgnored, nil
}

// quorumLocked is how many hosts of a region must declare one of them dead:
// verdictQuorum, or every other host of the region this host holds up when
// there are fewer; c.mu is held.
func (c *Cluster) quorumLocked(id, region string) int {
	n := 0
	for oid, m := range c.members {
		if oid != id && m.meta != nil && m.meta.Region == region && (m.status == StatusAlive || m.status == StatusSuspect) {
			n++
			if n >= verdictQuorum {
				break
			}
		}
	}
	return max(n, 1)
}

func (c *Cluster) receiveVerdict(v *verdict, now time.Time) {
	if err := validateVerdict(v, now, c.cfg.stretch(maxVerdictAge)); err != nil {
		c.drop("invalid verdict", err)
		return
	}
	if v.From == c.cfg.HostID {
		return // this host's own, come back
	}
	if !c.checkVerdict(v) {
		return
	}
	c.mu.Lock()
	out, err := c.judgeLocked(v, now)
	c.mu.Unlock()
	switch out {
	case verdictRejected:
		c.drop("verdict from outside the host's region", err)
	case verdictNews, verdictChanged:
		c.stats.relayed.Add(1)
		c.enqueueVerdict(v.encoded)
	}
}

// issue applies a verdict of this host's regional detector and gossips it.
func (c *Cluster) issue(id string, dead bool) {
	now := c.cfg.Now()
	v := &verdict{From: c.cfg.HostID, Host: id, Dead: dead, At: uint64(now.UnixNano())}
	c.mu.Lock()
	v.encoded = signed(c.signingKeyLocked(), verdictBody(v))
	if dead {
		c.accused[id] = true
	} else {
		delete(c.accused, id)
	}
	_, _ = c.judgeLocked(v, now)
	c.mu.Unlock()
	c.stats.issued.Add(1)
	c.enqueueVerdict(v.encoded)
}

// enqueueVerdict adds a verdict to its gossip queue, pruning it past
// maxQueued.
func (c *Cluster) enqueueVerdict(msg []byte) {
	c.verdicts.QueueBroadcast(&broadcast{msg: msg})
	if c.verdicts.NumQueued() > maxQueued {
		c.verdicts.Prune(maxQueued)
	}
}

// verifyLoop pings, now and then, every host dead by its region's verdict
// while this host's own memberlist still holds it up: an answer overrides
// the verdict (a host cut off from its region only, or a forged verdict),
// and the pings stop once memberlist agrees it is dead. The gap between
// pings doubles from ProbeInterval up to maxVerifyGap of them.
func (c *Cluster) verifyLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.ProbeInterval)
	defer t.Stop()
	inFlight := make(chan struct{}, maxVerifies)
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := c.cfg.Now()
		var due []verifyTarget
		c.mu.Lock()
		for _, id := range c.byVerdict {
			if m := c.members[id]; m != nil && m.deadByVerdict() && m.node.Addr != nil && !now.Before(m.verifyAt) {
				due = append(due, verifyTarget{id: id, addr: &net.UDPAddr{IP: m.node.Addr, Port: int(m.node.Port)}})
				m.verifyGap = min(2*m.verifyGap, maxVerifyGap*c.cfg.ProbeInterval)
				// Jitter, so the hosts that took one verdict do not all
				// ping at once.
				m.verifyAt = now.Add(m.verifyGap/2 + rand.N(m.verifyGap/2+1))
			}
		}
		c.mu.Unlock()
		for _, d := range due {
			select {
			case inFlight <- struct{}{}:
			default:
				continue // checked on a later round
			}
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				defer func() { <-inFlight }()
				if _, err := c.ml.Ping(d.id, d.addr); err == nil {
					c.mu.Lock()
					if m := c.members[d.id]; m != nil && m.sawAlive(c.cfg.Now()) {
						c.log.Info("host dead by verdict answers; alive", "id", d.id)
						c.changedLocked(d.id)
					}
					c.mu.Unlock()
				}
			}()
		}
	}
}

type verifyTarget struct {
	id   string
	addr net.Addr
}
