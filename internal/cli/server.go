package cli

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/server"
)

type serverFlags struct {
	apiAddr, dataDir, region, logLevel, keyFile string
	hostID                                      string
	gossip                                      gossipFlags // gossipaddr.go
	join                                        []string
	natsURL, natsListen, natsName, natsCluster  string
	natsCreds, natsCA                           string
	natsRoutes                                  []string
	replicas                                    int
	tls                                         apiTLSFlags // apitls.go
}

func newServerCmd() *cobra.Command {
	var f serverFlags
	c := &cobra.Command{
		Use:   "server",
		Short: "Run the control plane: one Machines API for every app and machine of the cluster",
		Long: `Run the control plane. It serves Fly's Machines API for every app (apps,
machines, secrets, regions; groups of machines per region kept by a
reconciler), places machines on the hosts it learns of by joining their cluster
(--join), and forwards every machine call to the host that runs it.

Hosts enroll with a one-time join token an admin mints (POST
/v1/hosts/join-tokens) and get a certificate from the cluster's CA, made on the
first start and kept in the catalog sealed with the secrets key. The server
calls a host only at the address it enrolled with, over mutual TLS; an admin
revokes a host with POST /v1/hosts/{id}/revoke.

It serves the OCI registry the hosts pull from under /v2/ (start agents with
--registry <this address>). Its catalog is an embedded NATS JetStream server under <data-dir>/catalog; or,
with --nats-url, an existing NATS. Three servers form one replicated catalog
with --nats-name, --nats-cluster-addr, --nats-route (one per other server) and
--replicas 3.

The embedded NATS is locked with the secrets key: clients (--nats-addr) and
routes speak TLS with certificates of a CA derived from it, so servers without
the key cannot route; only the control plane and enrolled hosts connect, each
host with the nkey its enrollment gave it (its own events and logs, the edge's
certificate buckets, nothing else; refused once revoked). An external NATS
(--nats-url) takes the control plane's credential from --nats-creds (an nkey
seed or a .creds file) and its CA from --nats-ca; its operator gives each
host a credential for flame agent --nats-creds.

On its first start it creates an admin token, prints it once and writes it to
<data-dir>/admin-token (readable by its owner only).`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runServer(c, f) },
	}
	fs := c.Flags()
	fs.StringVar(&f.apiAddr, "api-addr", "127.0.0.1:4280", "address of the public Machines API")
	fs.StringVar(&f.dataDir, "data-dir", "", "directory for the catalog and the secrets key (required)")
	fs.StringVar(&f.region, "region", "ams", "region this server is in")
	fs.StringVar(&f.hostID, "host-id", "", "this server's name in the cluster (default: control-<hostname>)")
	addGossipFlags(fs, &f.gossip, "this server")
	fs.StringSliceVar(&f.join, "join", nil, "gossip addresses of hosts to join (repeatable)")
	fs.StringVar(&f.natsURL, "nats-url", "", "use this NATS instead of an embedded one")
	fs.StringVar(&f.natsCreds, "nats-creds", "", "with --nats-url: file of the control plane's credential there (an nkey seed or a .creds file; the user may do everything)")
	fs.StringVar(&f.natsCA, "nats-ca", "", "with --nats-url: PEM file of the CA its TLS certificate is checked against (default: the system's roots)")
	fs.StringVar(&f.natsListen, "nats-addr", "", "serve the embedded NATS to clients at this address (default: in-process only)")
	fs.StringVar(&f.natsName, "nats-name", "", "the embedded NATS server's name (required in a cluster)")
	fs.StringVar(&f.natsCluster, "nats-cluster-addr", "", "route address for a cluster of embedded NATS servers")
	fs.StringSliceVar(&f.natsRoutes, "nats-route", nil, "route URL of another server (nats-route://host:port, repeatable)")
	fs.IntVar(&f.replicas, "replicas", 1, "catalog replicas (3 in a three-server cluster)")
	fs.StringVar(&f.keyFile, "secret-key-file", "", "the 32-byte key that seals secrets, made on first use (default <data-dir>/secret.key; servers sharing a catalog need the same one)")
	fs.StringVar(&f.logLevel, "log-level", "info", "debug, info, warn or error")
	addAPITLSFlags(fs, &f.tls)
	return c
}

func runServer(c *cobra.Command, f serverFlags) error {
	switch {
	case f.dataDir == "":
		return usageError{fmt.Errorf("--data-dir is required")}
	}
	apiTLS, err := f.tls.config()
	if err != nil {
		return err
	}
	if _, ok := geo.Lookup(f.region); !ok {
		return usageError{fmt.Errorf("--region: unknown region %q", f.region)}
	}
	gh, port, err := f.gossip.bind(f.apiAddr)
	if err != nil {
		return err
	}
	if f.hostID == "" {
		hn, _ := os.Hostname()
		f.hostID = "control-" + hn
	}
	log, err := newLogger(c.ErrOrStderr(), f.logLevel)
	if err != nil {
		return err
	}
	cc := catalog.Config{URL: f.natsURL, ClientListen: f.natsListen, ServerName: f.natsName,
		ClusterListen: f.natsCluster, Routes: f.natsRoutes, Replicas: f.replicas, Credentials: f.natsCreds}
	if f.natsCA != "" {
		if cc.CA, err = os.ReadFile(f.natsCA); err != nil {
			return usageError{fmt.Errorf("--nats-ca: %w", err)}
		}
	}
	check := cc
	if check.URL == "" {
		check.DataDir = filepath.Join(f.dataDir, "catalog")
	}
	check.Buckets = server.Buckets()
	if err := check.Validate(); err != nil {
		return usageError{err}
	}
	ln, err := net.Listen("tcp", f.apiAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", f.apiAddr, err)
	}
	// The registry hosts pull from: each org's tokens reach its
	// repositories (<org>/<name>), read-only ones to pull (see
	// Server.RegistryScope).
	var plane atomic.Pointer[server.Plane]
	reg, err := registry.New(registry.Config{Dir: filepath.Join(f.dataDir, "registry"), Logger: log,
		Auth: func(ctx context.Context, token string) (registry.Scope, error) {
			if p := plane.Load(); p != nil {
				return p.RegistryScope(ctx, token)
			}
			return registry.Scope{}, errors.New("the control plane is starting")
		}})
	if err != nil {
		ln.Close()
		return err
	}
	fmt.Fprintf(c.ErrOrStderr(), "flame server: opening the catalog…\n")
	p, err := server.StartPlane(c.Context(), server.PlaneConfig{
		DataDir: f.dataDir, Listener: ln, Catalog: cc, Join: f.join, Logger: log, Registry: reg, SecretKeyFile: f.keyFile,
		Cluster: cluster.Config{HostID: f.hostID, Region: f.region, BindAddr: gh, BindPort: port, BindAny: f.gossip.any},
		TLS:     apiTLS,
	})
	if err != nil {
		ln.Close()
		return err
	}
	plane.Store(p)
	out := c.OutOrStdout()
	if p.AdminToken != "" {
		path := filepath.Join(f.dataDir, "admin-token")
		if err := atomicfile.Write(path, []byte(p.AdminToken+"\n"), f.dataDir); err == nil {
			os.Chmod(path, 0o600)
		} else {
			log.Warn("admin token not saved", "err", err)
		}
		fmt.Fprintf(out, "flame server: created the admin token (also in %s):\n  %s\n", path, p.AdminToken)
	}
	fmt.Fprintf(out, "flame server: region %s, Machines API on %s, catalog %s\n", f.region, p.URL(), catalogWhere(f, p))
	<-c.Context().Done()
	return p.Close()
}

func catalogWhere(f serverFlags, p *server.Plane) string {
	switch {
	case f.natsURL != "":
		return "at " + f.natsURL
	case p.Catalog.ClientURL() != "":
		return "embedded, clients at " + p.Catalog.ClientURL()
	}
	return "embedded"
}
