package cli

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
)

type agentFlags struct {
	apiAddr, dataDir, token, region, logLevel, driver, registry string
	hostID, gossipAddr, dnsAddr, natsURL                        string
	join                                                        []string
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

With --host-id and --gossip-addr it joins other hosts (--join) into a cluster:
every host's machines and health reach every other host, and --dns-addr serves
the .internal names of the whole cluster.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runAgent(c, f) },
	}
	fs := c.Flags()
	fs.StringVar(&f.apiAddr, "api-addr", "127.0.0.1:4281", "address of the Machines API")
	fs.StringVar(&f.dataDir, "data-dir", "", "directory for the agent's state (required)")
	fs.StringVar(&f.token, "token", "", "bearer token the API requires (required)")
	fs.StringVar(&f.region, "region", "ams", "region of this host")
	fs.StringVar(&f.driver, "driver", host.DriverAuto, "how machines run: auto (sandbox as root, else exec), sandbox or exec")
	fs.StringVar(&f.registry, "registry", "", "registry (host:port) for image names without one")
	fs.StringVar(&f.hostID, "host-id", "", "this host's name in the cluster (default: none, no cluster)")
	fs.StringVar(&f.gossipAddr, "gossip-addr", "0.0.0.0:7946", "address the cluster's gossip binds to")
	fs.StringSliceVar(&f.join, "join", nil, "gossip addresses of hosts to join (repeatable)")
	fs.StringVar(&f.dnsAddr, "dns-addr", "", "address for .internal DNS over UDP and TCP (needs --host-id)")
	fs.StringVar(&f.natsURL, "nats-url", "", "the control plane's NATS (flame server --nats-addr): machine events are published there")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	return c
}

func runAgent(c *cobra.Command, f agentFlags) error {
	switch {
	case f.dataDir == "":
		return usageError{fmt.Errorf("--data-dir is required")}
	case f.token == "":
		return usageError{fmt.Errorf("--token is required")}
	case f.dnsAddr != "" && f.hostID == "":
		return usageError{fmt.Errorf("--dns-addr needs --host-id (DNS answers from the cluster)")}
	}
	log, err := newLogger(c.ErrOrStderr(), f.logLevel)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(f.dataDir, 0o755); err != nil {
		return err
	}
	// Listen first: a driver (a sandbox's bridge, cgroups and spare init)
	// is only made for an agent that can serve.
	ln, err := net.Listen("tcp", f.apiAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", f.apiAddr, err)
	}
	d, kind, err := host.NewDriver(host.DriverConfig{Kind: f.driver, DataDir: f.dataDir, Registry: f.registry, RegistryToken: f.token, Logger: log})
	if err != nil {
		ln.Close()
		return err
	}
	closeDriver := func() {
		if c, ok := d.(io.Closer); ok {
			c.Close()
		}
	}
	hc := host.Config{DataDir: f.dataDir, Region: f.region, Listener: ln, Token: f.token, Driver: d, Logger: log, Join: f.join}
	if f.natsURL != "" {
		bus, err := catalog.Open(c.Context(), catalog.Config{URL: f.natsURL, Logger: log})
		if err != nil {
			ln.Close()
			closeDriver()
			return fmt.Errorf("event bus: %w", err)
		}
		defer bus.Close()
		hc.Events = bus
	}
	if f.hostID != "" {
		gh, gp, err := net.SplitHostPort(f.gossipAddr)
		if err != nil {
			ln.Close()
			closeDriver()
			return usageError{fmt.Errorf("--gossip-addr: %w", err)}
		}
		port, err := strconv.Atoi(gp)
		if err != nil {
			ln.Close()
			closeDriver()
			return usageError{fmt.Errorf("--gossip-addr: bad port %q", gp)}
		}
		hc.Cluster = cluster.Config{HostID: f.hostID, BindAddr: gh, BindPort: port}
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
	}
	h, err := host.New(hc)
	if err != nil {
		ln.Close()
		closeDriver()
		return err
	}
	if err := h.Start(c.Context()); err != nil {
		h.Close()
		return err
	}
	fmt.Fprintf(c.OutOrStdout(), "flame agent: region %s, %s driver, machines API on http://%s\n", f.region, kind, h.Addr())
	<-c.Context().Done()
	return h.Close()
}
