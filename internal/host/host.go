// Package host builds and runs one Flame host: the agent with its driver and
// the Machines API server in front of it. `flame agent`, `flame dev` and the
// tests all build hosts here, the same way.
package host

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/agent"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/dns"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/httpserve"
	"github.com/flamehq/flame/internal/machine"
	"github.com/flamehq/flame/internal/mesh"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy"
)

// Config describes a host.
type Config struct {
	DataDir string
	Region  string
	// Listener is where the Machines API is served.
	Listener net.Listener
	// Token is the bearer token the API requires, unless Identity is set;
	// hosts share it for the proxy's backhaul too. Not needed with
	// Identity: hosts enrolled with a control plane hold no shared secret.
	Token string
	// Identity, when set, is the host's enrolled identity (possibly given
	// later, through the slot): the API is served over TLS with the
	// host's certificate and answers only clients presenting a control
	// plane's certificate from the same CA; tokens are not accepted.
	Identity *pki.Slot
	// Renew is where the identity's certificate is renewed (hostcreds.go);
	// without a PlaneURL it is not.
	Renew Renewal
	// Driver runs the workloads.
	Driver driver.Driver
	// Backoff spaces automatic restarts (zero: the agent's default).
	Backoff machine.Backoff
	// OrgNumbers numbers the orgs of creates without a control plane's
	// number, for every host of the cluster alike (nil: the host's own
	// store; see agent.Config.OrgNumbers).
	OrgNumbers agent.OrgNumbering
	Logger     *slog.Logger

	// Cluster joins the host to the others when Cluster.HostID is set: its
	// machines are published to every host, and DNS answers from the
	// cluster's view. Region, Addrs and Logger are filled in by the host.
	Cluster cluster.Config
	// Join lists gossip addresses of hosts to join at start.
	Join []string
	// DNSPacketConn and DNSListener, when set (with a cluster), serve the
	// .internal names over UDP and TCP.
	DNSPacketConn net.PacketConn
	DNSListener   net.Listener
	// Registry, when set, is served under /v2/ beside the Machines API.
	Registry http.Handler
	// Events, when set, carries every machine event to the event bus, on
	// subject EventSubject(app, machine).
	Events Publisher
	// Proxy runs the host's proxy when Proxy.Backhaul is set (with a
	// cluster).
	Proxy ProxyConfig
	// Mesh, when set (with a cluster), is the host's private network
	// device (internal/mesh): its key and endpoint are advertised, its
	// peers follow the cluster's view from Start, and Close closes it (a
	// New that fails leaves it to the caller).
	Mesh *mesh.Mesh
}

// ProxyConfig is the host's part of the edge proxy: every host delivers what
// the edges send its machines over the backhaul; a host with an Edge
// listener takes clients' requests too. The host's Identity authenticates
// the backhaul (mutual TLS between hosts' certificates); without one, the
// hosts' shared Token.
type ProxyConfig struct {
	// Edge is the public listener (nil: no edge on this host).
	Edge net.Listener
	// Backhaul is where other hosts' edges reach this host's machines; its
	// address is advertised to the cluster as "proxy".
	Backhaul net.Listener
	// Dial reaches other hosts' backhaul listeners (nil: the host's
	// network).
	Dial proxy.DialFunc
	// Domain apps are served under (default localhost) and Port the public
	// port the edge stands for (default 80).
	Domain string
	Port   int
	// AutostopInterval is the period of the proxy's autostop passes
	// (default proxy.DefaultAutostopInterval); AutostartTimeout bounds how
	// long a request waits for a machine started for it.
	AutostopInterval time.Duration
	AutostartTimeout time.Duration
	// TCPPorts are the public ports the edge may serve raw TCP services on
	// (empty: none), and ListenTCP opens one (nil: on the edge's IP).
	TCPPorts  proxy.PortRange
	ListenTCP func(port int) (net.Listener, error)
	// TLS serves HTTPS beside the edge (nil: none), and Hostnames names
	// the app of a claimed custom hostname (see proxy.Config).
	TLS       *proxy.TLSConfig
	Hostnames func(host string) (app string, ok bool)
}

// Publisher sends a message on a subject of the event bus (the catalog's
// NATS).
type Publisher interface {
	Publish(ctx context.Context, subject string, data []byte) error
}

// LogSubject is the event bus subject of a machine's log lines on host
// hostID; api.AppLogsSubject matches every line of an app.
func LogSubject(hostID, app, machineID string) string { return api.LogSubject(hostID, app, machineID) }

// EventSubject is the event bus subject of a machine's events on host
// hostID; api.AppEventsSubject matches every event of an app.
func EventSubject(hostID, app, machineID string) string {
	return api.EventSubject(hostID, app, machineID)
}

// Validate reports what is missing.
func (c *Config) Validate() error {
	switch {
	case c.Listener == nil:
		return errors.New("host: listener is required")
	case c.Token == "" && c.Identity == nil:
		return errors.New("host: a token or an identity is required")
	case (c.Proxy.Edge != nil || c.Proxy.Backhaul != nil) && c.Cluster.HostID == "":
		return errors.New("host: the proxy routes by the cluster: a host id is required")
	case c.Proxy.Edge != nil && c.Proxy.Backhaul == nil:
		return errors.New("host: an edge needs a backhaul listener")
	}
	return nil
}

// controlPlaneAuth accepts what the TLS handshake let in: a control
// plane's certificate from the host's CA (pki.Slot.ServerTLS checks it).
func controlPlaneAuth(r *http.Request) (context.Context, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return nil, api.Errorf(http.StatusUnauthorized, "a control plane's certificate is required")
	}
	return r.Context(), nil
}

// Host is a running host.
type Host struct {
	Agent   *agent.Agent
	Cluster *cluster.Cluster // nil when the host runs alone
	Proxy   *proxy.Proxy     // nil without a backhaul listener
	cfg     Config
	log     *slog.Logger
	srv     *http.Server
	dns     *dns.Server
	mdns    *dns.Server   // the machines' (see machinedns.go)
	kick    chan struct{} // the agent's machines changed
	revoked *pki.Revocations
	stop    context.CancelFunc
	wg      sync.WaitGroup
}

// New builds the host's parts; nothing runs until Start.
func New(cfg Config) (*Host, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	h := &Host{cfg: cfg, log: cfg.Logger.With("component", "host"), kick: make(chan struct{}, 1)}
	if cfg.Cluster.Capacity == (cluster.Resources{}) {
		cfg.Cluster.Capacity = DefaultCapacity()
	}
	ag, err := agent.New(agent.Config{
		Capacity:   cfg.Cluster.Capacity,
		DataDir:    cfg.DataDir,
		Region:     cfg.Region,
		Driver:     cfg.Driver,
		Logger:     cfg.Logger,
		Backoff:    cfg.Backoff,
		OrgNumbers: cfg.OrgNumbers,
		OnChange:   h.machinesChanged,
		OnEvent:    h.publishEvent,
		OnLog:      h.publishLog,
	})
	if err != nil {
		return nil, err
	}
	h.Agent = ag
	auth := httpapi.TokenAuth(cfg.Token)
	h.revoked = new(pki.Revocations)
	if cfg.Identity != nil {
		auth = controlPlaneAuth
		if err := loadRevocations(cfg.DataDir, h.revoked); err != nil {
			h.log.Warn("revocation list kept from before", "err", err)
		}
	}
	api, err := httpapi.New(httpapi.Config{Backend: ag, Authenticate: auth, Logger: cfg.Logger})
	if err != nil {
		ag.Close()
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/", api.Handler())
	mux.Handle("PUT /v1/host/revocations", h.revocationsHandler(auth))
	if cfg.Registry != nil {
		mux.Handle("/v2/", cfg.Registry)
	}
	if cfg.Cluster.HostID != "" {
		cc := cfg.Cluster
		cc.Region = cfg.Region
		cc.Logger = cfg.Logger
		cc.Addrs = map[string]string{"api": cfg.Listener.Addr().String()}
		if cfg.DNSPacketConn != nil {
			cc.Addrs["dns"] = cfg.DNSPacketConn.LocalAddr().String()
		}
		if cfg.Proxy.Backhaul != nil {
			cc.Addrs["proxy"] = cfg.Proxy.Backhaul.Addr().String()
		}
		if err := gossipTrustConfig(&cc, cfg); err != nil {
			ag.Close()
			return nil, err
		}
		if cfg.Mesh != nil {
			mesh.Advertise(cc.Addrs, cfg.Mesh.PublicKey(), cfg.Mesh.Endpoint())
		}
		if h.Cluster, err = cluster.New(cc); err != nil {
			ag.Close()
			return nil, err
		}
		h.cfg.Cluster = cc
		mux.Handle("/v1/cluster/", h.clusterHandler(auth))
		if cfg.Proxy.Backhaul != nil {
			h.Proxy, err = proxy.New(proxy.Config{
				HostID: cc.HostID, Region: cfg.Region, Domain: cfg.Proxy.Domain, Port: cfg.Proxy.Port,
				Edge: cfg.Proxy.Edge, Backhaul: cfg.Proxy.Backhaul, Dial: cfg.Proxy.Dial,
				Token: cfg.Token, Identity: cfg.Identity, Revoked: h.revoked, Source: h.Cluster, Logger: cfg.Logger,
				Start: h.autostart, AutostartTimeout: cfg.Proxy.AutostartTimeout,
				Autostop: proxy.AutostopConfig{Stop: h.autostop, Interval: cfg.Proxy.AutostopInterval, OnDrain: h.machinesChanged},
				TCPPorts: cfg.Proxy.TCPPorts, ListenTCP: cfg.Proxy.ListenTCP,
				TLS: cfg.Proxy.TLS, Hostnames: cfg.Proxy.Hostnames,
			})
			if err != nil {
				ag.Close()
				return nil, err
			}
		}
		if md, ok := cfg.Driver.(MachineDNS); ok {
			if h.mdns, err = newMachineDNS(md, dnsSource{h.Cluster}, cfg.Logger); err != nil {
				ag.Close()
				return nil, err
			}
		}
		if cfg.DNSPacketConn != nil || cfg.DNSListener != nil {
			h.dns, err = dns.New(dns.Config{Source: dnsSource{h.Cluster}, PacketConn: cfg.DNSPacketConn, Listener: cfg.DNSListener, Logger: cfg.Logger})
			if err != nil {
				ag.Close()
				return nil, err
			}
		}
	}
	h.srv = httpserve.New(mux, httpserve.Limits{})
	// Refused handshakes (no certificate, another CA) are logged at debug.
	h.srv.ErrorLog = slog.NewLogLogger(h.log.Handler(), slog.LevelDebug)
	return h, nil
}

// publishEvent is the agent's OnEvent: the event goes on the bus, at most
// once; a bus that is down loses it (the host keeps every machine's events).
func (h *Host) publishEvent(app, machineID string, ev *api.MachineEvent) {
	if h.cfg.Events == nil {
		return
	}
	b, err := json.Marshal(api.AppEvent{App: app, MachineID: machineID, Region: h.cfg.Region, Event: ev})
	if err != nil {
		return
	}
	if err := h.cfg.Events.Publish(context.Background(), EventSubject(h.cfg.Cluster.HostID, app, machineID), b); err != nil {
		h.log.Debug("publish machine event", "machine", machineID, "err", err)
	}
}

// publishLog is the agent's OnLog: each line goes on the bus, at most once.
func (h *Host) publishLog(app string, lines []api.LogEntry) {
	if h.cfg.Events == nil {
		return
	}
	for _, l := range lines {
		b, err := json.Marshal(l)
		if err != nil {
			continue
		}
		if err := h.cfg.Events.Publish(context.Background(), LogSubject(h.cfg.Cluster.HostID, app, l.MachineID), b); err != nil {
			h.log.Debug("publish log line", "machine", l.MachineID, "err", err)
			return
		}
	}
}

// machinesChanged is the agent's OnChange: it wakes the publisher.
func (h *Host) machinesChanged() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// LoadInterval is how often a host samples its proxy's requests in flight
// per machine and, when any changed, republishes its facts: a remote edge
// sees a machine's load within this plus a gossip hop, and a host whose
// load changes all the time sends at most one delta per interval.
const LoadInterval = 200 * time.Millisecond

// publish keeps the cluster's view of this host's machines current: at once
// after each change, every LoadInterval when their load changed, and every
// few seconds for what drifts (free capacity).
func (h *Host) publish(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	var loadC <-chan time.Time
	if h.Proxy != nil {
		lt := time.NewTicker(LoadInterval)
		defer lt.Stop()
		loadC = lt.C
	}
	reported := map[string]string{} // machine → why the cluster refused it
	var load map[string]int         // the load last sampled
	for {
		h.publishOnce(reported, load)
		for again := false; !again; {
			select {
			case <-ctx.Done():
				return
			case <-h.kick:
				again = true
			case <-t.C:
				again = true
			case <-loadC:
				now := h.Proxy.InFlight()
				again = !maps.Equal(now, load)
				load = now
			}
		}
	}
}

// Start resumes the agent's machines and serves the API.
func (h *Host) Start(ctx context.Context) error {
	if err := h.Agent.Start(ctx); err != nil {
		return err
	}
	bg, stop := context.WithCancel(context.Background())
	h.stop = stop
	if h.Cluster != nil {
		if err := h.Cluster.Start(ctx); err != nil {
			return err
		}
		if len(h.cfg.Join) > 0 {
			if _, err := h.Cluster.Join(h.cfg.Join); err != nil {
				h.log.Warn("join cluster", "err", err)
			}
		}
		if h.cfg.Mesh != nil {
			h.cfg.Mesh.Start(h.Cluster)
		}
		h.wg.Add(1)
		go func() {
			defer h.wg.Done()
			h.publish(bg)
		}()
		if h.dns != nil {
			if err := h.dns.Start(bg); err != nil {
				return err
			}
		}
		if h.mdns != nil {
			if err := h.mdns.Start(bg); err != nil {
				return err
			}
		}
		if h.Proxy != nil {
			if err := h.Proxy.Start(bg); err != nil {
				return err
			}
		}
	}
	if h.cfg.Identity != nil && h.cfg.Renew.PlaneURL != nil {
		h.wg.Go(func() { h.renewLoop(bg) })
	}
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		ln := h.cfg.Listener
		if h.cfg.Identity != nil {
			ln = tls.NewListener(ln, h.cfg.Identity.ServerTLS(time.Now))
		}
		if err := h.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			h.log.Error("machines api stopped", "err", err)
		}
	}()
	return nil
}

// Addr is where the API listens.
func (h *Host) Addr() string { return h.cfg.Listener.Addr().String() }

// Close stops serving and closes the agent. Workloads keep running unless
// StopMachines ran first.
func (h *Host) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var err error
	if serr := h.srv.Shutdown(ctx); serr != nil {
		// A request still running after the grace period (a long wait, a
		// followed log) is cut off: the host is going away either way.
		h.log.Warn("closing API connections still busy after 5 s", "err", serr)
		h.srv.Close()
	}
	if h.dns != nil {
		err = errors.Join(err, h.dns.Close())
	}
	if h.mdns != nil {
		err = errors.Join(err, h.mdns.Close())
	}
	if h.Proxy != nil {
		err = errors.Join(err, h.Proxy.Close())
	}
	if h.stop != nil {
		h.stop()
	}
	if h.cfg.Mesh != nil {
		err = errors.Join(err, h.cfg.Mesh.Close())
	}
	if h.Cluster != nil {
		h.Cluster.Leave(time.Second)
		err = errors.Join(err, h.Cluster.Close())
	}
	h.wg.Wait()
	err = errors.Join(err, h.Agent.Close())
	if c, ok := h.cfg.Driver.(io.Closer); ok {
		err = errors.Join(err, c.Close())
	}
	return err
}

// StopMachines stops every running machine.
func (h *Host) StopMachines(ctx context.Context) { h.Agent.StopAll(ctx) }

// DestroyMachines destroys every machine, for a host whose state goes away.
func (h *Host) DestroyMachines(ctx context.Context) { h.Agent.DestroyAll(ctx) }

// Teardown removes what the host's driver keeps for all machines (a
// sandbox's bridge and cgroups), after Close, once no machine is left.
func (h *Host) Teardown() error {
	if t, ok := h.cfg.Driver.(interface{ Teardown() error }); ok {
		return t.Teardown()
	}
	return nil
}

// ExecImages maps the images the exec driver knows by name to host programs:
// the built-in demo app runs as `<this binary> demo-app`.
func ExecImages() (map[string][]string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find own binary: %w", err)
	}
	return map[string][]string{DemoImage: {self, "demo-app"}}, nil
}

// DemoImage is the image name of the built-in demo app.
const DemoImage = "flame/demo-app"
