package cli

import (
	"cmp"
	"fmt"
	"io"
	"net"
	"os"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/pki"
	"github.com/flamehq/flame/internal/proxy"
)

type agentFlags struct {
	apiAddr, dataDir, tokenFile, region, logLevel, driver, registry string
	controlPlane, joinTokenFile, caFile                             string
	hostID, dnsAddr, natsURL                                        string
	gossip                                                          gossipFlags // gossipaddr.go
	natsCreds, natsCA                                               string
	edgeAddr, backhaulAddr, edgeDomain, edgeTCPPorts                string
	join                                                            []string
	tls                                                             edgeTLSFlags // edgetls.go
	allowHostExec                                                   bool
	meshAddr                                                        string // agentmesh.go
}

func newAgentCmd() *cobra.Command {
	var f agentFlags
	c := &cobra.Command{
		Use:   "agent",
		Short: "Run a host agent: it owns this host's machines and serves their Machines API",
		Long: `Run a host agent. It records every machine's lifecycle in <data-dir>/agent.db
before acting on it; stopping or killing the agent leaves workloads running, and
an agent started again on the same data dir adopts them and finishes any
operation that was cut short.

With --host-id it joins other hosts (--join) into a cluster: every host's
machines and health reach every other host, and --dns-addr serves the
.internal names of the whole cluster. Gossip binds to --gossip-addr (default:
--api-addr's host, port 7946), never every interface unless
--gossip-any-interface. An enrolled host gossips encrypted with the keyring
the control plane gave it and signs its records with its key; without a
control plane gossip is in clear.

With a control plane (flame server), a host enrolls once: --join-token-file
(or $FLAME_JOIN_TOKEN) holds a one-time token an admin minted (POST
/v1/hosts/join-tokens), --control-plane the server's API. The host makes its
key in <data-dir>/identity (never sent anywhere) and gets a certificate naming
--host-id; from then on its API serves mutual TLS at --api-addr, the one
address the control plane calls it at, and answers only the control plane.
A later start finds the identity and needs no token. The enrollment checks the
control plane's API certificate against --ca-file (PEM: the cluster's CA, or
whatever signed that certificate) when given, else the system's roots. The host
renews its certificate two thirds into its life through the control plane it
enrolled with. Without a control plane, the API takes the bearer token in
--token-file (or $FLAME_AGENT_TOKEN).

In a cluster every host runs a proxy: other hosts' edges deliver requests for
its machines to --backhaul-addr, over mutual TLS between the hosts'
certificates (or, without a control plane, with the token of --token-file,
which every host then shares), so it must be an address the other hosts reach.
An enrolled host pulls images from --registry with its certificate. With --edge-addr the
host is an edge too: it takes clients' requests for <app>.<edge-domain> and
sends each to the best machine of the app, here or on another host, and serves
the raw TCP services (ports with handlers none or proxy_proto) whose public
port is in --edge-tcp-ports, each on its own port at the edge's address.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runAgent(c, f) },
	}
	fs := c.Flags()
	fs.StringVar(&f.apiAddr, "api-addr", "127.0.0.1:4281", "address of the Machines API")
	fs.StringVar(&f.dataDir, "data-dir", "", "directory for the agent's state (required)")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the bearer token the API requires, without a control plane (or $FLAME_AGENT_TOKEN)")
	fs.StringVar(&f.joinTokenFile, "join-token-file", "", "file holding a one-time join token, to enroll with the control plane (or $FLAME_JOIN_TOKEN)")
	fs.StringVar(&f.controlPlane, "control-plane", "", "the control plane's API (https://host:port) to enroll with")
	fs.StringVar(&f.caFile, "ca-file", "", "PEM certificates the control plane's API certificate must chain to (default: the system's roots)")
	fs.StringVar(&f.region, "region", "ams", "region of this host")
	fs.StringVar(&f.driver, "driver", host.DriverAuto, "how machines run: sandbox (rootless when not root), exec (host processes: needs --allow-host-exec) or auto (as root the sandbox or an error; else the rootless sandbox where the kernel allows it, else exec, with --allow-host-exec)")
	fs.BoolVar(&f.allowHostExec, "allow-host-exec", false, "allow the exec driver: machines run as plain host processes and \"exec:\" images run host programs, so any token that may create a machine runs commands on this host")
	fs.StringVar(&f.registry, "registry", "", "registry (host:port) for image names without one")
	fs.StringVar(&f.hostID, "host-id", "", "this host's name in the cluster (default: none, no cluster)")
	addGossipFlags(fs, &f.gossip, "this host")
	fs.StringSliceVar(&f.join, "join", nil, "gossip addresses of hosts to join (repeatable)")
	fs.StringVar(&f.dnsAddr, "dns-addr", "", "address for .internal DNS over UDP and TCP (needs --host-id)")
	fs.StringVar(&f.edgeAddr, "edge-addr", "", "address of the public edge proxy (HTTP; needs --host-id; default: no edge)")
	fs.StringVar(&f.edgeDomain, "edge-domain", "localhost", "apps are served at <app>.<edge-domain>")
	fs.StringVar(&f.edgeTCPPorts, "edge-tcp-ports", defaultEdgeTCPPorts, "public ports the edge may serve raw TCP services on (handlers none or proxy_proto), lo-hi; \"\" for none")
	fs.StringVar(&f.backhaulAddr, "backhaul-addr", "127.0.0.1:0", "where other hosts' edges reach this host's machines (with --host-id)")
	fs.StringVar(&f.natsURL, "nats-url", "", "the control plane's NATS (flame server --nats-addr): machine events are published there")
	fs.StringVar(&f.natsCreds, "nats-creds", "", "file of the credential on --nats-url (an nkey seed or a .creds file); default: the one enrollment gave, in <data-dir>/identity")
	fs.StringVar(&f.natsCA, "nats-ca", "", "PEM file of the CA --nats-url's TLS certificate is checked against (with --nats-creds; default: the one enrollment gave)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	addEdgeTLSFlags(fs, &f.tls)
	addMeshFlag(fs, &f)
	return c
}

func runAgent(c *cobra.Command, f agentFlags) error {
	switch {
	case f.dataDir == "":
		return usageError{fmt.Errorf("--data-dir is required")}
	case f.dnsAddr != "" && f.hostID == "":
		return usageError{fmt.Errorf("--dns-addr needs --host-id (DNS answers from the cluster)")}
	case f.edgeAddr != "" && f.hostID == "":
		return usageError{fmt.Errorf("--edge-addr needs --host-id (the edge routes by the cluster)")}
	}
	if err := f.tls.check(f); err != nil {
		return usageError{err}
	}
	if _, err := proxy.ParsePortRange(f.edgeTCPPorts); err != nil {
		return usageError{fmt.Errorf("--edge-tcp-ports: %w", err)}
	}
	log, err := newLogger(c.ErrOrStderr(), f.logLevel)
	if err != nil {
		return err
	}
	cred, err := agentCredentials(f)
	if err != nil {
		return err
	}
	if err := privateDir(f.dataDir); err != nil {
		return err
	}
	// Listen first: a driver (a sandbox's bridge, cgroups and spare init)
	// is only made for an agent that can serve.
	ln, err := net.Listen("tcp", f.apiAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", f.apiAddr, err)
	}
	planeClient, err := planeHTTPClient(f.caFile)
	if err != nil {
		ln.Close()
		return err
	}
	if cred.join != "" {
		id, err := host.Enroll(c.Context(), host.Enrollment{DataDir: f.dataDir, PlaneURL: f.controlPlane, JoinToken: cred.join,
			HostID: f.hostID, Region: f.region, APIAddr: ln.Addr().String(), HTTPClient: planeClient})
		if err != nil {
			ln.Close()
			return err
		}
		cred.identity = id
		fmt.Fprintf(c.ErrOrStderr(), "flame agent: enrolled as %s (identity in %s)\n", f.hostID, host.IdentityDir(f.dataDir))
	}
	network, hostNumber, err := agentPlace(f.dataDir)
	if err != nil {
		ln.Close()
		return err
	}
	var slot *pki.Slot
	dc := host.DriverConfig{Kind: f.driver, DataDir: f.dataDir, Registry: f.registry, RegistryToken: cred.token, AllowHostExec: f.allowHostExec, Logger: log,
		Network: network, Host: hostNumber}
	if cred.identity != nil {
		slot = pki.NewSlot(cred.identity)
		dc.RegistryCredential = host.RegistryCredential(slot)
	}
	d, kind, err := host.NewDriver(dc)
	if err != nil {
		ln.Close()
		return err
	}
	if kind == host.DriverExec {
		fmt.Fprintln(c.ErrOrStderr(), "flame agent: "+host.HostExecWarning+".")
	}
	if kind == host.DriverSandbox && os.Geteuid() != 0 {
		fmt.Fprintln(c.ErrOrStderr(), "flame agent: "+host.RootlessNotice+".")
	}
	closeDriver := func() {
		if c, ok := d.(io.Closer); ok {
			c.Close()
		}
	}
	hc := host.Config{DataDir: f.dataDir, Region: f.region, Listener: ln, Token: cred.token, Driver: d, Logger: log, Join: f.join}
	if slot != nil {
		hc.Identity = slot
		plane := cmp.Or(f.controlPlane, host.EnrolledWith(f.dataDir))
		hc.Renew = host.Renewal{PlaneURL: func() string { return plane }, HTTPClient: planeClient}
	}
	var bus *catalog.NATS
	if f.natsURL != "" {
		cc, err := agentCatalog(f, cred)
		if err != nil {
			ln.Close()
			closeDriver()
			return err
		}
		cc.Logger, cc.Buckets = log, f.tls.buckets()
		bus, err = catalog.Open(c.Context(), cc)
		if err != nil {
			ln.Close()
			closeDriver()
			return fmt.Errorf("event bus: %w", err)
		}
		defer bus.Close()
		hc.Events = bus
	}
	if f.hostID != "" {
		gh, port, err := f.gossip.bind(f.apiAddr)
		if err != nil {
			ln.Close()
			closeDriver()
			return err
		}
		hc.Cluster = cluster.Config{HostID: f.hostID, BindAddr: gh, BindPort: port, BindAny: f.gossip.any}
		if hc.Mesh, err = agentMesh(f, kind, network, hostNumber); err != nil {
			ln.Close()
			closeDriver()
			return fmt.Errorf("private network: %w", err)
		}
		if m := hc.Mesh; m != nil {
			cd := closeDriver
			closeDriver = func() { m.Close(); cd() }
		}
		if f.dnsAddr != "" {
			if hc.DNSPacketConn, err = net.ListenPacket("udp", f.dnsAddr); err == nil {
				hc.DNSListener, err = net.Listen("tcp", f.dnsAddr)
			}
			if err != nil {
				ln.Close()
				closeDriver()
				if hc.DNSPacketConn != nil {
					hc.DNSPacketConn.Close()
				}
				return fmt.Errorf("dns: %w", err)
			}
		}
		if err := listenProxy(&hc, f); err != nil {
			ln.Close()
			closeDriver()
			closeDNS(hc)
			return err
		}
		closeTLS, err := setupEdgeTLS(&hc, f, bus, log)
		if err != nil {
			ln.Close()
			closeDriver()
			closeDNS(hc)
			closeProxy(hc)
			return err
		}
		defer closeTLS()
	}
	h, err := host.New(hc)
	if err != nil {
		ln.Close()
		closeDriver()
		closeDNS(hc)
		closeProxy(hc)
		return err
	}
	if err := h.Start(c.Context()); err != nil {
		h.Close()
		return err
	}
	if cred.identity != nil {
		fmt.Fprintf(c.OutOrStdout(), "flame agent: region %s, %s driver, machines API on https://%s (mutual TLS: the control plane only)\n", f.region, kind, h.Addr())
	} else {
		fmt.Fprintf(c.OutOrStdout(), "flame agent: region %s, %s driver, machines API on http://%s\n", f.region, kind, h.Addr())
	}
	if h.Proxy != nil {
		if a := h.Proxy.EdgeAddr(); a != "" {
			fmt.Fprintf(c.OutOrStdout(), "flame agent: edge proxy on http://%s (apps at <app>.%s), backhaul on %s\n", a, f.edgeDomain, h.Proxy.BackhaulAddr())
			if a := h.Proxy.TLSAddr(); a != "" {
				fmt.Fprintf(c.OutOrStdout(), "flame agent: edge HTTPS on %s\n", a)
			}
			if f.edgeTCPPorts != "" {
				fmt.Fprintf(c.OutOrStdout(), "flame agent: raw TCP services on their public ports in %s\n", f.edgeTCPPorts)
			}
		} else {
			fmt.Fprintf(c.OutOrStdout(), "flame agent: proxy backhaul on %s\n", h.Proxy.BackhaulAddr())
		}
	}
	<-c.Context().Done()
	return h.Close()
}

// agentCreds are what a host authenticates with: an enrolled identity, a
// join token to enroll with, or a token without a control plane.
type agentCreds struct {
	identity *pki.HostIdentity
	join     string
	token    string
}

// agentCredentials finds the host's credentials before anything starts:
// an identity in the data dir wins; else a join token enrolls (later, once
// the API listens); else the token from --token-file or the environment.
func agentCredentials(f agentFlags) (agentCreds, error) {
	var cr agentCreds
	id, err := host.LoadIdentity(f.dataDir)
	if err != nil {
		return cr, fmt.Errorf("host identity: %w", err)
	}
	if id != nil {
		if f.hostID != "" && f.hostID != id.HostID {
			return cr, usageError{fmt.Errorf("--host-id %s: this data dir is enrolled as %s", f.hostID, id.HostID)}
		}
		return agentCreds{identity: id}, nil
	}
	if cr.join, err = readSecret("join-token-file", f.joinTokenFile, "FLAME_JOIN_TOKEN"); err != nil {
		return cr, err
	}
	if cr.join != "" {
		switch {
		case f.hostID == "":
			return cr, usageError{fmt.Errorf("enrolling needs --host-id")}
		case f.controlPlane == "":
			return cr, usageError{fmt.Errorf("enrolling needs --control-plane")}
		}
		return cr, nil
	}
	if cr.token, err = readSecret("token-file", f.tokenFile, "FLAME_AGENT_TOKEN"); err != nil {
		return cr, err
	}
	if cr.token == "" {
		return cr, usageError{fmt.Errorf("no credentials: enroll with --join-token-file (or $FLAME_JOIN_TOKEN), or give a token with --token-file (or $FLAME_AGENT_TOKEN)")}
	}
	return cr, nil
}

// listenProxy opens the proxy's listeners of a host in a cluster: the
// backhaul always, the edge when asked for.
func listenProxy(hc *host.Config, f agentFlags) error {
	bh, err := net.Listen("tcp", f.backhaulAddr)
	if err != nil {
		return fmt.Errorf("backhaul: listen on %s: %w", f.backhaulAddr, err)
	}
	hc.Proxy = host.ProxyConfig{Backhaul: bh, Domain: f.edgeDomain}
	if f.edgeAddr != "" {
		if hc.Proxy.Edge, err = net.Listen("tcp", f.edgeAddr); err != nil {
			bh.Close()
			return fmt.Errorf("edge: listen on %s: %w", f.edgeAddr, err)
		}
		hc.Proxy.TCPPorts, _ = proxy.ParsePortRange(f.edgeTCPPorts) // checked by runAgent
	}
	return nil
}

// defaultEdgeTCPPorts are the public ports an edge serves raw TCP services
// on unless told otherwise.
const defaultEdgeTCPPorts = "10000-10999"

func closeDNS(hc host.Config) {
	if hc.DNSPacketConn != nil {
		hc.DNSPacketConn.Close()
	}
	if hc.DNSListener != nil {
		hc.DNSListener.Close()
	}
}

func closeProxy(hc host.Config) {
	if hc.Proxy.Backhaul != nil {
		hc.Proxy.Backhaul.Close()
	}
	if hc.Proxy.Edge != nil {
		hc.Proxy.Edge.Close()
	}
}

// privateDir makes dir, or makes an existing one, the invoking user's alone
// (0700): a data dir holds tokens, machine logs and state.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	return nil
}

// agentCatalog is how the agent reaches --nats-url: with --nats-creds (and
// --nats-ca) when given, else with the credential enrollment gave (a
// locked embedded catalog's), else without any. It binds the buckets the
// control plane made; it makes none.
func agentCatalog(f agentFlags, cred agentCreds) (catalog.Config, error) {
	cc := catalog.Config{URL: f.natsURL, Bind: true, User: f.hostID}
	if cred.identity != nil {
		cc.User = cred.identity.HostID
	}
	switch {
	case f.natsCreds != "":
		cc.Credentials = f.natsCreds
	case f.natsCA != "":
		return cc, usageError{fmt.Errorf("--nats-ca goes with --nats-creds")}
	case cred.identity != nil:
		seed, ca, ok, err := host.NATSCredential(f.dataDir)
		if err != nil {
			return cc, fmt.Errorf("nats credential: %w", err)
		}
		if ok {
			cc.Credentials, cc.CA, cc.TLSName = seed, ca, catalog.ServerTLSName
		}
	}
	if f.natsCA != "" {
		b, err := os.ReadFile(f.natsCA)
		if err != nil {
			return cc, fmt.Errorf("--nats-ca: %w", err)
		}
		cc.CA = b
	}
	return cc, nil
}
