// Package devcluster runs the whole platform in one process — several hosts
// in several regions, joined into one cluster over a simulated network with
// real-world distances between regions. `flame dev` and the tests use it, and
// it builds every host with internal/host exactly as production does.
package devcluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/netsim"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy"
	"github.com/flamehq/flame/internal/server"
)

// Config describes a dev cluster.
type Config struct {
	// Regions are region codes (default ams, iad, syd).
	Regions []string
	// HostsPerRegion is how many hosts each region gets (default 2).
	HostsPerRegion int
	// Dir holds every host's state, one directory per host.
	Dir string
	// Token is the API token of every host without a control plane and
	// their shared backhaul token; with one, hosts use their certificates
	// and Token is only the registry's admin token (the demo image's push).
	Token string
	// APIAddr is where the first host serves its Machines API; the others
	// take the following ports (or random ones when its port is 0).
	APIAddr string
	// DNSAddr is where the first host serves .internal DNS over UDP and
	// TCP; the others take the following ports (random when the port is 0).
	DNSAddr string
	// EdgeAddr is where the first region's edge proxy takes clients'
	// requests (the first host of each region has the region's edge); the
	// other regions take the following ports (random when the port is 0).
	EdgeAddr string
	// EdgeDomain is what apps are served under at the edges (default
	// localhost: <app>.localhost resolves to loopback with no setup).
	EdgeDomain string
	// EdgeTCPPorts are the public ports the edges serve raw TCP services
	// on (empty: none). Every region's edge listens on the same port
	// numbers, so each takes its own loopback address: the first region's
	// edge the IP of EdgeAddr (127.0.0.1), the next ones the following
	// addresses (127.0.0.2, ...); with an EdgeAddr that is not an IPv4
	// loopback address only the first region's edge serves them.
	EdgeTCPPorts proxy.PortRange
	// EdgeTLSAddr is where the first region's edge serves HTTPS, with a
	// local CA's certificates (tls.go); the other regions take the
	// following ports ("": no HTTPS).
	EdgeTLSAddr string
	// GlobalAddr is where the global entry listens: it hands each request
	// to the edge nearest to its client, as anycast would (see global.go).
	GlobalAddr string
	// ClientRegion is where the global entry's clients are, unless a
	// request names its own in the flame-client-region header (default
	// the first region).
	ClientRegion string
	// NewDriver makes the driver of one host. registryAddr is where
	// Registry is served (host:port).
	NewDriver func(hostID string, hostIndex int, registryAddr string) (driver.Driver, error)
	// NewHostDriver, when set, is used instead of NewDriver: it is told
	// more, among it how the host dials the registry.
	NewHostDriver func(HostSpec) (driver.Driver, error)
	// Registry, when set, is served under /v2/ by the control plane (or,
	// without one, by the first host).
	Registry http.Handler
	// Seed makes the simulated network's randomness repeatable.
	Seed   int64
	Logger *slog.Logger
	// Cluster overrides gossip settings (timings) for every host.
	Cluster cluster.Config
	// AutostopInterval is the period of every host's autostop passes
	// (zero: the proxy's default).
	AutostopInterval time.Duration

	// ControlPlane runs a control plane (`flame server`) beside the hosts,
	// as a member of their cluster in the first region, serving the public
	// Machines API at ServerAddr. The hosts enroll with it as `flame agent`
	// does (identities.go): their own APIs then serve mutual TLS and answer
	// only a control plane's certificate.
	ControlPlane bool
	ServerAddr   string
	// Identities makes the hosts serve mutual TLS and wait to be enrolled
	// by a control plane started apart (EnrollWith); always so with
	// ControlPlane, which enrolls them itself.
	Identities bool
	// Chaos serves the chaos API (chaosapi.go) beside the control plane's.
	Chaos bool
	// Server tunes the control plane (placement weights, timings).
	Server server.Config
	// Mesh, when set, gives every host its private network device
	// (mesh.go).
	Mesh *MeshConfig
}

func (c *Config) setDefaults() {
	if len(c.Regions) == 0 {
		c.Regions = []string{"ams", "iad", "syd"}
	}
	if c.HostsPerRegion == 0 {
		c.HostsPerRegion = 2
	}
	if c.APIAddr == "" {
		c.APIAddr = "127.0.0.1:0"
	}
	if c.DNSAddr == "" {
		c.DNSAddr = "127.0.0.1:0"
	}
	if c.EdgeAddr == "" {
		c.EdgeAddr = "127.0.0.1:0"
	}
	if c.GlobalAddr == "" {
		c.GlobalAddr = "127.0.0.1:0"
	}
	if c.ClientRegion == "" && len(c.Regions) > 0 {
		c.ClientRegion = c.Regions[0]
	}
	if c.ServerAddr == "" {
		c.ServerAddr = "127.0.0.1:0"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// Validate reports what cannot work.
func (c *Config) Validate() error {
	switch {
	case c.Dir == "":
		return errors.New("devcluster: dir is required")
	case c.Token == "":
		return errors.New("devcluster: token is required")
	case c.NewDriver == nil && c.NewHostDriver == nil:
		return errors.New("devcluster: driver factory is required")
	case c.HostsPerRegion < 1 || c.HostsPerRegion > 50:
		return fmt.Errorf("devcluster: %d hosts per region: want 1 to 50", c.HostsPerRegion)
	}
	for _, r := range c.Regions {
		if _, ok := geo.Lookup(r); !ok {
			return fmt.Errorf("devcluster: unknown region %q", r)
		}
	}
	if _, ok := geo.Lookup(c.ClientRegion); c.ClientRegion != "" && !ok {
		return fmt.Errorf("devcluster: unknown client region %q", c.ClientRegion)
	}
	return nil
}

// HostSpec describes a host to its driver factory.
type HostSpec struct {
	ID     string
	Region string
	Index  int // 0, 1, … in the order hosts start
	// RegistryAddr is where Config.Registry is served (host:port).
	RegistryAddr string
	// Dial is how the host dials the cluster's APIs (the registry): over
	// the simulated network, from the host's region.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Identity is the host's, once enrolled (nil in a cluster of hosts
	// only): it pulls images with it (host.RegistryCredential).
	Identity *pki.Slot
}

// Cluster is a running dev cluster.
type Cluster struct {
	Hosts []*Host
	Net   *netsim.Network
	// Plane is the control plane, when Config.ControlPlane is set (closed
	// while killed; RestartControlPlane replaces it, controlplane.go).
	Plane *server.Plane
	// GlobalAddr is where the global entry listens.
	GlobalAddr string
	cfg        Config
	global     *global
	sim        *simNet
	// faults are the hosts killed (faults.go).
	faults faults
	// kept are the hosts' sockets on real loopback, by host id, kept
	// across kills and revives (keep.go).
	keptMu sync.Mutex
	kept   map[string]*keptSockets
	// orgs numbers the orgs for every host when there is no control
	// plane (orgnumbers.go).
	orgs *orgNumbers
	// toHosts is the control plane's transport to the hosts, unless
	// Config.Server brought its own client.
	toHosts *http.Transport

	closeOnce sync.Once
	closeErr  error
	// registryAddr is where the registry is served when the control plane
	// serves it.
	registryAddr string
	// bus carries the hosts' machine events to the control plane's NATS
	// once it runs (the hosts start first).
	bus lateBus
	// front serves the control plane's address (controlplane.go).
	front   *front
	planeMu sync.Mutex // kill and restart of the control plane
	// planeConns are the control plane's connections to the hosts
	// (controlplane.go).
	planeConns connSet
	planeDown  atomic.Bool
	admins     admins
	devCA      *edgecert.DevCA // of the HTTPS edges (tls.go)
	// hostClients are the clients HostClient hands out, by host, holding
	// the certificate of enroller, the plane that enrolled the hosts.
	hostClients hostClients
	enroller    atomic.Pointer[server.Server]
}

// lateBus publishes on the control plane's event bus once there is one;
// before that, events are dropped (nobody could be listening).
type lateBus struct{ p atomic.Pointer[server.Plane] }

func (b *lateBus) Publish(ctx context.Context, subject string, data []byte) error {
	if p := b.p.Load(); p != nil {
		return p.Catalog.Publish(ctx, subject, data)
	}
	return nil
}

// RegistryAddr is where the registry is served (host:port).
func (c *Cluster) RegistryAddr() string {
	if c.registryAddr != "" {
		return c.registryAddr
	}
	return strings.TrimPrefix(c.Hosts[0].APIURL, "http://")
}

// Host is one host of the dev cluster.
type Host struct {
	*host.Host
	ID      string
	Region  string
	APIURL  string
	DNSAddr string
	// EdgeAddr is where the region's edge proxy listens, on the first host
	// of each region ("" on the others).
	EdgeAddr string
	// EdgeTCPIP is the address the region's edge serves raw TCP services
	// at, on their public ports ("" for none).
	EdgeTCPIP string
	// EdgeTLSAddr is where the region's edge serves HTTPS ("" for none).
	EdgeTLSAddr string
	// identity is the host's, with a control plane.
	identity *pki.Slot
}

// backhaulPort is where every host's proxy takes the requests other hosts'
// edges send its machines, on the simulated network: a hop between regions
// costs their distance.
const backhaulPort = 4380

// Edges returns the address of each region's edge proxy, by region.
func (c *Cluster) Edges() map[string]string {
	out := map[string]string{}
	for _, h := range c.Hosts {
		if h.EdgeAddr != "" {
			out[h.Region] = h.EdgeAddr
		}
	}
	return out
}

// Start builds and starts every host and joins them into one cluster.
func Start(ctx context.Context, cfg Config) (*Cluster, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.gossipKey(); err != nil {
		return nil, err
	}
	// Probes must outlive the round trip to the farthest host, or every
	// probe across the world fails and only indirect probes keep the
	// cluster together.
	if cfg.Cluster.ProbeTimeout == 0 {
		var worst time.Duration
		for _, a := range cfg.Regions {
			for _, b := range cfg.Regions {
				ra, _ := geo.Lookup(a)
				rb, _ := geo.Lookup(b)
				worst = max(worst, geo.RTT(ra, rb))
			}
		}
		if worst > 100*time.Millisecond {
			cfg.Cluster.ProbeTimeout = worst*5/4 + 20*time.Millisecond
			cfg.Cluster.ProbeInterval = 2 * cfg.Cluster.ProbeTimeout
		}
	}
	regionOf := map[string]geo.Region{}
	nw := netsim.New(netsim.Config{
		Seed: cfg.Seed,
		Latency: func(from, to string) time.Duration {
			return geo.RTT(regionOf[from], regionOf[to]) / 2
		},
		Logger: cfg.Logger,
	})
	c := &Cluster{Net: nw, cfg: cfg}
	c.sim = newSimNet(c)
	if !cfg.ControlPlane {
		orgs, err := loadOrgNumbers(cfg.Dir)
		if err != nil {
			return nil, fmt.Errorf("devcluster: %w", err)
		}
		c.orgs = orgs
	}
	apiHost, apiPort, err := splitPort(cfg.APIAddr)
	if err != nil {
		return nil, fmt.Errorf("devcluster: api address: %w", err)
	}
	dnsHost, dnsPort, err := splitPort(cfg.DNSAddr)
	if err != nil {
		return nil, fmt.Errorf("devcluster: dns address: %w", err)
	}
	edgeHost, edgePort, err := splitPort(cfg.EdgeAddr)
	if err != nil {
		return nil, fmt.Errorf("devcluster: edge address: %w", err)
	}
	// Every host's region is known before any starts: the latency function
	// reads the map while hosts join, so it is never written after.
	type plan struct{ id, region, edge string }
	var hosts []plan
	if cfg.ControlPlane {
		regionOf[controlID], _ = geo.Lookup(cfg.Regions[0])
	}
	// Every region of the world has a client's point, from which the
	// global entry reaches the nearest edge.
	for _, r := range geo.All() {
		regionOf[clientMember(r.Code)] = r
	}
	for ri, code := range cfg.Regions {
		region, _ := geo.Lookup(code)
		for n := 1; n <= cfg.HostsPerRegion; n++ {
			id := fmt.Sprintf("%s-%d", code, n)
			regionOf[id] = region
			p := plan{id: id, region: code}
			if n == 1 {
				p.edge = nextAddr(edgeHost, edgePort, ri)
			}
			hosts = append(hosts, p)
		}
	}
	// The control plane listens before the hosts start: their drivers pull
	// from the registry it serves.
	var planeLn net.Listener
	if cfg.ControlPlane {
		if planeLn, err = net.Listen("tcp", cfg.ServerAddr); err != nil {
			nw.Close()
			return nil, fmt.Errorf("devcluster: listen on %s: %w", cfg.ServerAddr, err)
		}
		c.registryAddr = planeLn.Addr().String()
		// The control plane has its place in the network (the first
		// region) before the hosts pull from its registry.
		if _, err = nw.AddHost(controlID); err == nil {
			err = c.sim.expose(controlID, c.registryAddr, false)
		}
		if err != nil {
			planeLn.Close()
			c.Close()
			return nil, fmt.Errorf("devcluster: control plane: %w", err)
		}
	}
	var seed string
	for i, p := range hosts {
		h, err := c.startHost(ctx, p.id, p.region, i, nextAddr(apiHost, apiPort, i), nextAddr(dnsHost, dnsPort, i), p.edge, seed)
		if err != nil {
			if planeLn != nil {
				planeLn.Close()
			}
			c.abort()
			return nil, fmt.Errorf("devcluster: host %s: %w", p.id, err)
		}
		if seed == "" {
			seed = h.Cluster.GossipAddr()
		}
		c.Hosts = append(c.Hosts, h)
	}
	if err := c.startGlobalEntry(); err != nil {
		if planeLn != nil {
			planeLn.Close()
		}
		c.abort()
		return nil, fmt.Errorf("devcluster: global entry: %w", err)
	}
	if cfg.ControlPlane {
		if c.Plane, err = c.startPlane(ctx, newParked(planeLn.Addr()), seed); err != nil {
			planeLn.Close()
			c.abort()
			return nil, fmt.Errorf("devcluster: control plane: %w", err)
		}
		c.bus.p.Store(c.Plane)
		c.serveFront(planeLn)
		c.front.set(c.planeHandler(c.Plane), "")
		if err := c.EnrollWith(ctx, c.Plane.Server, c.Plane.URL()); err != nil {
			c.abort()
			return nil, fmt.Errorf("devcluster: %w", err)
		}
	}
	return c, nil
}

// startGlobalEntry puts every edge on the simulated network too and the
// clients' points in every region, and starts the global entry.
func (c *Cluster) startGlobalEntry() error {
	for _, h := range c.Hosts {
		if h.EdgeAddr != "" {
			c.sim.route(h.ID, edgeSimPort, h.EdgeAddr) // its entry listener (entry.go)
		}
	}
	for _, r := range geo.All() {
		if _, err := c.Net.AddHost(clientMember(r.Code)); err != nil {
			return err
		}
	}
	g, err := c.startGlobal(c.cfg.GlobalAddr, c.cfg.ClientRegion, c.Edges())
	if err != nil {
		return err
	}
	c.global, c.GlobalAddr = g, g.ln.Addr().String()
	return nil
}

// controlID names the control plane's member of the cluster.
const controlID = "control"

func (c *Cluster) startPlane(ctx context.Context, ln net.Listener, seed string) (*server.Plane, error) {
	tr, err := c.Net.Transport(controlID, 7946)
	if err != nil {
		ln.Close()
		return nil, err
	}
	mc := c.cfg.Cluster
	mc.HostID, mc.Region, mc.Transport = controlID, c.cfg.Regions[0], tr
	sc := c.cfg.Server
	sc.AgentToken, sc.OnRevoke = c.cfg.Token, c.admins.forget
	sc.Edges, sc.GlobalEntry = c.Edges(), c.GlobalAddr
	if sc.EdgeDomain == "" {
		sc.EdgeDomain = cmp.Or(c.cfg.EdgeDomain, proxy.DefaultDomain)
	}
	if sc.HTTPClient == nil {
		// Calls to hosts cross the simulated network from the control
		// plane's region.
		c.toHosts = &http.Transport{
			DialContext:         c.planeConns.dialer(c.sim.dialerFrom(controlID)),
			MaxIdleConnsPerHost: 32, IdleConnTimeout: 90 * time.Second,
		}
		sc.HTTPClient = &http.Client{Transport: c.toHosts}
	}
	p, err := server.StartPlane(ctx, server.PlaneConfig{
		DataDir: filepath.Join(c.cfg.Dir, controlID), Listener: ln,
		Cluster: mc, Join: []string{seed}, Server: sc,
		// Served by the front (planeHandler); the plane pins creates'
		// images to it.
		Registry: c.cfg.Registry,
		Logger:   c.cfg.Logger.With("host", controlID),
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	return p, nil
}

func (c *Cluster) startHost(ctx context.Context, id, region string, i int, apiAddr, dnsAddr, edgeAddr, seed string) (*Host, error) {
	if _, ok := c.Net.HostIP(id); !ok { // a revived host has its place (chaos.go)
		if _, err := c.Net.AddHost(id); err != nil {
			return nil, err
		}
	}
	tr, err := c.Net.Transport(id, 7946)
	if err != nil {
		return nil, err
	}
	h, err := c.startHostOn(ctx, tr, id, region, i, apiAddr, dnsAddr, edgeAddr, seed)
	if err != nil {
		// Its gossip port too: a revive that failed leaves nothing bound,
		// and the next one binds again. (A host that started owns it.)
		tr.Shutdown()
		return nil, err
	}
	return h, nil
}

func (c *Cluster) startHostOn(ctx context.Context, tr *netsim.Transport, id, region string, i int, apiAddr, dnsAddr, edgeAddr, seed string) (*Host, error) {
	ks, err := c.keep(id, apiAddr, dnsAddr, edgeAddr)
	if err != nil {
		return nil, err
	}
	ln, pc, dl := ks.api.lease(), ks.dnsUDP.lease(), ks.dnsTCP.lease()
	if err := c.sim.exposeOnce(id, ln.Addr().String(), c.cfg.ControlPlane); err != nil {
		ln.Close()
		pc.Close()
		dl.Close()
		return nil, err
	}
	// The host's proxy: its backhaul on the simulated network, and the
	// region's edge on real loopback for clients.
	backhaul, err := c.Net.Listen(id, backhaulPort)
	if err != nil {
		ln.Close()
		pc.Close()
		dl.Close()
		return nil, err
	}
	var edge net.Listener
	if edgeAddr != "" {
		if edge, err = c.withEntry(id, ks.edge.lease()); err != nil {
			ln.Close()
			pc.Close()
			dl.Close()
			backhaul.Close()
			return nil, err
		}
	}
	var edgeTLS *proxy.TLSConfig
	if edge != nil && c.cfg.EdgeTLSAddr != "" {
		if edgeTLS, err = c.edgeTLS(region); err != nil {
			ln.Close()
			pc.Close()
			dl.Close()
			backhaul.Close()
			edge.Close()
			return nil, err
		}
	}
	closeAll := func() {
		ln.Close()
		pc.Close()
		dl.Close()
		backhaul.Close()
		if edge != nil {
			edge.Close()
		}
		if edgeTLS != nil {
			edgeTLS.Listener.Close()
		}
	}
	regAddr := c.registryAddr
	if regAddr == "" {
		regAddr = ln.Addr().String()
		if i > 0 {
			regAddr = strings.TrimPrefix(c.Hosts[0].APIURL, "http://")
		}
	}
	var slot *pki.Slot
	if c.cfg.ControlPlane || c.cfg.Identities {
		// Served over mutual TLS once enrolled (at once when the data dir
		// holds an identity from before).
		hid, err := host.LoadIdentity(filepath.Join(c.cfg.Dir, id))
		if err != nil {
			closeAll()
			return nil, err
		}
		slot = pki.NewSlot(hid)
	}
	var d driver.Driver
	if c.cfg.NewHostDriver != nil {
		d, err = c.cfg.NewHostDriver(HostSpec{ID: id, Region: region, Index: i, RegistryAddr: regAddr, Dial: c.sim.dialerFrom(id), Identity: slot})
	} else {
		d, err = c.cfg.NewDriver(id, i, regAddr)
	}
	if err != nil {
		closeAll()
		return nil, err
	}
	cc := c.cfg.Cluster
	cc.HostID, cc.Transport = id, tr
	hc := host.Config{
		DataDir: filepath.Join(c.cfg.Dir, id), Region: region, Listener: ln, Token: c.cfg.Token,
		Driver: d, Logger: c.cfg.Logger.With("host", id), Cluster: cc,
		DNSPacketConn: pc, DNSListener: dl,
		Proxy: host.ProxyConfig{Edge: edge, Backhaul: backhaul, Dial: c.Net.DialerFrom(id), Domain: c.cfg.EdgeDomain,
			AutostopInterval: c.cfg.AutostopInterval, TLS: edgeTLS},
	}
	tcpIP := ""
	if edge != nil && !c.cfg.EdgeTCPPorts.Empty() {
		tcpIP = edgeTCPIP(edge.Addr(), slices.Index(c.cfg.Regions, region))
	}
	if tcpIP != "" {
		hc.Proxy.TCPPorts = c.cfg.EdgeTCPPorts
		hc.Proxy.ListenTCP = func(port int) (net.Listener, error) {
			return net.Listen("tcp", net.JoinHostPort(tcpIP, strconv.Itoa(port)))
		}
	}
	if c.cfg.ControlPlane {
		hc.Events = &c.bus
	} else {
		hc.OrgNumbers = c.orgs
	}
	if slot != nil {
		hc.Identity = slot
		// Renewed with the control plane of the moment.
		hc.Renew = host.Renewal{PlaneURL: func() string {
			if p := c.LivePlane(); p != nil && !c.PlaneDown() {
				return p.URL()
			}
			return ""
		}}
	}
	if seed != "" {
		hc.Join = []string{seed}
	}
	if i == 0 && !c.cfg.ControlPlane {
		hc.Registry = c.cfg.Registry
	}
	if err := os.MkdirAll(hc.DataDir, 0o755); err != nil {
		closeAll()
		return nil, err
	}
	if hc.Mesh, err = c.newMesh(id, i, hc.DataDir); err != nil {
		closeAll()
		return nil, err
	}
	h, err := host.New(hc)
	if err != nil {
		if hc.Mesh != nil {
			hc.Mesh.Close()
		}
		closeAll()
		return nil, err
	}
	if err := h.Start(ctx); err != nil {
		h.Close()
		return nil, err
	}
	out := &Host{Host: h, ID: id, Region: region, APIURL: "http://" + ln.Addr().String(), DNSAddr: pc.LocalAddr().String(), identity: hc.Identity}
	if hc.Identity != nil {
		out.APIURL = "https://" + ln.Addr().String()
	}
	if edge != nil {
		out.EdgeAddr = edge.Addr().String()
	}
	out.EdgeTCPIP = tcpIP
	if edgeTLS != nil {
		out.EdgeTLSAddr = edgeTLS.Listener.Addr().String()
	}
	return out, nil
}

// edgeTCPIP is the address the edge of the region at index ri serves raw
// TCP ports at: the edge's own IP for the first region; for the others,
// when that is an IPv4 loopback address, the ri-th one after it (all of
// 127.0.0.0/8 is loopback), else none.
func edgeTCPIP(edge net.Addr, ri int) string {
	ta, ok := edge.(*net.TCPAddr)
	if !ok || ri < 0 {
		return ""
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return ""
	}
	ip = ip.Unmap()
	if ri == 0 {
		return ip.String()
	}
	if !ip.Is4() || !ip.IsLoopback() || int(ip.As4()[3])+ri > 254 {
		return ""
	}
	b := ip.As4()
	b[3] += byte(ri)
	return netip.AddrFrom4(b).String()
}

// WaitConverged waits until every host (and the control plane) sees every
// other one alive, and holds every host's facts.
func (c *Cluster) WaitConverged(ctx context.Context) error {
	members := make([]*cluster.Cluster, 0, len(c.Hosts)+1)
	for _, h := range c.Hosts {
		members = append(members, h.Cluster)
	}
	if c.Plane != nil && !c.PlaneDown() {
		members = append(members, c.Plane.Cluster)
	}
	for {
		ok := true
		for _, m := range members {
			alive := 0
			for _, o := range m.Snapshot().Hosts() {
				if o.Status == cluster.StatusAlive {
					alive++
				}
			}
			if alive != len(members) {
				ok = false
				break
			}
			// Every host's facts too: with signed gossip a member takes
			// them only once it holds the host's certificate.
			for _, h := range c.Hosts {
				if o := m.Snapshot().Host(h.ID); o == nil || o.Version == 0 {
					ok = false
				}
			}
			if !ok {
				break
			}
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("devcluster: hosts did not converge: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// StopMachines stops every machine on every live host.
func (c *Cluster) StopMachines(ctx context.Context) {
	var wg sync.WaitGroup
	for _, h := range c.Hosts {
		if c.Killed(h.ID) { // its agent is closed, its machines' processes gone
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.StopMachines(ctx)
		}()
	}
	wg.Wait()
}

// DestroyMachines destroys every machine on every live host (for a cluster
// whose state is temporary; Shutdown revives killed hosts first).
func (c *Cluster) DestroyMachines(ctx context.Context) {
	var wg sync.WaitGroup
	for _, h := range c.Hosts {
		if c.Killed(h.ID) {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			h.DestroyMachines(ctx)
		}()
	}
	wg.Wait()
}

// abort undoes a start that failed once hosts ran: it closes them and
// removes what their drivers made on the machine (bridges, cgroups, spare
// inits). A host that adopted machines from its data dir keeps them, and
// with them its bridge and cgroups (Teardown refuses), for the next start.
func (c *Cluster) abort() {
	c.Close()
	c.Teardown()
}

// Teardown removes what the hosts' drivers keep for all their machines;
// call it after Close, once every machine is destroyed.
func (c *Cluster) Teardown() error {
	var errs []error
	for _, h := range c.Hosts {
		errs = append(errs, h.Teardown())
	}
	return errors.Join(errs...)
}

// Close stops every host (machines keep running unless StopMachines ran)
// and the simulated network. Closing twice is harmless.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() { c.closeErr = c.close() })
	return c.closeErr
}

func (c *Cluster) close() error {
	var errs []error
	c.stopStalls()
	if c.global != nil {
		errs = append(errs, c.global.close())
	}
	if c.front != nil {
		errs = append(errs, c.front.close())
	}
	if c.Plane != nil {
		c.bus.p.Store(nil)
		errs = append(errs, c.Plane.Close())
	}
	for i := len(c.Hosts) - 1; i >= 0; i-- {
		if !c.Killed(c.Hosts[i].ID) { // a killed host closes itself
			errs = append(errs, c.Hosts[i].Close())
		}
	}
	c.faults.wg.Wait()
	c.closeKept()
	c.hostClients.close()
	c.sim.close()
	errs = append(errs, c.Net.Close())
	return errors.Join(errs...)
}

// Shutdown stops the cluster in the order that leaves nothing running and
// creates nothing once it began: the control plane first (its API, the
// reconciler and placement; then every call it had made to a host is
// waited for, and no new one gets through), then every machine — stopped,
// or with destroy destroyed — and then the hosts (Close). With destroy,
// Teardown follows, so nothing of the cluster outlives it.
func (c *Cluster) Shutdown(ctx context.Context, destroy bool) error {
	var errs []error
	if c.Plane != nil {
		// In-flight API calls are answered first (up to 5 s), as the
		// plane's own server would drain them; then no new one comes in.
		if c.front != nil {
			errs = append(errs, c.front.close())
		}
		c.bus.p.Store(nil)
		errs = append(errs, c.Plane.Close())
		if c.toHosts != nil {
			c.toHosts.CloseIdleConnections()
		}
		errs = append(errs, c.sim.shutAndWait(ctx))
	}
	if destroy {
		errs = append(errs, c.reviveToDestroy(ctx))
		c.DestroyMachines(ctx)
	} else {
		c.StopMachines(ctx)
	}
	errs = append(errs, c.Close())
	if destroy {
		errs = append(errs, c.Teardown())
	}
	return errors.Join(errs...)
}

func splitPort(addr string) (string, int, error) {
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	return h, port, err
}

// nextAddr is the i-th address after host:port, or a random port when port
// is 0.
func nextAddr(h string, port, i int) string {
	if port == 0 {
		return net.JoinHostPort(h, "0")
	}
	return net.JoinHostPort(h, strconv.Itoa(port+i))
}

// listenDNS opens UDP and TCP on the same address (with port 0, trying
// ports below the ephemeral range, then random ones, until both are free).
func listenDNS(addr string) (net.PacketConn, net.Listener, error) {
	host, ports, err := portCandidates(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("dns: %w", err)
	}
	if ports[len(ports)-1] == 0 {
		for range 19 { // the kernel's picks, each tried for TCP too
			ports = append(ports, 0)
		}
	}
	var last error
	for _, port := range ports {
		at := net.JoinHostPort(host, strconv.Itoa(port))
		pc, err := net.ListenPacket("udp", at)
		if err != nil {
			last = err
			continue
		}
		ln, err := net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			return pc, ln, nil
		}
		pc.Close()
		if port != 0 && errors.Is(err, syscall.EADDRINUSE) {
			err = fmt.Errorf("%w (%s)", err, portHolder(port))
		}
		last = err
	}
	return nil, nil, fmt.Errorf("dns: listen on %s for both UDP and TCP: %w", addr, last)
}
