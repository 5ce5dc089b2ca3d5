package cluster

import (
	"bytes"
	"context"
	"log/slog"
	"maps"
	"net"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// maxQueued bounds the gossip queue; past it the most-sent messages are
// dropped (a host that misses one repairs the gap with a pull).
const maxQueued = 2048

// delegate is the cluster as memberlist sees it. Memberlist calls the event
// methods with its own lock held, so none of them calls back into
// memberlist.
type delegate struct{ c *Cluster }

var (
	_ memberlist.Delegate      = (*delegate)(nil)
	_ memberlist.EventDelegate = (*delegate)(nil)
	_ memberlist.PingDelegate  = (*delegate)(nil)
)

func (d *delegate) NodeMeta(limit int) []byte {
	meta := d.c.metaNow()
	if len(meta) > limit {
		// Validate keeps the meta under memberlist's limit; a smaller
		// limit here would be a memberlist change.
		d.c.log.Error("node meta over limit", "bytes", len(meta), "limit", limit)
		return nil
	}
	return meta
}

func (d *delegate) NotifyMsg(b []byte) {
	d.c.receive(bytes.Clone(b), false)
}

// GetBroadcasts gives verdicts first, then facts.
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte {
	msgs := d.c.verdicts.GetBroadcasts(overhead, limit)
	for _, m := range msgs {
		limit -= overhead + len(m)
	}
	return append(msgs, d.c.queue.GetBroadcasts(overhead, limit)...)
}

// LocalState is this host's side of anti-entropy: a digest of the versions
// it holds, not the facts. The other side answers with full facts for what
// is newer there, and this host does the same for its digest.
func (d *delegate) LocalState(join bool) []byte {
	return encodeDigest(d.c.localDigest())
}

func (d *delegate) MergeRemoteState(buf []byte, join bool) {
	d.c.receive(bytes.Clone(buf), true)
	if join {
		d.c.joinedBy()
	}
}

func (d *delegate) NotifyJoin(n *memberlist.Node) { d.c.memberUp(n) }

func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.c.memberUp(n) }

func (d *delegate) NotifyLeave(n *memberlist.Node) {
	c := d.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if m := c.members[n.Name]; m != nil && n.Name != c.cfg.HostID {
		s := StatusDead
		if m.meta != nil && m.meta.Leaving {
			s = StatusLeft
		}
		c.log.Info("host down", "id", n.Name, "status", s)
		m.sawDown()
		c.setStatus(n.Name, s)
	}
}

func (d *delegate) AckPayload() []byte { return nil }

// NotifyPingComplete feeds a probe's round trip into the host's smoothed
// RTT (an EWMA weighting the newest sample 1/5). A snapshot shows a new RTT
// only when it moved by a fifth or more, so probes do not wake every
// subscriber.
func (d *delegate) NotifyPingComplete(n *memberlist.Node, rtt time.Duration, _ []byte) {
	c := d.c
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[n.Name]
	if m == nil {
		return
	}
	if m.sawAlive(c.cfg.Now()) {
		c.log.Info("host dead by verdict answers a probe; alive", "id", n.Name)
		c.changedLocked(n.Name)
	}
	if rtt <= 0 {
		return
	}
	if m.rtt == 0 {
		m.rtt = rtt
	} else {
		m.rtt = (4*m.rtt + rtt) / 5
	}
	if m.status == StatusSuspect {
		m.status = StatusAlive
		m.since = c.cfg.Now()
		c.changedLocked(n.Name)
	}
	diff := m.rtt - m.shown
	if m.shown == 0 || diff > m.shown/5 || -diff > m.shown/5 {
		m.shown = m.rtt
		c.changedLocked(n.Name)
	}
}

// memberUp records a host memberlist sees alive (joined, back, or with new
// advertised facts).
func (c *Cluster) memberUp(n *memberlist.Node) {
	node := *n
	node.Meta = bytes.Clone(n.Meta)
	meta, err := decodeMeta(node.Meta)
	if err == nil {
		err = validateMeta(meta)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[node.Name]
	if m == nil {
		m = &member{}
		c.members[node.Name] = m
		i, _ := slices.BinarySearch(c.order, node.Name)
		c.order = slices.Insert(c.order, i, node.Name)
	}
	m.node = node
	if err != nil {
		m.meta, m.addrs = nil, nil
		c.stats.dropped.Add(1)
		c.log.Warn("host advertises invalid facts; ignoring it", "id", node.Name, "err", err)
	} else {
		m.meta = meta
		m.addrs = maps.Clone(meta.Addrs)
		if m.addrs == nil {
			m.addrs = map[string]string{}
		}
		m.addrs["gossip"] = net.JoinHostPort(node.Addr.String(), strconv.Itoa(int(node.Port)))
	}
	now := c.cfg.Now()
	m.acquit(now)
	if m.status != StatusAlive {
		if m.status != "" {
			c.log.Info("host up", "id", node.Name, "was", m.status)
		}
		m.status = StatusAlive
		m.since = now
		if node.Name != c.cfg.HostID && len(c.comeUp) < 64 {
			c.comeUp = append(c.comeUp, node.Name)
		}
	}
	if !c.cfg.NoRegionDetector && node.Name != c.cfg.HostID && m.meta != nil && m.meta.Region == c.cfg.Region {
		c.wakeRegion()
	}
	c.changedLocked(node.Name)
}

// Stats counts what this member did with records since it started.
type Stats struct {
	Published    uint64 // own deltas made by Publish
	Applied      uint64 // records that changed an owner's facts
	Pending      uint64 // deltas that arrived ahead of their base
	Stale        uint64 // duplicates and records older than held
	Dropped      uint64 // malformed, invalid or hostile records rejected
	Unverified   uint64 // records set aside: their issuer's certificate not held yet
	Relayed      uint64 // deltas and verdicts passed on by gossip
	Pulls        uint64 // full facts asked for to repair a gap
	FullSent     uint64 // owners' full facts sent to others
	SendsDropped uint64 // stream sends dropped because the queue was full
	Issued       uint64 // verdicts of this host's regional detector
	Verdicts     uint64 // hosts' statuses changed by their region's verdicts
	Queued       int    // messages waiting in the gossip queue
}

type counters struct {
	published, applied, pending, stale, dropped, relayed, pulls, fullSent, sendsDropped, unverified atomic.Uint64
	issued, verdicts                                                                                atomic.Uint64
}

// Stats returns the member's counters.
func (c *Cluster) Stats() Stats {
	s := &c.stats
	return Stats{
		Published: s.published.Load(), Applied: s.applied.Load(), Pending: s.pending.Load(),
		Stale: s.stale.Load(), Dropped: s.dropped.Load(), Unverified: s.unverified.Load(), Relayed: s.relayed.Load(),
		Pulls: s.pulls.Load(), FullSent: s.fullSent.Load(), SendsDropped: s.sendsDropped.Load(),
		Issued: s.issued.Load(), Verdicts: s.verdicts.Load(),
		Queued: c.queue.NumQueued() + c.verdicts.NumQueued(),
	}
}

// logWriter turns memberlist's log lines ("[WARN] memberlist: …") into
// structured records at the matching level.
type logWriter struct{ log *slog.Logger }

func (w *logWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for prefix, l := range map[string]slog.Level{
		"[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo,
		"[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError,
	} {
		if len(line) >= len(prefix) && line[:len(prefix)] == prefix {
			level = l
			line = string(bytes.TrimSpace([]byte(line[len(prefix):])))
			break
		}
	}
	// Memberlist reports a peer's failed probe at ERR and a suspicion at
	// INFO; to the host these are routine, so they are one level quieter.
	if level > slog.LevelDebug {
		level -= 4
	}
	w.log.Log(context.Background(), level, line, "from", "memberlist")
	return len(p), nil
}
