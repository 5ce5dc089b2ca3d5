package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Errors.
var (
	ErrNotStarted = errors.New("cluster not started")
	ErrHostUp     = errors.New("host is up")
	ErrUnknown    = errors.New("unknown host")
)

// maxDeltaBytes bounds one gossiped delta so that it fits a UDP packet with
// memberlist's framing (1,400 bytes less compound, label and CRC overhead).
const maxDeltaBytes = 1100

// maxBundleBytes bounds one message of full facts sent over a stream.
const maxBundleBytes = 1 << 20

// exchangeEvery spaces the anti-entropy exchanges made with hosts that come
// up, on top of memberlist's periodic push/pull.
const exchangeEvery = time.Second

// reapEvery is how often hosts dead past ReapTimeout are looked for.
const reapEvery = time.Minute

// settleAfter are the times after joining, or being joined, when a host
// swaps the whole membership with one more random host. Memberlist spreads news of a host
// that joins by gossip, each host passing it on a number of times that
// grows with the cluster size it knows; when many hosts start together
// they all know few, the news of the first ones dies out before reaching
// everyone, and only the periodic push/pull (a minute apart at 1,000
// hosts) repairs it.
var settleAfter = []time.Duration{time.Second, 4 * time.Second}

// sendWorkers send stream messages, so one slow peer does not hold up the
// rest.
const sendWorkers = 4

// Cluster is this host's member of the cluster: it advertises the host,
// publishes its facts, gathers everyone else's and keeps the local view.
type Cluster struct {
	cfg     Config
	log     *slog.Logger
	meta    []byte
	leaving atomic.Bool

	ml    *memberlist.Memberlist
	queue *memberlist.TransmitLimitedQueue
	// verdicts is the gossip queue of region verdicts, sent first and
	// retransmitted verdictRetransmits times as often as facts (verdict.go).
	verdicts *memberlist.TransmitLimitedQueue
	// region is the regional failure detector (region.go); nil with
	// NoRegionDetector.
	region     *memberlist.Memberlist
	regionWake chan struct{}
	suspects   chan string  // hosts of the region its memberlist holds dead
	alive      atomic.Int64 // hosts memberlist counts as up, for retransmits

	// keyring encrypts gossip once it holds a key (trust.go).
	keyring *memberlist.Keyring

	mu sync.Mutex
	// trust signs and checks records; nil in a cluster without (trust.go).
	trust     *trustState
	members   map[string]*member
	order     []string // members' ids, sorted: snapshots are built in this order
	store     *store
	pub       publisher
	hostCache map[string]*Host
	lastPull  map[string]time.Time
	seq       uint64
	// A host seen come up (new, or back from dead) is asked for what this
	// host lacks: at most one such exchange per exchangeEvery, with one
	// of them, so a healed partition costs each host one round trip.
	comeUp       []string
	lastExchange time.Time
	settleAt     []time.Time // full membership swaps still to make (settleAfter)
	// accused are the hosts this host's regional detector declared dead
	// and has not seen back.
	accused map[string]bool
	// byVerdict are the hosts dead by their region's verdict at the last
	// snapshot, for verifyLoop to ping (each is checked again there).
	byVerdict []string
	lastReap  time.Time

	snap    atomic.Pointer[Snapshot]
	rebuild chan struct{}

	subMu  sync.Mutex
	subs   map[int]chan struct{}
	nextID int

	sends   chan sendTask
	stats   counters
	dropLog atomic.Int64 // unix nanoseconds of the last drop logged

	started atomic.Bool
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	closed  sync.Once
}

type member struct {
	node   memberlist.Node // a copy, with its own Meta
	meta   *hostMeta       // nil when the advertised facts are invalid
	addrs  map[string]string
	status HostStatus
	since  time.Time
	rtt    time.Duration // smoothed
	shown  time.Duration // the RTT last put in a snapshot

	// What the region's verdicts say (verdict.go).
	heard     int64            // unix ns of the latest sign of life
	verdict   int64            // issue time of the verdicts holding status at dead; 0: status is memberlist's own
	accusers  map[string]int64 // hosts of its region that declared it dead since heard, by issue time
	verifyAt  time.Time        // next direct ping while dead by verdict (verifyLoop)
	verifyGap time.Duration
}

type publisher struct {
	version  uint64
	reset    bool              // the next delta starts from nothing
	machines map[string][]byte // wire form of each published machine
	free     Resources
	load     float64
}

type sendTask struct {
	to  string
	msg []byte
}

// New checks the configuration and prepares a member; Start joins the
// network.
func New(cfg Config) (*Cluster, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("cluster config: %w", err)
	}
	cfg.Addrs = maps.Clone(cfg.Addrs)
	c := &Cluster{
		cfg:        cfg,
		log:        cfg.Logger.With("component", "cluster", "host", cfg.HostID),
		meta:       encodeMeta(&hostMeta{Region: cfg.Region, Capacity: cfg.Capacity, Addrs: cfg.Addrs}),
		members:    map[string]*member{},
		store:      newStore(cfg.HostID, cfg.MaxMachines),
		pub:        publisher{reset: true, machines: map[string][]byte{}},
		hostCache:  map[string]*Host{},
		lastPull:   map[string]time.Time{},
		rebuild:    make(chan struct{}, 1),
		subs:       map[int]chan struct{}{},
		sends:      make(chan sendTask, 1024),
		accused:    map[string]bool{},
		regionWake: make(chan struct{}, 1),
		suspects:   make(chan string, 64),
	}
	var err error
	if c.keyring, err = newKeyring(cfg.GossipKeys); err != nil {
		return nil, fmt.Errorf("cluster config: %w", err)
	}
	if cfg.Trust != nil {
		if c.trust, err = newTrustState(cfg.Trust); err != nil {
			return nil, fmt.Errorf("cluster config: %w", err)
		}
		if c.trust.key != nil {
			if _, err := c.trust.checkCert(c.trust.cert, cfg.HostID, cfg.Now()); err != nil {
				return nil, fmt.Errorf("cluster config: this host's own certificate: %w", err)
			}
		}
	}
	c.queue = &memberlist.TransmitLimitedQueue{
		NumNodes:       func() int { return int(max(c.alive.Load(), 1)) },
		RetransmitMult: cfg.RetransmitMult,
	}
	c.verdicts = &memberlist.TransmitLimitedQueue{
		NumNodes:       c.queue.NumNodes,
		RetransmitMult: verdictRetransmits * cfg.RetransmitMult,
	}
	now := cfg.Now()
	c.members[cfg.HostID] = &member{
		node:   memberlist.Node{Name: cfg.HostID, Meta: c.meta},
		meta:   &hostMeta{Region: cfg.Region, Capacity: cfg.Capacity, Addrs: cfg.Addrs},
		addrs:  cfg.Addrs,
		status: StatusAlive,
		since:  now,
	}
	c.order = []string{cfg.HostID}
	c.store.bound(cfg.MaxOwners, cfg.MaxStoredMachines, func(id string) bool { return c.members[id] != nil }) // under c.mu
	c.store.ensure(cfg.HostID)
	c.snap.Store(c.build())
	return c, nil
}

// Start creates the memberlist member and the goroutines that keep the view.
// They run until ctx ends or Close is called.
func (c *Cluster) Start(ctx context.Context) error {
	if c.started.Load() {
		return errors.New("cluster already started")
	}
	if c.cfg.Transport == nil {
		if err := c.cfg.checkBind(); err != nil {
			return fmt.Errorf("start memberlist: %w", err)
		}
	}
	mc := c.cfg.memberlistConfig()
	mc.Keyring = c.keyring
	d := &delegate{c}
	mc.Delegate, mc.Events, mc.Ping = d, d, d
	mc.Logger = log.New(&logWriter{log: c.log}, "", 0)
	var mx *mux
	if !c.cfg.NoRegionDetector {
		// Both memberlists share one transport: one address and port.
		var t memberlist.Transport = c.cfg.Transport
		if t == nil {
			nt, port, err := netTransport(&c.cfg, mc.Logger)
			if err != nil {
				return fmt.Errorf("start memberlist: %w", err)
			}
			if c.cfg.BindPort == 0 {
				mc.BindPort, mc.AdvertisePort = port, port
			}
			t = nt
		}
		mx = newMux(t, c.cfg.stretch(tagWait))
		mc.Transport = mx.global
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		if mx != nil {
			mx.global.Shutdown()
			mx.region.Shutdown()
		}
		return fmt.Errorf("start memberlist: %w", err)
	}
	if mx != nil {
		if c.region, err = c.startRegion(mx.region, mc.BindPort, mc.AdvertisePort); err != nil {
			mx.region.Shutdown()
			ml.Shutdown()
			return err
		}
	}
	c.ml = ml
	ctx, c.cancel = context.WithCancel(ctx)
	c.started.Store(true)
	c.wg.Add(3 + sendWorkers)
	go c.rebuildLoop(ctx)
	go c.reconnectLoop(ctx)
	go c.maintainLoop(ctx)
	if c.region != nil {
		c.wg.Add(3)
		go c.regionLoop(ctx)
		go c.confirmLoop(ctx)
		go c.verifyLoop(ctx)
	}
	for range sendWorkers {
		go c.sendLoop(ctx)
	}
	c.changed(c.cfg.HostID)
	return nil
}

// metaNow is the node meta to advertise now.
func (c *Cluster) metaNow() []byte {
	if !c.leaving.Load() {
		return c.meta
	}
	return encodeMeta(&hostMeta{Region: c.cfg.Region, Capacity: c.cfg.Capacity, Addrs: c.cfg.Addrs, Leaving: true})
}

// GossipAddr returns the address other hosts join this one at.
func (c *Cluster) GossipAddr() string {
	if c.ml == nil {
		return ""
	}
	n := c.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Join contacts the given hosts (gossip addresses) and exchanges full state
// with each; it returns how many answered.
func (c *Cluster) Join(addrs []string) (int, error) {
	if !c.started.Load() {
		return 0, ErrNotStarted
	}
	n, err := c.ml.Join(addrs)
	if err != nil && n == 0 {
		return 0, fmt.Errorf("join %v: %w", addrs, err)
	}
	c.mu.Lock()
	c.settleAt = c.settleAt[:0]
	c.armSettleLocked()
	c.mu.Unlock()
	return n, nil
}

// joinedBy is called when another host joins through this one. The target
// of a join is as likely as the joiner to miss news of hosts joining
// elsewhere at the same moment (the first host of a cluster never joins
// anyone), so it makes the same membership swaps, unless some are pending.
func (c *Cluster) joinedBy() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.settleAt) == 0 {
		c.armSettleLocked()
	}
}

// armSettleLocked schedules the membership swaps of settleAfter from now.
func (c *Cluster) armSettleLocked() {
	now := c.cfg.Now()
	for _, d := range settleAfter {
		c.settleAt = append(c.settleAt, now.Add(c.cfg.stretch(d)))
	}
}

// Leave tells the cluster this host is going, and waits up to timeout for
// the news to go out. Close still has to be called.
func (c *Cluster) Leave(timeout time.Duration) error {
	if !c.started.Load() {
		return ErrNotStarted
	}
	// Say so in the advertised facts first, then leave, in both
	// memberlists at once: the region must not take the leave for a death.
	start := time.Now()
	c.leaving.Store(true)
	var wg sync.WaitGroup
	if c.region != nil {
		wg.Go(func() {
			if err := c.region.UpdateNode(timeout / 2); err != nil {
				c.log.Warn("announcing the leave to the region", "err", err)
			}
			if err := c.region.Leave(max(timeout-time.Since(start), time.Millisecond)); err != nil {
				c.log.Warn("leaving the region", "err", err)
			}
		})
	}
	defer wg.Wait()
	if err := c.ml.UpdateNode(timeout / 2); err != nil {
		c.log.Warn("announcing the leave", "err", err)
	}
	if err := c.ml.Leave(max(timeout-time.Since(start), time.Millisecond)); err != nil {
		return fmt.Errorf("leave: %w", err)
	}
	c.mu.Lock()
	c.setStatus(c.cfg.HostID, StatusLeft)
	c.mu.Unlock()
	return nil
}

// Close stops the member (without a leave message: call Leave first for
// a graceful exit) and waits for its goroutines.
func (c *Cluster) Close() error {
	var err error
	c.closed.Do(func() {
		if !c.started.Load() {
			return
		}
		if c.region != nil {
			c.region.Shutdown()
		}
		err = c.ml.Shutdown()
		c.cancel()
		c.wg.Wait()
	})
	return err
}

// Snapshot returns the current view. It never blocks.
func (c *Cluster) Snapshot() *Snapshot { return c.snap.Load() }

// Subscribe returns a channel that receives a value after the view changes.
// Notifications coalesce: one value may stand for many changes, so a
// subscriber reads Snapshot after each. cancel releases the subscription.
func (c *Cluster) Subscribe() (<-chan struct{}, func()) {
	ch := make(chan struct{}, 1)
	c.subMu.Lock()
	id := c.nextID
	c.nextID++
	c.subs[id] = ch
	c.subMu.Unlock()
	return ch, func() {
		c.subMu.Lock()
		delete(c.subs, id)
		c.subMu.Unlock()
	}
}

// Remove forgets a host that is dead or has left, with its facts.
func (c *Cluster) Remove(hostID string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.members[hostID]
	if m == nil && c.store.get(hostID) == nil {
		return fmt.Errorf("remove %s: %w", hostID, ErrUnknown)
	}
	if hostID == c.cfg.HostID || (m != nil && (m.status == StatusAlive || m.status == StatusSuspect)) {
		return fmt.Errorf("remove %s: %w", hostID, ErrHostUp)
	}
	c.forget(hostID)
	return nil
}

// forget drops a host; c.mu is held.
func (c *Cluster) forget(id string) {
	delete(c.members, id)
	if i, ok := slices.BinarySearch(c.order, id); ok {
		c.order = slices.Delete(c.order, i, i+1)
	}
	c.store.remove(id)
	delete(c.lastPull, id)
	delete(c.accused, id)
	c.changedLocked(id)
}

// receive handles one message from another host; pushPull says it came
// as memberlist's push/pull state, whose exchange is already two-way.
func (c *Cluster) receive(b []byte, pushPull bool) {
	v, err := decodeMessage(b)
	if err != nil {
		c.drop("undecodable message", err)
		return
	}
	now := c.cfg.Now()
	switch m := v.(type) {
	case *delta:
		c.receiveDelta(m, now)
	case []*fullFacts:
		for _, f := range m {
			c.receiveFull(f, now)
		}
	case *digest:
		if err := validateDigest(m); err != nil {
			c.drop("invalid digest", err)
			return
		}
		c.answer(m, !pushPull)
	case *verdict:
		c.receiveVerdict(m, now)
	}
}

func (c *Cluster) receiveDelta(d *delta, now time.Time) {
	if err := validateDelta(d, now, c.cfg.MaxMachines); err != nil {
		c.drop("invalid delta", err)
		return
	}
	if !c.checkDelta(d) {
		return
	}
	c.mu.Lock()
	res := c.store.applyDelta(d, now.UnixNano())
	var bumped []*delta
	switch res {
	case resultApplied:
		c.changedLocked(d.Owner)
	case resultSelf:
		bumped = c.bumpLocked(d.Version)
	}
	c.mu.Unlock()
	c.count(res)
	if res == resultInvalid {
		c.drop("delta over limits", fmt.Errorf("owner %s", d.Owner))
	}
	if res == resultApplied || res == resultPending {
		// New here, so new to some others too: pass it on.
		c.stats.relayed.Add(1)
		c.enqueue(bytes.Clone(d.encoded))
	}
	c.spread(bumped)
}

func (c *Cluster) receiveFull(f *fullFacts, now time.Time) {
	if err := validateFull(f, now, c.cfg.MaxMachines); err != nil {
		c.drop("invalid full facts", err)
		return
	}
	pc, ok := c.checkFull(f, now)
	if !ok {
		return
	}
	c.mu.Lock()
	if pc != nil && c.trust != nil && !c.trust.banned[f.Owner] {
		c.trust.certs[f.Owner] = pc
		delete(c.trust.needs, f.Owner)
	}
	res := c.store.applyFull(f)
	var bumped []*delta
	switch res {
	case resultApplied:
		c.changedLocked(f.Owner)
	case resultSelf:
		bumped = c.bumpLocked(f.Version)
	}
	c.mu.Unlock()
	c.count(res)
	c.spread(bumped)
}

// spread gossips this host's own deltas made outside Publish.
func (c *Cluster) spread(ds []*delta) {
	for _, d := range ds {
		if len(d.encoded) <= maxDeltaBytes {
			c.enqueue(d.encoded)
		}
	}
	if len(ds) > 0 {
		c.changed(c.cfg.HostID)
	}
}

// answer sends the sender of a digest the full facts it lacks. With
// askBack, an answer to a whole digest (All) also asks the sender for the
// owners it holds newer: each exchange then goes both ways, and
// anti-entropy spreads a fact to most hosts in a few rounds instead of
// doubling its holders a round.
func (c *Cluster) answer(d *digest, askBack bool) {
	if d.From == c.cfg.HostID {
		return
	}
	c.mu.Lock()
	var facts []*fullFacts
	var want []digestEntry
	listed := make(map[string]bool, len(d.Entries))
	for _, e := range d.Entries {
		listed[e.Owner] = true
		switch v := c.store.version(e.Owner); {
		case v > e.Version:
			if f := c.fullLocked(e.Owner); f != nil {
				facts = append(facts, f)
			}
		case v < e.Version && askBack && d.All && e.Owner != c.cfg.HostID:
			want = append(want, digestEntry{Owner: e.Owner, Version: v})
		}
	}
	if d.All {
		for id := range c.store.owners {
			if !listed[id] && id != d.From {
				if f := c.fullLocked(id); f != nil {
					facts = append(facts, f)
				}
			}
		}
	}
	c.mu.Unlock()
	if len(want) > 0 {
		c.sendReliable(d.From, encodeDigest(&digest{From: c.cfg.HostID, Entries: want}))
	}
	if len(facts) == 0 {
		return
	}
	slices.SortFunc(facts, func(a, b *fullFacts) int { return compareStrings(a.Owner, b.Owner) })
	// Bundle into stream messages of bounded size.
	var batch []*fullFacts
	size := 0
	for _, f := range facts {
		n := 64 + len(f.Cert) + 128*len(f.Machines)
		if len(batch) > 0 && size+n > maxBundleBytes {
			c.sendReliable(d.From, encodeFull(batch))
			batch, size = nil, 0
		}
		batch = append(batch, f)
		size += n
	}
	c.sendReliable(d.From, encodeFull(batch))
	c.stats.fullSent.Add(uint64(len(facts)))
}

// localDigest lists every owner's version held here.
func (c *Cluster) localDigest() *digest {
	c.mu.Lock()
	defer c.mu.Unlock()
	d := &digest{From: c.cfg.HostID, All: true, Entries: make([]digestEntry, 0, len(c.store.owners))}
	for id, o := range c.store.owners {
		if o.version > 0 {
			d.Entries = append(d.Entries, digestEntry{Owner: id, Version: o.version})
		}
	}
	slices.SortFunc(d.Entries, func(a, b digestEntry) int { return compareStrings(a.Owner, b.Owner) })
	return d
}

func (c *Cluster) sendReliable(to string, msg []byte) {
	if !c.started.Load() {
		return
	}
	select {
	case c.sends <- sendTask{to: to, msg: msg}:
	default:
		c.stats.sendsDropped.Add(1)
	}
}

func (c *Cluster) sendLoop(ctx context.Context) {
	defer c.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case t := <-c.sends:
			c.mu.Lock()
			m := c.members[t.to]
			var node memberlist.Node
			if m != nil {
				node = m.node
			}
			c.mu.Unlock()
			if m == nil || node.Addr == nil {
				continue
			}
			if err := c.ml.SendReliable(&node, t.msg); err != nil {
				c.log.Debug("reliable send failed", "to", t.to, "err", err)
				c.mu.Lock()
				if m := c.members[t.to]; m != nil && m.status == StatusAlive {
					c.setStatus(t.to, StatusSuspect)
				}
				c.mu.Unlock()
			}
		}
	}
}

// maintainLoop repairs gaps and reaps long-dead hosts.
func (c *Cluster) maintainLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(max(c.cfg.GapWait/2, c.cfg.stretch(10*time.Millisecond)))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			c.maintain()
		}
	}
}

// pull is a request for an owner's full facts, sent to one host.
type pull struct {
	node memberlist.Node
	msg  []byte
}

func (c *Cluster) maintain() {
	now := c.cfg.Now()
	var pulls []pull
	c.mu.Lock()
	if now.Sub(c.lastReap) >= min(c.cfg.stretch(reapEvery), c.cfg.ReapTimeout/2) {
		c.lastReap = now
		for id, m := range c.members {
			if (m.status == StatusDead || m.status == StatusLeft) && now.Sub(m.since) > c.cfg.ReapTimeout {
				c.log.Info("reaping host", "id", id, "status", m.status, "since", m.since)
				c.forget(id)
			}
		}
	}
	var exchange *memberlist.Node
	if len(c.comeUp) > 0 && now.Sub(c.lastExchange) >= c.cfg.stretch(exchangeEvery) {
		id := c.comeUp[rand.IntN(len(c.comeUp))]
		c.comeUp = c.comeUp[:0]
		if m := c.members[id]; m != nil && m.status == StatusAlive {
			n := m.node
			exchange = &n
			c.lastExchange = now
		}
	} else if now.Sub(c.lastExchange) >= c.cfg.AntiEntropyInterval {
		// The periodic exchange of versions with one random host, which
		// repairs whatever gossip missed.
		if m := c.randomAliveLocked(); m != nil {
			n := m.node
			exchange = &n
		}
		c.lastExchange = now
	}
	var settle string
	if len(c.settleAt) > 0 && !now.Before(c.settleAt[0]) {
		c.settleAt = c.settleAt[1:]
		if m := c.randomAliveLocked(); m != nil {
			settle = m.addrs["gossip"]
		}
	}
	for _, id := range c.store.gaps(now.Add(-c.cfg.GapWait).UnixNano()) {
		if now.Sub(c.lastPull[id]) < 2*c.cfg.GapWait {
			continue
		}
		// Ask the owner itself, or any live host when it is not up.
		target := c.members[id]
		if target == nil || target.status != StatusAlive {
			target = c.randomAliveLocked()
		}
		if target == nil {
			continue
		}
		c.lastPull[id] = now
		msg := encodeDigest(&digest{From: c.cfg.HostID, Entries: []digestEntry{{Owner: id, Version: c.store.version(id)}}})
		pulls = append(pulls, pull{node: target.node, msg: msg})
	}
	pulls = append(pulls, c.certPullsLocked(now)...)
	c.mu.Unlock()
	if settle != "" {
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			if _, err := c.ml.Join([]string{settle}); err != nil {
				c.log.Debug("membership swap after join", "with", settle, "err", err)
			}
		}()
	}
	if exchange != nil {
		c.sendReliable(exchange.Name, encodeDigest(c.localDigest()))
	}
	for _, p := range pulls {
		c.stats.pulls.Add(1)
		if err := c.ml.SendBestEffort(&p.node, p.msg); err != nil {
			c.log.Debug("gap pull", "to", p.node.Name, "err", err)
		}
	}
}

// reconnectLoop tries, now and then, to join a random host believed dead:
// memberlist stops talking to dead hosts, so without it the two sides of a
// healed partition would each go on believing the other dead.
func (c *Cluster) reconnectLoop(ctx context.Context) {
	defer c.wg.Done()
	t := time.NewTicker(c.cfg.ReconnectInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c.mu.Lock()
		var dead []string
		for _, m := range c.members {
			// A host dead only by its region's verdict is still
			// memberlist's to probe, and verifyLoop pings it.
			if m.status == StatusDead && !m.deadByVerdict() && m.node.Addr != nil {
				dead = append(dead, net.JoinHostPort(m.node.Addr.String(), strconv.Itoa(int(m.node.Port))))
			}
		}
		c.mu.Unlock()
		if len(dead) == 0 {
			continue
		}
		addr := dead[rand.IntN(len(dead))]
		if _, err := c.ml.Join([]string{addr}); err == nil {
			c.log.Info("reconnected to a host believed dead", "addr", addr)
		}
	}
}

func (c *Cluster) randomAliveLocked() *member {
	// One pass, keeping each candidate with probability 1/seen.
	var pick *member
	seen := 0
	for id, m := range c.members {
		if id != c.cfg.HostID && m.status == StatusAlive && m.node.Addr != nil {
			seen++
			if rand.IntN(seen) == 0 {
				pick = m
			}
		}
	}
	return pick
}

// setStatus changes a member's status; c.mu is held.
func (c *Cluster) setStatus(id string, s HostStatus) {
	m := c.members[id]
	if m == nil || m.status == s {
		return
	}
	m.status = s
	m.since = c.cfg.Now()
	c.changedLocked(id)
}

func (c *Cluster) changed(id string) {
	c.mu.Lock()
	c.changedLocked(id)
	c.mu.Unlock()
}

// changedLocked marks a host's view stale and asks for a new snapshot.
func (c *Cluster) changedLocked(id string) {
	delete(c.hostCache, id)
	select {
	case c.rebuild <- struct{}{}:
	default:
	}
}

func (c *Cluster) rebuildLoop(ctx context.Context) {
	defer c.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.rebuild:
			c.snap.Store(c.build())
			c.subMu.Lock()
			for _, ch := range c.subs {
				select {
				case ch <- struct{}{}:
				default:
				}
			}
			c.subMu.Unlock()
		}
	}
}

// build makes a snapshot from the current state, reusing the hosts that
// did not change. It also counts the hosts up, for the gossip queues'
// retransmits, and lists those dead by verdict, for verifyLoop: every
// change to either asks for a snapshot, and one pass over the members
// here is cheaper than one per change.
func (c *Cluster) build() *Snapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	hosts := make([]*Host, 0, len(c.members))
	alive := 0
	c.byVerdict = c.byVerdict[:0]
	for _, id := range c.order {
		m := c.members[id]
		if m.status == StatusAlive || m.status == StatusSuspect {
			alive++
		}
		if m.deadByVerdict() {
			c.byVerdict = append(c.byVerdict, id)
		}
		if m.meta == nil {
			continue
		}
		h := c.hostCache[id]
		if h == nil {
			h = &Host{
				ID: id, Region: m.meta.Region, Addrs: m.addrs, Capacity: m.meta.Capacity,
				Status: m.status, Since: m.since, RTT: m.shown,
			}
			if o := c.store.get(id); o != nil {
				h.Free, h.Load, h.Version, h.Machines = o.free, o.load, o.version, o.list()
			}
			c.hostCache[id] = h
		}
		hosts = append(hosts, h)
	}
	c.alive.Store(int64(alive))
	c.seq++
	return newSnapshot(c.cfg.HostID, c.seq, c.cfg.Now(), hosts)
}

func (c *Cluster) count(r applyResult) {
	switch r {
	case resultApplied:
		c.stats.applied.Add(1)
	case resultPending:
		c.stats.pending.Add(1)
	case resultStale:
		c.stats.stale.Add(1)
	}
}

// drop counts a rejected record and logs it, at most once a second.
func (c *Cluster) drop(what string, err error) {
	c.stats.dropped.Add(1)
	now := time.Now().UnixNano()
	last := c.dropLog.Load()
	if now-last > int64(time.Second) && c.dropLog.CompareAndSwap(last, now) {
		c.log.Warn("dropped record", "what", what, "err", err, "dropped_total", c.stats.dropped.Load())
	}
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func sortedKeys(m map[string]string) []string {
	return slices.Sorted(maps.Keys(m))
}

// enqueue adds a message to the gossip queue, pruning it past its bound.
func (c *Cluster) enqueue(msg []byte) {
	c.queue.QueueBroadcast(&broadcast{msg: msg})
	if c.queue.NumQueued() > maxQueued {
		c.queue.Prune(maxQueued)
	}
}

// broadcast is one message in the gossip queue. Deltas never invalidate
// each other: each is a link in its owner's chain.
type broadcast struct{ msg []byte }

func (b *broadcast) Invalidates(memberlist.Broadcast) bool { return false }
func (b *broadcast) Message() []byte                       { return b.msg }
func (b *broadcast) Finished()                             {}
