package cluster

import (
	"bytes"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/hashicorp/memberlist"
)

// Publish makes facts this host's current facts. The cluster works out what
// changed since the last call, gives the change the next version, and
// spreads it: straight to the hosts of this region, by gossip to the rest.
// Check outputs longer than the wire allows are truncated.
//
// A machine that breaks the rules every host checks records against (or
// repeats an id, or is one more than Config.MaxMachines) is left out and
// the rest are published: one bad record never freezes the host's facts.
// The error is then a *RejectedError naming what was left out. Host-level
// facts that break the rules publish nothing.
func (c *Cluster) Publish(f HostFacts) error {
	if err := validateHostLevel(c.cfg.HostID, f.Free, f.Load); err != nil {
		return fmt.Errorf("publish: %w", err)
	}
	ms := make([]Machine, 0, len(f.Machines))
	var rejected map[string]error
	seen := make(map[string]bool, len(f.Machines))
	for _, m := range f.Machines {
		m.Host = ""
		m.Checks = slices.Clone(m.Checks)
		for j := range m.Checks {
			m.Checks[j].Output = api.Clip(m.Checks[j].Output, maxOutputLen)
		}
		err := validateMachine(&m)
		switch {
		case err != nil:
		case seen[m.ID]:
			err = invalid("machine %s listed twice", m.ID)
		case len(ms) >= c.cfg.MaxMachines:
			err = invalid("machine %s is over the limit of %d machines per host", m.ID, c.cfg.MaxMachines)
		}
		if err != nil {
			if rejected == nil {
				rejected = map[string]error{}
			}
			if _, dup := rejected[m.ID]; !dup {
				rejected[m.ID] = err
			}
			continue
		}
		seen[m.ID] = true
		ms = append(ms, m)
	}
	slices.SortFunc(ms, func(a, b Machine) int { return compareStrings(a.ID, b.ID) })

	c.mu.Lock()
	deltas := c.diffLocked(ms, f.Free, f.Load)
	for _, d := range deltas {
		c.store.applyLocal(d)
	}
	if len(deltas) > 0 {
		c.changedLocked(c.cfg.HostID)
	}
	var region []memberlist.Node
	if c.started.Load() {
		for id, m := range c.members {
			if id != c.cfg.HostID && m.meta != nil && m.meta.Region == c.cfg.Region && m.status == StatusAlive {
				region = append(region, m.node)
			}
		}
	}
	c.mu.Unlock()

	for _, d := range deltas {
		c.stats.published.Add(1)
		if len(d.encoded) <= maxDeltaBytes {
			c.enqueue(d.encoded)
		}
		for i := range region {
			if len(d.encoded) <= maxDeltaBytes {
				if err := c.ml.SendBestEffort(&region[i], d.encoded); err != nil {
					c.log.Debug("send to region", "to", region[i].Name, "err", err)
				}
			} else {
				c.sendReliable(region[i].Name, d.encoded)
			}
		}
	}
	if len(rejected) > 0 {
		return &RejectedError{Machines: rejected}
	}
	return nil
}

// RejectedError is Publish's report of the machines it left out of this
// host's facts because their records break the rules; every other machine
// was published. errors.Is(err, ErrInvalid) holds.
type RejectedError struct {
	// Machines maps each left-out machine's id to why it was left out.
	Machines map[string]error
}

func (e *RejectedError) Error() string {
	ids := slices.Sorted(maps.Keys(e.Machines))
	var b strings.Builder
	fmt.Fprintf(&b, "publish: %d machine(s) left out: ", len(ids))
	for i, id := range ids {
		if i == 3 {
			fmt.Fprintf(&b, "; and %d more", len(ids)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(e.Machines[id].Error())
	}
	return b.String()
}

// Is makes errors.Is(err, ErrInvalid) true.
func (e *RejectedError) Is(target error) bool { return target == ErrInvalid }

// diffLocked turns new facts into the deltas that lead to them; c.mu is held.
func (c *Cluster) diffLocked(ms []Machine, free Resources, load float64) []*delta {
	p := &c.pub
	enc := make(map[string][]byte, len(ms))
	final := make([][]byte, len(ms)) // the machines at the last version, by id
	var upserts [][]byte
	var upIDs []string
	for i := range ms {
		b := encodeMachine(&ms[i])
		enc[ms[i].ID] = b
		final[i] = b
		if old, ok := p.machines[ms[i].ID]; p.reset || !ok || !bytes.Equal(old, b) {
			upserts = append(upserts, b)
			upIDs = append(upIDs, ms[i].ID)
		}
	}
	var removes []string
	if !p.reset {
		for id := range p.machines {
			if _, ok := enc[id]; !ok {
				removes = append(removes, id)
			}
		}
		slices.Sort(removes)
	}
	if !p.reset && len(upserts) == 0 && len(removes) == 0 && free == p.free && load == p.load {
		return nil
	}

	// Cut the change into deltas that each fit a packet, chained version
	// to version; the first of a reset starts from nothing.
	base := p.version
	if p.reset {
		base = 0
	}
	next := max(p.version+1, uint64(c.cfg.Now().UnixNano()))
	var out []*delta
	key := c.signingKeyLocked()
	// With a key, each delta signs the state it leads to; a change cut in
	// several deltas works out the states between (cur).
	var cur map[string][]byte
	header := len(encodeDeltaParts(c.cfg.HostID, next, next+1, free, load, nil, nil, nil)) + 4
	if key != nil {
		header += 2 * (maxSigLen + 1)
	}
	for first := true; first || len(upserts) > 0 || len(removes) > 0; first = false {
		size := header
		var ups [][]byte
		var ids []string
		for len(upserts) > 0 && (len(ups) == 0 || size+len(upserts[0]) <= maxDeltaBytes) {
			size += len(upserts[0])
			ups = append(ups, upserts[0])
			ids = append(ids, upIDs[0])
			upserts, upIDs = upserts[1:], upIDs[1:]
		}
		var rms []string
		for len(removes) > 0 && (size+len(removes[0])+1 <= maxDeltaBytes || (len(ups) == 0 && len(rms) == 0)) {
			size += len(removes[0]) + 1
			rms = append(rms, removes[0])
			removes = removes[1:]
		}
		var stateSig []byte
		if key != nil {
			state := final
			if len(upserts) > 0 || len(removes) > 0 {
				// Not the last delta of the change: its state is between.
				if cur == nil {
					cur = map[string][]byte{}
					if base != 0 {
						maps.Copy(cur, p.machines)
					}
				}
				for i, id := range ids {
					cur[id] = ups[i]
				}
				for _, id := range rms {
					delete(cur, id)
				}
				state = make([][]byte, 0, len(cur))
				for _, id := range slices.Sorted(maps.Keys(cur)) {
					state = append(state, cur[id])
				}
			}
			stateSig = signState(key, stateHash(c.cfg.HostID, next, free, load, state))
		}
		msg := signed(key, encodeDeltaParts(c.cfg.HostID, base, next, free, load, ups, rms, stateSig))
		v, err := decodeMessage(msg)
		if err != nil {
			panic(fmt.Sprintf("cluster: own delta does not decode: %v", err))
		}
		out = append(out, v.(*delta))
		base, next = next, next+1
	}
	p.version = base
	p.reset = false
	p.machines = enc
	p.free, p.load = free, load
	return out
}

// bumpLocked moves this host's version past one seen on the network (a
// restart with a clock that went back) and republishes everything.
func (c *Cluster) bumpLocked(seen uint64) []*delta {
	if seen <= c.pub.version {
		return nil // an echo of this host's own record
	}
	c.log.Warn("own facts seen at a newer version; republishing", "seen", seen, "version", c.pub.version)
	c.pub.version = seen
	return c.republishLocked()
}

// republishLocked publishes this host's facts again whole, from nothing,
// at the next version; c.mu is held.
func (c *Cluster) republishLocked() []*delta {
	c.pub.reset = true
	ms := make([]Machine, 0)
	for _, m := range c.store.get(c.cfg.HostID).list() {
		mm := *m
		mm.Host = ""
		ms = append(ms, mm)
	}
	ds := c.diffLocked(ms, c.pub.free, c.pub.load)
	for _, d := range ds {
		c.store.applyLocal(d)
	}
	return ds
}
