package mesh

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// Config configures a host's Mesh.
type Config struct {
	// HostID is the host's id in its cluster.
	HostID string
	// Network and Host are the host's cluster network and its number in
	// it.
	Network layout.Network
	Host    layout.Host
	// Key is the host's private key (LoadKey).
	Key PrivateKey
	// TUN is the interface the device reads the host's outgoing packets
	// from and writes the peers' into; the Mesh closes it. Default: Link's.
	TUN tun.Device
	// Link, when set, is the kernel side of the TUN (OpenLink): the Mesh
	// closes it after the device.
	Link *Link
	// Bind carries the encrypted packets between hosts (PacketBind, or
	// conn.NewStdNetBind()); Port is where it listens (0: any).
	Bind conn.Bind
	Port uint16
	// Advertise is the address the other hosts reach the Bind at; the
	// endpoint published is it and the port the Bind opened.
	Advertise netip.Addr
	// Restarted says the host's key was in use before this device (its
	// agent started again on its data dir): its peers may hold sessions
	// with the device before, whose packets this one cannot read and
	// drops, and would renew them only when their own timer fires
	// (device.KeepaliveTimeout + device.RekeyTimeout after they send
	// unanswered). So it handshakes with each peer as it first configures
	// it, and the peer takes the new session at once. A device with a new
	// key does not: no peer holds a session with it, and a handshake sent
	// before the peer has configured this host would be dropped, holding
	// back the first packet's own handshake by RekeyTimeout.
	Restarted bool
	Logger    *slog.Logger
}

// Validate reports what is missing.
func (c *Config) Validate() error {
	var errs []error
	if c.HostID == "" {
		errs = append(errs, errors.New("mesh: no host id"))
	}
	if c.Network == 0 || c.Host == 0 {
		errs = append(errs, fmt.Errorf("mesh: network %s host %d: both must be set", c.Network, c.Host))
	}
	if c.Key == (PrivateKey{}) {
		errs = append(errs, errors.New("mesh: no key"))
	}
	if c.TUN == nil || c.Bind == nil {
		errs = append(errs, errors.New("mesh: a TUN and a bind are needed"))
	}
	if !c.Advertise.IsValid() || c.Advertise.IsUnspecified() {
		errs = append(errs, fmt.Errorf("mesh: advertised address %v: must be one peers can reach", c.Advertise))
	}
	return errors.Join(errs...)
}

// Source is the cluster view a Mesh follows (a *cluster.Cluster).
type Source interface {
	Snapshot() *cluster.Snapshot
	Subscribe() (<-chan struct{}, func())
}

// Mesh is one host's WireGuard device and the peers it has.
type Mesh struct {
	cfg      Config
	log      *slog.Logger
	dev      *device.Device
	endpoint netip.AddrPort

	mu    sync.Mutex
	peers map[PublicKey]Peer

	stop context.CancelFunc
	wg   sync.WaitGroup
	once sync.Once
}

// New starts the host's device: its key set, its bind open, no peers yet.
func New(cfg Config) (*Mesh, error) {
	if cfg.TUN == nil && cfg.Link != nil {
		cfg.TUN = cfg.Link.TUN()
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "mesh")
	wlog := &device.Logger{
		Verbosef: func(string, ...any) {},
		Errorf:   func(f string, a ...any) { log.Debug("wireguard: " + fmt.Sprintf(f, a...)) },
	}
	m := &Mesh{cfg: cfg, log: log, peers: map[PublicKey]Peer{}}
	m.dev = device.NewDevice(&orgTUN{Device: cfg.TUN}, cfg.Bind, wlog)
	set := fmt.Sprintf("private_key=%s\nlisten_port=%d\n", hex.EncodeToString(cfg.Key[:]), cfg.Port)
	if err := m.dev.IpcSet(set); err != nil {
		m.dev.Close()
		return nil, fmt.Errorf("mesh: configure device: %w", err)
	}
	if err := m.dev.Up(); err != nil {
		m.dev.Close()
		return nil, fmt.Errorf("mesh: device up: %w", err)
	}
	port, err := m.listenPort()
	if err != nil || port == 0 {
		m.dev.Close()
		return nil, fmt.Errorf("mesh: device has no port: %v", err)
	}
	m.endpoint = netip.AddrPortFrom(cfg.Advertise, port)
	return m, nil
}

func (m *Mesh) listenPort() (uint16, error) {
	s, err := m.dev.IpcGet()
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "listen_port="); ok {
			p, err := strconv.ParseUint(v, 10, 16)
			return uint16(p), err
		}
	}
	return 0, errors.New("no listen_port")
}

// PublicKey is the host's public key, to publish.
func (m *Mesh) PublicKey() PublicKey { return m.cfg.Key.Public() }

// Endpoint is where the other hosts reach this one's device, to publish.
func (m *Mesh) Endpoint() netip.AddrPort { return m.endpoint }

// Peers is the peers configured now, sorted by host id.
func (m *Mesh) Peers() []Peer {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Peer, 0, len(m.peers))
	for _, p := range m.peers {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Peer) int { return strings.Compare(a.Host, b.Host) })
	return out
}

// Apply configures the peers Plan gives for hosts (the host's cluster
// view): new and changed ones set, gone ones removed.
func (m *Mesh) Apply(hosts []*cluster.Host) error {
	want := Plan(m.cfg.HostID, m.cfg.Network, m.cfg.Host, hosts)
	m.mu.Lock()
	defer m.mu.Unlock()
	var b strings.Builder
	var added []PublicKey
	next := make(map[PublicKey]Peer, len(want))
	for _, p := range want {
		next[p.Key] = p
		old, ok := m.peers[p.Key]
		if ok && old.Endpoint == p.Endpoint && slices.Equal(old.Prefixes, p.Prefixes) {
			continue
		}
		if !ok {
			added = append(added, p.Key)
		}
		fmt.Fprintf(&b, "public_key=%s\nendpoint=%s\nreplace_allowed_ips=true\n", hex.EncodeToString(p.Key[:]), p.Endpoint)
		for _, pre := range p.Prefixes {
			fmt.Fprintf(&b, "allowed_ip=%s\n", pre)
		}
	}
	for k := range m.peers {
		if _, ok := next[k]; !ok {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hex.EncodeToString(k[:]))
		}
	}
	if b.Len() > 0 {
		if err := m.dev.IpcSet(b.String()); err != nil {
			return fmt.Errorf("mesh: configure peers: %w", err)
		}
		m.log.Debug("peers", "count", len(next))
	}
	m.peers = next
	if m.cfg.Restarted {
		for _, k := range added {
			if p := m.dev.LookupPeer(device.NoisePublicKey(k)); p != nil {
				p.SendHandshakeInitiation(false)
			}
		}
	}
	return nil
}

// Start follows src: the peers are applied now and after every change of
// the view, until Close.
func (m *Mesh) Start(src Source) {
	ctx, stop := context.WithCancel(context.Background())
	m.stop = stop
	ch, cancel := src.Subscribe()
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		defer cancel()
		for {
			if s := src.Snapshot(); s != nil {
				if err := m.Apply(s.Hosts()); err != nil {
					m.log.Warn("apply peers", "err", err)
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-ch:
			}
		}
	}()
}

// Close stops following the view and closes the device, its TUN and its
// bind, then the Link.
func (m *Mesh) Close() error {
	var err error
	m.once.Do(func() {
		if m.stop != nil {
			m.stop()
		}
		m.wg.Wait()
		m.dev.Close()
		if m.cfg.Link != nil {
			err = m.cfg.Link.Close()
		}
	})
	return err
}
