package cluster

import (
	"context"
	"errors"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/memberlist"
)

// regionJoinEvery is how often this host looks for hosts of its region
// missing from its regional memberlist, and regionRetry how long it waits
// before trying one of them again.
const (
	regionJoinEvery = time.Second
	regionRetry     = 5 * time.Second
)

// confirmPings is how many direct pings, one RegionProbeInterval apart and
// each waiting RegionProbeTimeout, a host of the region must leave
// unanswered before this host declares it dead: spread over two intervals,
// they see through a short stall of the accused.
const confirmPings = 3

// startRegion creates the regional memberlist on its side of the mux.
func (c *Cluster) startRegion(t memberlist.NodeAwareTransport, bindPort, advertisePort int) (*memberlist.Memberlist, error) {
	mc := c.cfg.regionConfig()
	mc.Transport = t
	mc.Keyring = c.keyring
	mc.BindPort, mc.AdvertisePort = bindPort, advertisePort
	d := &regionDelegate{c}
	mc.Delegate, mc.Events, mc.Alive = d, d, d
	mc.Logger = log.New(&logWriter{log: c.log.With("detector", "region")}, "", 0)
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("start regional memberlist: %w", err)
	}
	return ml, nil
}

// netTransport binds memberlist's own UDP/TCP transport, as memberlist does
// when it is given none, so that the mux can share it. It returns the port
// bound.
func netTransport(cfg *Config, logger *log.Logger) (*memberlist.NetTransport, int, error) {
	nc := &memberlist.NetTransportConfig{BindAddrs: []string{cfg.BindAddr}, BindPort: cfg.BindPort, Logger: logger}
	tries := 1
	if cfg.BindPort == 0 {
		// A free port for TCP may be taken for UDP: try another.
		tries = 10
	}
	var err error
	for range tries {
		var t *memberlist.NetTransport
		if t, err = memberlist.NewNetTransport(nc); err == nil {
			return t, t.GetAutoBindPort(), nil
		}
	}
	return nil, 0, fmt.Errorf("bind %s:%d: %w", cfg.BindAddr, cfg.BindPort, err)
}

// regionDelegate is the cluster as the regional memberlist sees it: a
// failure detector only, with no messages or state of its own. Like the
// cluster-wide delegate, none of its methods calls back into memberlist.
type regionDelegate struct{ c *Cluster }

var (
	_ memberlist.Delegate      = (*regionDelegate)(nil)
	_ memberlist.EventDelegate = (*regionDelegate)(nil)
	_ memberlist.AliveDelegate = (*regionDelegate)(nil)
)

// NodeMeta is the host's region and whether it is leaving.
func (d *regionDelegate) NodeMeta(int) []byte {
	return encodeMeta(&hostMeta{Region: d.c.cfg.Region, Leaving: d.c.leaving.Load()})
}

func (d *regionDelegate) NotifyMsg([]byte)                {}
func (d *regionDelegate) GetBroadcasts(int, int) [][]byte { return nil }
func (d *regionDelegate) LocalState(bool) []byte          { return nil }
func (d *regionDelegate) MergeRemoteState([]byte, bool)   {}

// NotifyAlive keeps hosts of other regions out of the regional memberlist.
func (d *regionDelegate) NotifyAlive(n *memberlist.Node) error {
	m, err := decodeMeta(n.Meta)
	if err != nil {
		return fmt.Errorf("host %s: %w", n.Name, err)
	}
	if m.Region != d.c.cfg.Region {
		return fmt.Errorf("host %s is in region %q, not %q", n.Name, m.Region, d.c.cfg.Region)
	}
	return nil
}

// NotifyJoin: a host of the region is (back) up. If this host declared it
// dead, it says it is alive again.
func (d *regionDelegate) NotifyJoin(n *memberlist.Node) {
	c := d.c
	c.mu.Lock()
	accused := c.accused[n.Name]
	c.mu.Unlock()
	if accused {
		c.log.Info("region: host alive again", "id", n.Name)
		c.issue(n.Name, false)
	}
}

func (d *regionDelegate) NotifyUpdate(*memberlist.Node) {}

// NotifyLeave: the regional memberlist holds a host of the region dead, or
// gone. A departure is told by the leaving flag, which the host sets
// before it leaves, in either memberlist. A death is confirmed before it
// becomes a verdict (confirmLoop).
func (d *regionDelegate) NotifyLeave(n *memberlist.Node) {
	c := d.c
	if n.Name == c.cfg.HostID || c.leaving.Load() {
		return
	}
	if m, err := decodeMeta(n.Meta); err == nil && m.Leaving {
		return
	}
	select {
	case c.suspects <- n.Name:
	default:
		// More deaths at once than the queue holds: the cluster-wide
		// detector will see to the rest.
	}
}

// confirmLoop turns the regional memberlist's deaths into verdicts, each
// once this host has pinged the host itself confirmPings times without an
// answer. Memberlist believes a dead message from any member, whoever
// declared it: a host cut off from its region declares the rest of it dead,
// and when it returns its peers take that word until the accused refute,
// a few milliseconds later. Its own pings keep this host from repeating it.
func (c *Cluster) confirmLoop(ctx context.Context) {
	defer c.wg.Done()
	confirming := map[string]bool{}
	done := make(chan string)
	for {
		select {
		case <-ctx.Done():
			for len(confirming) > 0 {
				delete(confirming, <-done)
			}
			return
		case id := <-done:
			delete(confirming, id)
		case id := <-c.suspects:
			if confirming[id] {
				continue
			}
			confirming[id] = true
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				c.confirm(ctx, id)
				done <- id
			}()
		}
	}
}

func (c *Cluster) confirm(ctx context.Context, id string) {
	c.mu.Lock()
	x := c.members[id]
	ok := x != nil && x.meta != nil && x.meta.Region == c.cfg.Region && !x.meta.Leaving && x.node.Addr != nil
	var addr net.Addr
	if ok {
		addr = &net.UDPAddr{IP: x.node.Addr, Port: int(x.node.Port)}
	}
	c.mu.Unlock()
	if !ok {
		return
	}
	start := time.Now()
	for i := range confirmPings {
		select {
		case <-ctx.Done():
			return
		case <-time.After(time.Until(start.Add(time.Duration(i) * c.cfg.RegionProbeInterval))):
		}
		if c.regionHolds(id) {
			return // it refuted
		}
		if _, err := c.region.Ping(id, addr); err == nil {
			c.log.Info("region: host declared dead answers", "id", id)
			return
		}
	}
	if c.regionHolds(id) || c.leaving.Load() {
		return
	}
	// Lifeguard's health score rises when this host misses the acks and
	// nacks of its probes that it should have had: a host that is slow or
	// cut off itself is the likelier culprit, and leaves the verdict to
	// its peers. (With fewer than two peers there are no nacks, and the
	// score only counts the probes of the dead host that failed.)
	if score := c.region.GetHealthScore(); score > 0 && c.region.NumMembers() >= 3 {
		c.log.Info("region: host dead, but this host's own detector is unhealthy; no verdict", "id", id, "health", score)
		return
	}
	c.log.Info("region: host dead", "id", id)
	c.issue(id, true)
}

// regionHolds reports whether the regional memberlist holds id alive.
func (c *Cluster) regionHolds(id string) bool {
	for _, n := range c.region.Members() {
		if n.Name == id {
			return true
		}
	}
	return false
}

// regionLoop joins hosts of this region, as the cluster-wide membership
// lists them, that the regional memberlist lacks: that is how the regional
// memberlist forms, and how it mends after a partition.
func (c *Cluster) regionLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.stretch(regionJoinEvery))
	defer t.Stop()
	tried := map[string]time.Time{}
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-c.regionWake:
		}
		in := map[string]bool{}
		for _, n := range c.region.Members() {
			in[n.Name] = true
		}
		now := time.Now()
		var ids, addrs []string
		c.mu.Lock()
		for id, m := range c.members {
			if id == c.cfg.HostID || in[id] || m.meta == nil || m.meta.Region != c.cfg.Region || m.node.Addr == nil ||
				(m.status != StatusAlive && m.status != StatusSuspect) || now.Sub(tried[id]) < c.cfg.stretch(regionRetry) {
				continue
			}
			ids = append(ids, id)
			addrs = append(addrs, net.JoinHostPort(m.node.Addr.String(), strconv.Itoa(int(m.node.Port))))
		}
		c.mu.Unlock()
		for id, at := range tried {
			if now.Sub(at) >= c.cfg.stretch(regionRetry) {
				delete(tried, id)
			}
		}
		if len(ids) == 0 {
			continue
		}
		// One at a time: a join brings the whole regional membership.
		i := rand.IntN(len(ids))
		tried[ids[i]] = now
		if _, err := c.region.Join([]string{addrs[i]}); err != nil && !errors.Is(err, context.Canceled) {
			c.log.Debug("joining a host of the region", "id", ids[i], "err", err)
		}
	}
}

// wakeRegion asks regionLoop to look for hosts to join now.
func (c *Cluster) wakeRegion() {
	select {
	case c.regionWake <- struct{}{}:
	default:
	}
}
