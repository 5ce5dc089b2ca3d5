// Package netsim is an in-memory network of simulated hosts for tests,
// benchmarks and `flame dev`: streams, datagrams and a memberlist transport
// between named hosts, with per-link latency, packet loss, partitions, dead
// hosts and faults of single links (links.go).
//
// Time is real: deliveries wait on timers, because the code under test
// (memberlist, net/http) runs its own real timers. Randomness (loss and
// jitter) comes from a seeded generator. One goroutine per Network delivers
// everything in time order, so a sender never blocks on a slow receiver and
// thousands of gossiping hosts fit on a small machine.
//
// The model, in short:
//
//   - Every host has an IPv4 address (10.x.y.z) that exists only inside the
//     Network; addresses may also name the host ("ams-1:7946").
//   - A datagram arrives after the link's one-way latency, or never: it is
//     dropped by loss, by a partition or a dead host at either end (checked
//     when it is sent and when it arrives), or when the receiver's queue is
//     full, as a UDP socket buffer overflows.
//   - A stream connects after one round trip; each write arrives after the
//     one-way latency, in order. Streams are reliable: a segment that meets
//     a partition or a dead host waits, as TCP retransmits, and arrives once
//     the link is back. Writers block once a window of unread bytes is in
//     flight. Dialling across a broken link waits (for the context) until it
//     heals; dialling a port nobody listens on is refused.
//   - Kill cuts a host off as if its power or cable were pulled; the
//     programs "on" it keep running, since they share this process. Stopping
//     them is the caller's business.
package netsim

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Config configures a Network.
type Config struct {
	// Seed seeds the generator behind loss and jitter.
	Seed int64
	// Latency returns the one-way latency from one host to another, by
	// name. Nil means no latency. It is called for every datagram and
	// every stream write, from many goroutines.
	Latency func(from, to string) time.Duration
	// Jitter, when positive, adds a uniformly random [0, Jitter) to every
	// datagram's and write's latency. Datagrams may then be reordered;
	// streams stay in order.
	Jitter time.Duration
	// Loss is the probability, 0 to 1, that a datagram is lost. Streams
	// are never lossy.
	Loss float64
	// Logger receives topology changes (debug level) and drops for full
	// queues. Nil discards.
	Logger *slog.Logger
}

// Queue sizes and limits.
const (
	// streamWindow is how many bytes may be written to a stream and not
	// yet read before the writer blocks.
	streamWindow = 4 << 20
	// maxSegment is the largest piece one write is cut into.
	maxSegment = 64 << 10
	// acceptBacklog is how many connections wait for Accept; more are
	// refused.
	acceptBacklog = 128
	// packetQueue is how many datagrams wait for a reader; more are dropped.
	packetQueue = 1024
)

// ErrUnknownHost is returned for a host name that was never added.
var ErrUnknownHost = errors.New("netsim: unknown host")

// Network is a set of simulated hosts and the links between them. Its
// methods are safe for concurrent use.
type Network struct {
	cfg   Config
	log   *slog.Logger
	start time.Time

	mu     sync.RWMutex
	hosts  map[string]*host
	byIP   map[[4]byte]*host
	nextIP uint32
	conns  map[*conn]struct{}
	closed bool

	loss  atomic.Uint64 // math.Float64bits of the loss probability
	links links         // faults of single links (links.go)

	rngMu sync.Mutex
	rng   *rand.Rand

	topoMu  sync.Mutex
	topoCh  chan struct{} // closed and replaced whenever links may have come up
	stallMu sync.Mutex
	stalled map[*inbox]struct{} // streams holding segments for a broken link

	sched scheduler
	done  chan struct{}
	wg    sync.WaitGroup
}

// host is one simulated machine.
type host struct {
	name string
	ip   net.IP
	dead atomic.Bool
	// group is the host's side of the current partition; hosts reach
	// each other only within one group. 0 when there is no partition.
	group atomic.Int32

	mu       sync.Mutex
	udp      map[int]packetSink
	tcp      map[int]*listener
	nextPort int

	sentBytes, recvBytes, sentPackets, recvPackets atomic.Uint64
}

// New returns an empty Network. Close it to stop its delivery goroutine.
func New(cfg Config) *Network {
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	seed := uint64(cfg.Seed)
	n := &Network{
		cfg:     cfg,
		log:     log.With("component", "netsim"),
		start:   time.Now(),
		hosts:   map[string]*host{},
		byIP:    map[[4]byte]*host{},
		conns:   map[*conn]struct{}{},
		rng:     rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)),
		topoCh:  make(chan struct{}),
		stalled: map[*inbox]struct{}{},
		done:    make(chan struct{}),
	}
	n.SetLoss(cfg.Loss)
	n.sched.init()
	n.wg.Add(1)
	go n.run()
	return n
}

// AddHost adds a host and returns its address, unique in the Network.
func (n *Network) AddHost(name string) (net.IP, error) {
	if name == "" {
		return nil, errors.New("netsim: empty host name")
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, net.ErrClosed
	}
	if _, ok := n.hosts[name]; ok {
		return nil, fmt.Errorf("netsim: host %s already exists", name)
	}
	// 10.0.0.1 onwards, skipping .0 and .255 in the last octet.
	for {
		n.nextIP++
		if b := n.nextIP & 0xff; b != 0 && b != 0xff {
			break
		}
	}
	if n.nextIP >= 1<<24 {
		return nil, errors.New("netsim: out of addresses")
	}
	ip4 := [4]byte{10, byte(n.nextIP >> 16), byte(n.nextIP >> 8), byte(n.nextIP)}
	h := &host{
		name:     name,
		ip:       net.IPv4(ip4[0], ip4[1], ip4[2], ip4[3]).To4(),
		udp:      map[int]packetSink{},
		tcp:      map[int]*listener{},
		nextPort: firstEphemeral,
	}
	n.hosts[name] = h
	n.byIP[ip4] = h
	return append(net.IP(nil), h.ip...), nil
}

// HostIP returns the address of a host.
func (n *Network) HostIP(name string) (net.IP, bool) {
	h, err := n.host(name)
	if err != nil {
		return nil, false
	}
	return append(net.IP(nil), h.ip...), true
}

func (n *Network) host(name string) (*host, error) {
	n.mu.RLock()
	h, ok := n.hosts[name]
	closed := n.closed
	n.mu.RUnlock()
	if closed {
		return nil, net.ErrClosed
	}
	if !ok {
		return nil, fmt.Errorf("%w %q", ErrUnknownHost, name)
	}
	return h, nil
}

// resolve finds the host and port an address ("10.0.0.7:80" or
// "name:80") names. A well-formed address of no host gives a nil host.
func (n *Network) resolve(addr string) (*host, int, error) {
	hostPart, portPart, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, 0, err
	}
	port, err := strconv.Atoi(portPart)
	if err != nil || port < 0 || port > 65535 {
		return nil, 0, fmt.Errorf("bad port in %q", addr)
	}
	n.mu.RLock()
	defer n.mu.RUnlock()
	if ip := net.ParseIP(hostPart); ip != nil {
		ip4 := ip.To4()
		if ip4 == nil {
			return nil, port, nil
		}
		return n.byIP[[4]byte(ip4)], port, nil
	}
	return n.hosts[hostPart], port, nil
}

// SetLoss sets the probability, 0 to 1, that a datagram is lost.
func (n *Network) SetLoss(p float64) {
	p = math.Max(0, math.Min(1, p))
	n.loss.Store(math.Float64bits(p))
}

// lost decides whether a datagram from a to b is lost.
func (n *Network) lost(a, b *host) bool {
	p := math.Float64frombits(n.loss.Load())
	if lp := n.links.get(a, b).Loss; lp > 0 {
		p = 1 - (1-p)*(1-lp)
	}
	if p <= 0 {
		return false
	}
	n.rngMu.Lock()
	defer n.rngMu.Unlock()
	return n.rng.Float64() < p
}

// latency is the one-way delay from a to b for one datagram or write.
func (n *Network) latency(a, b *host) time.Duration {
	var d time.Duration
	if n.cfg.Latency != nil {
		d = n.cfg.Latency(a.name, b.name)
	}
	d += n.links.get(a, b).Delay
	if n.cfg.Jitter > 0 {
		n.rngMu.Lock()
		d += time.Duration(n.rng.Int64N(int64(n.cfg.Jitter)))
		n.rngMu.Unlock()
	}
	return max(d, 0)
}

// linkUp reports whether a and b can reach each other now.
func (n *Network) linkUp(a, b *host) bool {
	return !a.dead.Load() && !b.dead.Load() && a.group.Load() == b.group.Load() && !n.links.get(a, b).Cut
}

// Partition splits the hosts: hosts in different groups cannot reach each
// other. Hosts named in no group (and hosts added later) form one more
// group together. A new partition replaces the previous one.
func (n *Network) Partition(groups ...[]string) {
	n.mu.RLock()
	for _, h := range n.hosts {
		h.group.Store(0)
	}
	for i, g := range groups {
		for _, name := range g {
			if h, ok := n.hosts[name]; ok {
				h.group.Store(int32(i + 1))
			} else {
				n.log.Warn("partition names an unknown host", "host", name)
			}
		}
	}
	n.mu.RUnlock()
	n.log.Debug("partition", "groups", groups)
	n.topologyChanged()
}

// Heal ends any partition.
func (n *Network) Heal() {
	n.mu.RLock()
	for _, h := range n.hosts {
		h.group.Store(0)
	}
	n.mu.RUnlock()
	n.log.Debug("heal")
	n.topologyChanged()
}

// Kill cuts a host off: it neither sends nor receives until revived.
func (n *Network) Kill(name string) {
	if h, err := n.host(name); err == nil {
		h.dead.Store(true)
		n.log.Debug("kill", "host", name)
	}
}

// Revive connects a killed host again.
func (n *Network) Revive(name string) {
	if h, err := n.host(name); err == nil {
		h.dead.Store(false)
		n.log.Debug("revive", "host", name)
		n.topologyChanged()
	}
}

// topologyChanged wakes dials waiting for a link and delivers stream
// segments held for links that are up again.
func (n *Network) topologyChanged() {
	n.topoMu.Lock()
	close(n.topoCh)
	n.topoCh = make(chan struct{})
	n.topoMu.Unlock()
	n.flushStalled()
}

func (n *Network) topology() <-chan struct{} {
	n.topoMu.Lock()
	defer n.topoMu.Unlock()
	return n.topoCh
}

// Stats returns what a host has sent and received: bytes of datagrams and
// stream writes, and datagrams. Sent counts what the host's programs
// handed to the network, lost or not; received counts what was delivered.
func (n *Network) Stats(name string) (sentBytes, recvBytes, sentPackets, recvPackets uint64) {
	h, err := n.host(name)
	if err != nil {
		return 0, 0, 0, 0
	}
	return h.sentBytes.Load(), h.recvBytes.Load(), h.sentPackets.Load(), h.recvPackets.Load()
}

// Close stops the Network: every listener, packet endpoint, transport and
// connection is closed, waiting dials fail, undelivered data is dropped,
// and the delivery goroutine has exited when Close returns.
func (n *Network) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true
	hosts := make([]*host, 0, len(n.hosts))
	for _, h := range n.hosts {
		hosts = append(hosts, h)
	}
	conns := make([]*conn, 0, len(n.conns))
	for c := range n.conns {
		conns = append(conns, c)
	}
	n.mu.Unlock()

	close(n.done)
	n.wg.Wait()
	for _, h := range hosts {
		h.mu.Lock()
		var sinks []packetSink
		var ls []*listener
		for _, s := range h.udp {
			sinks = append(sinks, s)
		}
		for _, l := range h.tcp {
			ls = append(ls, l)
		}
		h.mu.Unlock()
		for _, s := range sinks {
			s.close()
		}
		for _, l := range ls {
			l.Close()
		}
	}
	for _, c := range conns {
		c.Close()
	}
	return nil
}

// Ports handed out for port 0 and for the local end of dialled streams.
const (
	firstEphemeral = 32768
	lastEphemeral  = 60999
)

// freePortLocked picks an unused port from the ephemeral range; h.mu held.
func (h *host) freePortLocked(used func(int) bool) (int, error) {
	for range lastEphemeral - firstEphemeral + 1 {
		p := h.nextPort
		h.nextPort++
		if h.nextPort > lastEphemeral {
			h.nextPort = firstEphemeral
		}
		if !used(p) {
			return p, nil
		}
	}
	return 0, errors.New("netsim: out of ports")
}
