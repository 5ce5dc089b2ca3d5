package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/httpserve"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy/route"
)

// DialFunc opens a stream connection, as net.Dialer.DialContext does.
type DialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// Defaults and limits.
const (
	DefaultDomain                = "localhost"
	DefaultPort                  = 80
	DefaultMaxHeaderBytes        = 32 << 10
	DefaultReadHeaderTimeout     = 10 * time.Second
	DefaultIdleTimeout           = 60 * time.Second
	DefaultConnectTimeout        = 5 * time.Second
	DefaultMinConnectTimeout     = 250 * time.Millisecond
	DefaultResponseHeaderTimeout = 60 * time.Second
	DefaultBodyReadTimeout       = 60 * time.Second
	// DefaultMaxBufferedBody is the largest request body kept so a request
	// can be retried on another machine; larger bodies stream, once.
	DefaultMaxBufferedBody = 10 << 20
	// DefaultMaxBufferedTotal bounds what all requests buffer at once.
	DefaultMaxBufferedTotal = 256 << 20
)

// Config configures a host's proxy.
type Config struct {
	// HostID and Region are this host's.
	HostID string
	Region string
	// Domain is what apps are served under: <app>.<Domain>.
	Domain string
	// Port is the public port the edge listener stands for (80 unless it
	// serves another of the apps' services[].ports).
	Port int
	// Edge is the public listener; nil for a host that only delivers what
	// other edges send it.
	Edge net.Listener
	// Backhaul is where the proxies of other hosts reach this one; its
	// address is what the host advertises as "proxy" in the cluster.
	Backhaul net.Listener
	// Dial reaches other hosts' backhaul listeners; nil dials over the host's
	// network. In `flame dev` it is the simulated network, so a hop between
	// regions costs their latency.
	Dial DialFunc
	// DialMachine reaches this host's machines at their private addresses;
	// nil dials over the host's network.
	DialMachine DialFunc
	// Token is the secret every host shares: a backhaul request must carry
	// it to name the machine it is for. Unused with Identity.
	Token string
	// Identity, when set, is the host's certificate: the backhaul runs
	// over mutual TLS between hosts' certificates (hostcreds.go), and
	// Revoked names those refused.
	Identity *pki.Slot
	Revoked  *pki.Revocations
	// Source is the cluster the route table is built from, on every change.
	Source Source
	Logger *slog.Logger

	MaxHeaderBytes    int           // larger request headers are refused with 431
	ReadHeaderTimeout time.Duration // a client sending its headers slower is cut off
	IdleTimeout       time.Duration // an idle keep-alive connection is closed
	// A connect to a machine or host fails after MinConnectTimeout plus
	// three measured round trips to its host, or ConnectTimeout when the
	// round trip is not known (and never later): a host that went silent
	// costs a request a few round trips, not seconds, before the next
	// candidate is tried.
	ConnectTimeout    time.Duration
	MinConnectTimeout time.Duration
	// AckTimeout plus two measured round trips is how long another host
	// may take to acknowledge a request it was sent over the backhaul
	// (ack.go), or ConnectTimeout when the round trip is not known.
	AckTimeout time.Duration
	// HeartbeatInterval is how often an edge asks each host of its region
	// whether it is there (heartbeat.go; default 25 ms, negative: never).
	HeartbeatInterval time.Duration
	// BodyReadTimeout is how long a client may take to send a body the
	// edge buffers (at most MaxBufferedBody): a sender slower than that is
	// answered 408 and holds no buffer longer.
	BodyReadTimeout time.Duration
	// ResponseHeaderTimeout is how long a machine may take to start its
	// answer. Then an idempotent request moves to the next candidate; any
	// other is answered 504, since the machine may have acted on it.
	ResponseHeaderTimeout time.Duration
	MaxBufferedBody       int64
	MaxBufferedTotal      int64
	// Now is the clock of the circuit breakers (nil: time.Now).
	Now func() time.Time

	// Start starts a stopped machine of this host that a request needs
	// (autostart; see autostart.go) and returns once it is started; nil:
	// this host's machines are never started on demand. AutostartTimeout
	// bounds how long a request waits for one (default 30 s).
	Start            func(ctx context.Context, app, machineID string) error
	AutostartTimeout time.Duration
	Autostop         AutostopConfig
	// DisableFastPath serves the edge with net/http alone (fastconn.go
	// says what the fast path is); for comparisons.
	DisableFastPath bool
	// DisableEventLoop gives every fast-path connection a goroutine of its
	// own; by default (on Linux) plain TCP connections are served by
	// event loops, one per GOMAXPROCS (evloop_linux.go).
	DisableEventLoop bool
	// loops: event loops even when noEventLoop says none (the loops' own
	// tests).
	loops bool

	// TCPPorts are the public ports the edge may serve raw TCP services
	// on (handlers none or proxy_proto): it listens on each such port its
	// cluster snapshot shows inside the range (empty: none).
	TCPPorts PortRange
	// ListenTCP opens the listener of a raw TCP public port; nil listens on
	// the edge listener's IP.
	ListenTCP func(port int) (net.Listener, error)
	// TCPIdleTimeout ends a raw TCP connection idle both ways that long.
	TCPIdleTimeout time.Duration

	// TLS serves HTTPS beside the edge listener (tls.go); nil: none.
	TLS *TLSConfig
	// Hostnames returns the app that claimed a hostname (lower case, no
	// port), for hosts other than <app>.<Domain>; nil: none.
	Hostnames func(host string) (app string, ok bool)
}

func (c *Config) setDefaults() {
	if c.Domain == "" {
		c.Domain = DefaultDomain
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.MaxHeaderBytes == 0 {
		c.MaxHeaderBytes = DefaultMaxHeaderBytes
	}
	if c.ReadHeaderTimeout == 0 {
		c.ReadHeaderTimeout = DefaultReadHeaderTimeout
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	if c.ConnectTimeout == 0 {
		c.ConnectTimeout = DefaultConnectTimeout
	}
	if c.MinConnectTimeout == 0 {
		c.MinConnectTimeout = min(DefaultMinConnectTimeout, c.ConnectTimeout)
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if c.AckTimeout == 0 {
		c.AckTimeout = min(DefaultAckTimeout, c.ConnectTimeout)
	}
	if c.BodyReadTimeout == 0 {
		c.BodyReadTimeout = DefaultBodyReadTimeout
	}
	if c.ResponseHeaderTimeout == 0 {
		c.ResponseHeaderTimeout = DefaultResponseHeaderTimeout
	}
	if c.MaxBufferedBody == 0 {
		c.MaxBufferedBody = DefaultMaxBufferedBody
	}
	if c.MaxBufferedTotal == 0 {
		c.MaxBufferedTotal = DefaultMaxBufferedTotal
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.AutostartTimeout == 0 {
		c.AutostartTimeout = DefaultAutostartTimeout
	}
	c.Autostop.setDefaults()
	if c.TCPIdleTimeout == 0 {
		c.TCPIdleTimeout = DefaultTCPIdleTimeout
	}
	if c.ListenTCP == nil {
		c.ListenTCP = c.listenTCP
	}
	if c.TLS != nil {
		c.TLS.setDefaults()
	}
	d := &net.Dialer{}
	if c.Dial == nil {
		c.Dial = d.DialContext
	}
	if c.DialMachine == nil {
		c.DialMachine = d.DialContext
	}
}

// Validate reports what is missing or wrong.
func (c *Config) Validate() error {
	switch {
	case c.HostID == "":
		return errors.New("proxy: host id is required")
	case c.Region == "":
		return errors.New("proxy: region is required")
	case c.Token == "" && c.Identity == nil:
		return errors.New("proxy: the hosts' token or a host identity is required")
	case c.Edge == nil && c.Backhaul == nil:
		return errors.New("proxy: an edge or a backhaul listener is required")
	case c.Port < 1 || c.Port > 65535:
		return fmt.Errorf("proxy: port %d is not between 1 and 65535", c.Port)
	case c.MaxBufferedBody < 0 || c.MaxBufferedTotal < 0:
		return errors.New("proxy: a body buffer limit is negative")
	case c.AutostartTimeout < 0:
		return errors.New("proxy: the autostart timeout is negative")
	}
	if err := c.Autostop.validate(c.Source); err != nil {
		return err
	}
	if c.TLS != nil && c.Edge == nil {
		return errors.New("proxy: tls needs an edge listener")
	}
	if c.TLS != nil {
		if err := c.TLS.validate(); err != nil {
			return err
		}
	}
	if !c.TCPPorts.Empty() && c.Edge == nil {
		return errors.New("proxy: raw TCP ports need an edge listener")
	}
	if err := c.TCPPorts.validate(); err != nil {
		return fmt.Errorf("proxy: raw TCP ports: %w", err)
	}
	return validDomain(c.Domain)
}

// Proxy is one host's proxy.
type Proxy struct {
	cfg     Config
	log     *slog.Logger
	state   atomic.Pointer[state]
	load    inflight
	strikes *breakers // of machines and hosts
	probes  *prober   // of hosts whose breakers are open (probe.go)
	toProbe *http.Transport
	waiters hostWaiters // attempts waiting on other hosts (silence.go)
	// suspicion holds the hosts this edge suspects, words what it learnt
	// of how long each host's first word takes (suspect.go).
	suspicion suspects
	words     hostWords
	regions   regionBreakers
	// buffered is what request bodies may still take of MaxBufferedTotal.
	buffered byteBudget
	seq      atomic.Uint64
	toSelf   *http.Transport // to this host's machines
	toHosts  *http.Transport // to other hosts' backhaul listeners
	dialHost DialFunc        // to other hosts' backhaul listeners (hostcreds.go)
	servers  []*http.Server
	edge     *edgeServer // the edge listener's fast path; nil when disabled
	// upgraded are the connections switched to another protocol.
	upgraded upgrades
	tables   tableWatch // wakes waiters for a machine started on demand
	starts   *starter
	drain    draining // machines autostop took out of rotation
	stop     context.CancelFunc
	wg       sync.WaitGroup

	// tcp serves the raw TCP ports.
	tcp *tcpEdge
	// toHostsUpgrade carries upgrades to other hosts (HTTP/1.1; see
	// backhaul.go).
	toHostsUpgrade *http.Transport
	backhaulSrv    *http.Server
	backhaulConns  connStates

	// hedges counts the hedges started (hedge.go).
	hedges atomic.Int64
}

// New builds a proxy; nothing runs until Start.
func New(cfg Config) (*Proxy, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p := &Proxy{cfg: cfg, log: cfg.Logger.With("component", "proxy"), strikes: newBreakers(cfg.Now, 2*cfg.ConnectTimeout+cfg.ResponseHeaderTimeout), starts: newStarter(), probes: newProber()}
	p.regions.now = cfg.Now
	p.buffered.give(cfg.MaxBufferedTotal)
	p.tcp = newTCPEdge(p)
	p.dialHost = p.hostDialer()
	p.cfg.Backhaul = p.newBackhaulListener(cfg.Backhaul)
	p.toSelf = p.transport(cfg.DialMachine, 64, cfg.ResponseHeaderTimeout)
	p.toHosts, p.toHostsUpgrade = p.hostTransports()
	p.toProbe = p.probeTransport()
	p.setState(route.Facts{Self: cfg.HostID, Region: cfg.Region}, nil)
	return p, nil
}

// transport is a pool of keep-alive connections through one dialer. A dial
// error comes back marked, so a refused connect is known to have sent
// nothing.
func (p *Proxy) transport(dial DialFunc, perHost int, headerTimeout time.Duration) *http.Transport {
	return &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			timeout, ok := ctx.Value(connectBudgetKey{}).(time.Duration)
			if !ok {
				timeout = p.cfg.ConnectTimeout
			}
			ctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			c, err := dial(ctx, network, addr)
			if err != nil {
				return nil, &connectError{addr: addr, err: err}
			}
			return c, nil
		},
		ResponseHeaderTimeout: headerTimeout,
		MaxIdleConns:          4096,
		MaxIdleConnsPerHost:   perHost,
		IdleConnTimeout:       30 * time.Second,
		DisableCompression:    true,
		// Responses are passed on as they come; headers are bounded like
		// a client's.
		MaxResponseHeaderBytes: 1 << 20,
	}
}

// connectBudgetKey carries an attempt's connect timeout to the dialer.
type connectBudgetKey struct{}

// connectBudget is how long connecting to a target may take.
func (p *Proxy) connectBudget(tg *route.Target) time.Duration {
	if !tg.OnSelf && tg.RTT <= 0 {
		return p.cfg.ConnectTimeout
	}
	return min(p.cfg.MinConnectTimeout+3*tg.RTT, p.cfg.ConnectTimeout)
}

// connectError is a failure to connect: nothing was sent.
type connectError struct {
	addr string
	err  error
}

func (e *connectError) Error() string { return fmt.Sprintf("connect %s: %v", e.addr, e.err) }
func (e *connectError) Unwrap() error { return e.err }

// setState builds the route table from facts and swaps it in.
func (p *Proxy) setState(f route.Facts, backhaul map[string]string) {
	st := &state{table: route.Build(f), backhaul: backhaul, hosts: hostsOf(f.Hosts)}
	p.state.Store(st)
	p.tables.notify()
	p.tcp.sync(st.table)
}

// refresh rebuilds the table from the source's current snapshot.
func (p *Proxy) refresh() {
	f, bh := factsFrom(p.cfg.Source.Snapshot(), p.cfg.HostID, p.cfg.Region)
	p.setState(f, bh)
}

// Table returns the route table requests route by now.
func (p *Proxy) Table() *route.Table { return p.state.Load().table }

// InFlight returns, per machine, the requests this proxy is delivering now:
// to the machine directly or over the backhaul.
func (p *Proxy) InFlight() map[string]int { return p.load.snapshot() }

// Start builds the route table, follows the cluster, and serves the
// listeners.
func (p *Proxy) Start(ctx context.Context) error {
	bg, stop := context.WithCancel(context.Background())
	p.stop = stop
	if p.cfg.Source != nil {
		changes, cancel := p.cfg.Source.Subscribe()
		p.refresh()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			defer cancel()
			for {
				select {
				case <-bg.Done():
					return
				case <-changes:
					p.refresh()
				}
			}
		}()
	}
	p.startAutostop(bg)
	p.startProbes(bg)
	p.startHeartbeats(bg)
	serve := func(ln net.Listener, h http.Handler, what string) {
		srv := httpserve.Apply(&http.Server{
			Handler:           h,
			MaxHeaderBytes:    p.cfg.MaxHeaderBytes,
			ReadHeaderTimeout: p.cfg.ReadHeaderTimeout,
			IdleTimeout:       p.cfg.IdleTimeout,
			ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		}, p.httpLimits())
		if what == "edge" {
			srv = p.edgeHTTPServer() // HTTP/1.1 and h2c
		}
		if ln == p.cfg.Backhaul {
			srv.Protocols, srv.ConnState = backhaulProtocols(), p.backhaulConns.hook
			p.backhaulSrv = srv
		}
		p.servers = append(p.servers, srv)
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				p.log.Error(what+" listener stopped", "err", err)
			}
		}()
	}
	switch {
	case p.cfg.Edge != nil && !p.cfg.DisableFastPath:
		p.edge = newEdgeServer(p, p.cfg.Edge)
		p.edge.start()
	case p.cfg.Edge != nil:
		serve(p.cfg.Edge, http.HandlerFunc(p.serveEdge), "edge")
		if p.cfg.TLS != nil {
			serve(tls.NewListener(p.cfg.TLS.Listener, p.cfg.TLS.tlsServerConfig()), http.HandlerFunc(p.serveEdge), "edge")
		}
	}
	if p.cfg.Backhaul != nil {
		serve(p.cfg.Backhaul, http.HandlerFunc(p.serveBackhaul), "backhaul")
	}
	if !p.cfg.TCPPorts.Empty() {
		p.tcp.start()
	}
	return nil
}

// EdgeAddr is the public listener's address ("" without one).
func (p *Proxy) EdgeAddr() string {
	if p.cfg.Edge == nil {
		return ""
	}
	return p.cfg.Edge.Addr().String()
}

// BackhaulAddr is the backhaul listener's address ("" without one).
func (p *Proxy) BackhaulAddr() string {
	if p.cfg.Backhaul == nil {
		return ""
	}
	return p.cfg.Backhaul.Addr().String()
}

// Close stops serving: requests in flight get a few seconds to finish, then
// their connections are cut. It waits for every goroutine the proxy started.
func (p *Proxy) Close() error {
	p.starts.close() // requests held for a start are answered at once
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if p.edge != nil {
		p.edge.close(ctx)
	}
	for _, srv := range p.servers {
		if srv == p.backhaulSrv {
			p.shutdownBackhaul(ctx, srv)
			continue
		}
		if serr := srv.Shutdown(ctx); serr != nil {
			srv.Close()
		}
	}
	p.tcp.close()
	p.upgraded.closeAll()
	// Listeners never served (a host that failed to start) are closed too.
	for _, ln := range []net.Listener{p.cfg.Edge, p.cfg.Backhaul, p.cfg.TLS.listener()} {
		if ln != nil {
			ln.Close()
		}
	}
	if p.stop != nil {
		p.stop()
	}
	p.wg.Wait()
	p.toSelf.CloseIdleConnections()
	p.toHosts.CloseIdleConnections()
	p.toHostsUpgrade.CloseIdleConnections()
	p.toProbe.CloseIdleConnections()
	return nil
}
