package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/hashicorp/memberlist"
)

// Config configures one host's member of the cluster. Zero timings take the
// defaults below; the package doc explains why they are what they are.
type Config struct {
	// HostID names this host; unique in the cluster and stable across
	// restarts ([A-Za-z0-9][A-Za-z0-9._-]*, at most 64 bytes).
	HostID string
	// Region is the region this host is in.
	Region string

	// BindAddr and BindPort are where memberlist's own network transport
	// listens (UDP and TCP) when Transport is nil: the host's private
	// address, which must be given. Port 0 picks a free one. Every
	// interface (0.0.0.0 or ::) is refused unless BindAny says so: gossip
	// reachable from everywhere, a sandbox's bridge included, is what the
	// keyring alone would then have to keep out.
	BindAddr string
	BindPort int
	BindAny  bool
	// AdvertiseAddr and AdvertisePort, when set, are what other hosts are
	// told to reach this one at.
	AdvertiseAddr string
	AdvertisePort int
	// Transport carries the gossip. Nil means memberlist's UDP/TCP
	// transport on BindAddr:BindPort; tests and the dev cluster pass an
	// in-memory network with latency, loss and partitions.
	Transport memberlist.NodeAwareTransport

	// GossipKeys, when given, encrypt and authenticate gossip (memberlist's
	// keyring, AES-GCM): the first encrypts, every one decrypts, and
	// anything not encrypted with one of them is refused. Keys are 16, 24
	// or 32 bytes. Without, gossip is in clear until SetGossipKeys.
	GossipKeys [][]byte
	// Trust, when set, signs this host's records and checks everyone
	// else's (trust.go); SetTrust gives it later.
	Trust *Trust

	// Addrs are this host's service addresses by name ("api", "proxy",
	// "dns", …), advertised to every host.
	Addrs map[string]string
	// Capacity is what this host can run.
	Capacity Resources
	Logger   *slog.Logger
	// Now is the clock, for versions and statuses; nil means time.Now.
	Now func() time.Time

	// Failure detection across the cluster (memberlist's SWIM with
	// Lifeguard). Its probes must outlive the round trip to the farthest
	// host; see the package doc.
	ProbeInterval           time.Duration // default 300ms
	ProbeTimeout            time.Duration // default 150ms
	IndirectChecks          int           // default 4
	SuspicionMult           int           // default 3
	SuspicionMaxTimeoutMult int           // default 4
	// Failure detection within the region: a second memberlist of this
	// region's hosts only, on the same transport, whose verdicts the rest
	// of the cluster takes. Its probes need only outlive the round trip
	// within the region; the timeout should stay well under half the
	// interval, for indirect probes' nacks to come back in time (see the
	// package doc).
	RegionProbeInterval time.Duration // default 100ms
	RegionProbeTimeout  time.Duration // default 40ms
	// NoRegionDetector leaves failure detection to the cluster-wide
	// memberlist alone, as in a cluster of one region.
	NoRegionDetector bool
	// Dissemination.
	GossipInterval time.Duration // default 50ms
	GossipNodes    int           // default 4
	RetransmitMult int           // default 4
	// AntiEntropyInterval is how often this host swaps versions with one
	// random host and each sends the other the facts it lacks. Default 5s.
	AntiEntropyInterval time.Duration
	// PushPullInterval is memberlist's full state exchange, which carries
	// the membership and a version digest (memberlist scales it up beyond
	// 32 hosts). Default 10s.
	PushPullInterval time.Duration
	// GapWait is how long a delta may wait for the one before it before
	// this host asks for the owner's full facts. Default 250ms.
	GapWait time.Duration
	// ReconnectInterval is how often this host tries to reach one host it
	// believes dead, which is how a healed partition is noticed. Default 2s.
	ReconnectInterval time.Duration
	// ReapTimeout is how long a dead or departed host's facts are kept.
	// Default 72h.
	ReapTimeout time.Duration
	// MaxMachines bounds the machines one host may publish. Default 10,000.
	MaxMachines int
	// MaxOwners and MaxStoredMachines bound the facts this host keeps in
	// all: the hosts it holds facts of, and their machines together
	// (defaults 4,096 and 250,000). At a bound, a member's facts take the
	// place of facts of hosts that are not members; others are refused.
	MaxOwners, MaxStoredMachines int

	// Dilation stretches every timing of the protocol — the ones above,
	// set or default, and the package's own — by this factor. It is for
	// simulations of more hosts than their cores can run in real time:
	// with every timing and every simulated latency stretched alike, the
	// protocol behaves as it would in real time with the CPU it lacks, and
	// what is measured is divided by the factor (docs/BENCHMARKS.md). Zero
	// or one on real hosts.
	Dilation int
}

// Default bounds on the facts a host keeps.
const (
	DefaultMaxOwners         = 4096
	DefaultMaxStoredMachines = 250_000
)

// Default timings.
const (
	DefaultProbeInterval           = 300 * time.Millisecond
	DefaultProbeTimeout            = 150 * time.Millisecond
	DefaultIndirectChecks          = 4
	DefaultSuspicionMult           = 3
	DefaultSuspicionMaxTimeoutMult = 4
	DefaultRegionProbeInterval     = 100 * time.Millisecond
	DefaultRegionProbeTimeout      = 40 * time.Millisecond
	DefaultGossipInterval          = 50 * time.Millisecond
	DefaultGossipNodes             = 4
	DefaultRetransmitMult          = 4
	DefaultPushPullInterval        = 10 * time.Second
	DefaultAntiEntropyInterval     = 5 * time.Second
	DefaultGapWait                 = 250 * time.Millisecond
	DefaultReapTimeout             = 72 * time.Hour
	DefaultReconnectInterval       = 2 * time.Second
)

// The regional detector's suspicion: a suspect is declared dead after
// regionSuspicionMult·max(1, log10 n) probe intervals once two other hosts
// confirm the suspicion, and regionSuspicionMaxMult times that without
// confirmation (memberlist waits for none in a region of three or fewer).
const (
	regionSuspicionMult    = 4
	regionSuspicionMaxMult = 3
)

func (c *Config) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	defInt := func(d *int, v int) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.ProbeInterval, DefaultProbeInterval)
	def(&c.ProbeTimeout, DefaultProbeTimeout)
	def(&c.RegionProbeInterval, DefaultRegionProbeInterval)
	def(&c.RegionProbeTimeout, DefaultRegionProbeTimeout)
	defInt(&c.IndirectChecks, DefaultIndirectChecks)
	defInt(&c.SuspicionMult, DefaultSuspicionMult)
	defInt(&c.SuspicionMaxTimeoutMult, DefaultSuspicionMaxTimeoutMult)
	def(&c.GossipInterval, DefaultGossipInterval)
	defInt(&c.GossipNodes, DefaultGossipNodes)
	defInt(&c.RetransmitMult, DefaultRetransmitMult)
	def(&c.PushPullInterval, DefaultPushPullInterval)
	def(&c.AntiEntropyInterval, DefaultAntiEntropyInterval)
	def(&c.GapWait, DefaultGapWait)
	def(&c.ReapTimeout, DefaultReapTimeout)
	def(&c.ReconnectInterval, DefaultReconnectInterval)
	defInt(&c.MaxMachines, maxMachines)
	defInt(&c.MaxOwners, DefaultMaxOwners)
	defInt(&c.MaxStoredMachines, DefaultMaxStoredMachines)
	if c.Dilation > 1 {
		for _, d := range []*time.Duration{&c.ProbeInterval, &c.ProbeTimeout, &c.RegionProbeInterval,
			&c.RegionProbeTimeout, &c.GossipInterval, &c.PushPullInterval, &c.AntiEntropyInterval,
			&c.GapWait, &c.ReapTimeout, &c.ReconnectInterval} {
			*d *= time.Duration(c.Dilation)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
}

// stretch applies Dilation to one of the package's own timings.
func (c *Config) stretch(d time.Duration) time.Duration {
	return d * time.Duration(max(1, c.Dilation))
}

// Validate reports what is wrong with the configuration.
func (c *Config) Validate() error {
	var errs []error
	if !validHostID(c.HostID) {
		errs = append(errs, fmt.Errorf("host id %q: want [A-Za-z0-9][A-Za-z0-9._-]*, at most %d bytes", c.HostID, maxIDLen))
	}
	if !validRegion(c.Region) {
		errs = append(errs, fmt.Errorf("region %q: want letters, digits, - and _", c.Region))
	}
	m := hostMeta{Region: c.Region, Capacity: c.Capacity, Addrs: c.Addrs}
	if err := validateMeta(&m); err != nil {
		errs = append(errs, fmt.Errorf("advertised facts: %w", err))
	} else if n := len(encodeMeta(&m)); n > metaLimit {
		errs = append(errs, fmt.Errorf("advertised facts take %d bytes, over memberlist's %d", n, metaLimit))
	}
	if c.ProbeTimeout >= c.ProbeInterval {
		errs = append(errs, fmt.Errorf("probe timeout %s must be shorter than the probe interval %s", c.ProbeTimeout, c.ProbeInterval))
	}
	if c.RegionProbeTimeout >= c.RegionProbeInterval {
		errs = append(errs, fmt.Errorf("region probe timeout %s must be shorter than the region probe interval %s", c.RegionProbeTimeout, c.RegionProbeInterval))
	}
	if c.SuspicionMult < 1 || c.SuspicionMaxTimeoutMult < 1 || c.IndirectChecks < 0 ||
		c.GossipNodes < 1 || c.RetransmitMult < 1 || c.MaxMachines < 0 || c.MaxMachines > maxMachines || c.Dilation < 0 ||
		c.MaxOwners < 1 || c.MaxStoredMachines < c.MaxMachines {
		errs = append(errs, errors.New("suspicion, gossip, retransmit, machine and owner bounds and dilation must be positive (MaxStoredMachines at least MaxMachines)"))
	}
	if c.BindPort < 0 || c.BindPort > maxPort || c.AdvertisePort < 0 || c.AdvertisePort > maxPort {
		errs = append(errs, errors.New("ports must be within 0-65535"))
	}
	return errors.Join(errs...)
}

// checkBind reports what is wrong with the address memberlist's own
// transport would bind (Start checks it when there is no Transport).
func (c *Config) checkBind() error {
	switch ip := net.ParseIP(c.BindAddr); {
	case c.BindAddr == "":
		return errors.New("gossip bind address: none given (the host's private address)")
	case ip == nil:
		return fmt.Errorf("gossip bind address %q: not an IP address", c.BindAddr)
	case ip.IsUnspecified() && !c.BindAny:
		return fmt.Errorf("gossip bind address %s is every interface: give the host's private address (or bind to every interface explicitly)", c.BindAddr)
	}
	return nil
}

// memberlistConfig turns the configuration into memberlist's.
func (c *Config) memberlistConfig() *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.HostID
	if c.BindAddr != "" {
		mc.BindAddr = c.BindAddr
	}
	mc.BindPort = c.BindPort
	mc.AdvertiseAddr = c.AdvertiseAddr
	mc.AdvertisePort = c.AdvertisePort
	if c.Transport != nil {
		mc.Transport = c.Transport
	}
	mc.ProbeInterval = c.ProbeInterval
	mc.ProbeTimeout = c.ProbeTimeout
	mc.IndirectChecks = c.IndirectChecks
	mc.SuspicionMult = c.SuspicionMult
	mc.SuspicionMaxTimeoutMult = c.SuspicionMaxTimeoutMult
	mc.GossipInterval = c.GossipInterval
	mc.GossipNodes = c.GossipNodes
	mc.RetransmitMult = c.RetransmitMult
	mc.PushPullInterval = c.PushPullInterval
	// A dead host keeps receiving gossip for a while so it can refute.
	mc.GossipToTheDeadTime = c.stretch(30 * time.Second)
	// A host restarted at a new address may take its name back.
	mc.DeadNodeReclaimTime = c.stretch(10 * time.Second)
	// Stream operations (anti-entropy, full facts) give up sooner than
	// memberlist's 10s so a stuck peer does not hold a worker long.
	mc.TCPTimeout = c.stretch(5 * time.Second)
	// Records are already compact binary; memberlist's LZW compression
	// allocated a fresh compressor per packet and was a quarter of the CPU
	// of a 100-host simulation, for little gain.
	mc.EnableCompression = false
	return mc
}

// regionConfig is the regional memberlist's configuration: LAN timings, no
// messages of its own. The transport and ports are the caller's to set.
func (c *Config) regionConfig() *memberlist.Config {
	mc := memberlist.DefaultLANConfig()
	mc.Name = c.HostID
	if c.BindAddr != "" {
		mc.BindAddr = c.BindAddr
	}
	mc.AdvertiseAddr = c.AdvertiseAddr
	mc.ProbeInterval = c.RegionProbeInterval
	mc.ProbeTimeout = c.RegionProbeTimeout
	mc.IndirectChecks = c.IndirectChecks
	mc.SuspicionMult = regionSuspicionMult
	mc.SuspicionMaxTimeoutMult = regionSuspicionMaxMult
	mc.GossipInterval = c.GossipInterval
	mc.GossipNodes = c.GossipNodes
	mc.RetransmitMult = c.RetransmitMult
	mc.PushPullInterval = c.PushPullInterval
	mc.GossipToTheDeadTime = c.stretch(30 * time.Second)
	mc.DeadNodeReclaimTime = c.stretch(10 * time.Second)
	mc.TCPTimeout = c.stretch(2 * time.Second)
	mc.EnableCompression = false
	return mc
}
