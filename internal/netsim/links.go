package netsim

import (
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Faults of single links, beside the partition into groups and dead hosts:
// a link may be cut (as by a partition between its two ends only), lose a
// share of its datagrams, or take longer. A link fault is symmetric: it
// holds both ways between its two hosts.

// LinkFault is what is wrong with one link.
type LinkFault struct {
	// Cut makes the link down: datagrams are dropped and stream segments
	// wait, as across a partition.
	Cut bool
	// Loss is the probability, 0 to 1, that a datagram on the link is
	// lost (on top of the network's loss).
	Loss float64
	// Delay is added to the link's one-way latency.
	Delay time.Duration
}

func (f LinkFault) zero() bool { return !f.Cut && f.Loss <= 0 && f.Delay <= 0 }

// links holds the faulty links; any is false while there are none, so the
// common path reads no map.
type links struct {
	any atomic.Bool
	mu  sync.RWMutex
	m   map[[2]*host]LinkFault
}

func linkKey(a, b *host) [2]*host {
	if a.name > b.name {
		a, b = b, a
	}
	return [2]*host{a, b}
}

func (l *links) get(a, b *host) LinkFault {
	if !l.any.Load() {
		return LinkFault{}
	}
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.m[linkKey(a, b)]
}

// SetLink sets the fault of the link between hosts a and b (both ways),
// replacing the one it had; a zero LinkFault clears it.
func (n *Network) SetLink(a, b string, f LinkFault) error {
	ha, err := n.host(a)
	if err != nil {
		return err
	}
	hb, err := n.host(b)
	if err != nil {
		return err
	}
	f.Loss = math.Max(0, math.Min(1, f.Loss))
	f.Delay = max(f.Delay, 0)
	n.links.mu.Lock()
	if n.links.m == nil {
		n.links.m = map[[2]*host]LinkFault{}
	}
	if f.zero() {
		delete(n.links.m, linkKey(ha, hb))
	} else {
		n.links.m[linkKey(ha, hb)] = f
	}
	n.links.any.Store(len(n.links.m) > 0)
	n.links.mu.Unlock()
	n.log.Debug("link", "a", a, "b", b, "cut", f.Cut, "loss", f.Loss, "delay", f.Delay)
	n.topologyChanged()
	return nil
}

// Link returns the fault of the link between hosts a and b.
func (n *Network) Link(a, b string) LinkFault {
	ha, err := n.host(a)
	if err != nil {
		return LinkFault{}
	}
	hb, err := n.host(b)
	if err != nil {
		return LinkFault{}
	}
	return n.links.get(ha, hb)
}

// ClearLinks clears the faults of every link.
func (n *Network) ClearLinks() {
	n.links.mu.Lock()
	n.links.m = nil
	n.links.any.Store(false)
	n.links.mu.Unlock()
	n.log.Debug("links cleared")
	n.topologyChanged()
}
