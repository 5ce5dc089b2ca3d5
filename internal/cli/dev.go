package cli

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/spf13/cobra"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/image/registry"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/proxy"
	"github.com/flamehq/flame/internal/server"
)

type devFlags struct {
	apiAddr, hostsAddr, dnsAddr, edgeAddr, dataDir, token, regions, logLevel, driver string
	edgeTCPPorts                                                                     string
	edgeTLSAddr                                                                      string
	globalAddr, clientRegion                                                         string
	hostsPerRegion                                                                   int
	noDemo, allowHostExec                                                            bool
}

func newDevCmd() *cobra.Command {
	var f devFlags
	c := &cobra.Command{
		Use:   "dev",
		Short: "Run the Flame platform on this machine, for development",
		Long: `Run the whole Flame platform on this machine: a control plane serving the
Machines API for every app (at --api-addr), and several hosts in several
regions (by default ams, iad and syd, two hosts each), joined into one cluster
over a simulated network with real-world distances between regions. Each host
serves the .internal DNS names of every machine in the cluster. Each region
has an edge proxy, and one global entry (--global-addr) hands each request
to the edge nearest to its client, as anycast would: the client is in
--client-region, or in the region a request's flame-client-region header
names, and the hop to its edge costs the distance from there.

It creates the org "personal" with a token, which it prints (with the admin
token; both are kept in the data dir and printed again on every start), and
deploys the demo app to every region unless the demo's group exists already.
With no flags it keeps its state in a temporary directory removed on exit.
The sandboxes' bridges, cgroups and private network are named after an
instance id kept in the data dir, so several flame devs can run side by side.
Ctrl-C stops the control plane, then every machine, and exits.`,
		Args: noArgs,
		RunE: func(c *cobra.Command, _ []string) error { return runDev(c, f) },
	}
	fs := c.Flags()
	fs.StringVar(&f.apiAddr, "api-addr", "127.0.0.1:4280", "the control plane's Machines API")
	fs.StringVar(&f.hostsAddr, "hosts-addr", "127.0.0.1:4281", "internal API of the first host; the others take the next ports")
	fs.StringVar(&f.dnsAddr, "dns-addr", "127.0.0.1:5300", ".internal DNS of the first host (UDP and TCP); the others take the next ports")
	fs.StringVar(&f.edgeAddr, "edge-addr", "127.0.0.1:4380", "edge proxy of the first region (http://<app>.localhost:<port>/); the other regions take the next ports")
	fs.StringVar(&f.edgeTCPPorts, "edge-tcp-ports", defaultEdgeTCPPorts, "public ports the edges serve raw TCP services on (handlers none or proxy_proto), lo-hi; the first region's edge at the --edge-addr IP, the next at the next loopback addresses; \"\" for none")
	fs.StringVar(&f.edgeTLSAddr, "edge-tls-addr", defaultEdgeTLSAddr, "HTTPS edge of the first region (https://<app>.localhost:<port>/, certificates of a local CA made in the data dir); the other regions take the next ports; \"\" for none")
	fs.StringVar(&f.globalAddr, "global-addr", defaultGlobalAddr, "global entry (http://<app>.localhost:<port>/): each request to the edge nearest to its client")
	fs.StringVar(&f.clientRegion, "client-region", "", "where the global entry's clients are, unless a request's flame-client-region header says (default: the first region)")
	fs.StringVar(&f.dataDir, "data-dir", "", "directory for state (default: a temporary directory removed on exit)")
	fs.StringVar(&f.token, "token", "", "token between the control plane and the hosts (default: a random one)")
	fs.BoolVar(&f.noDemo, "no-demo", false, "do not deploy the demo app")
	fs.StringVar(&f.regions, "regions", "ams,iad,syd", "comma-separated region codes")
	fs.IntVar(&f.hostsPerRegion, "hosts-per-region", 2, "hosts in each region")
	fs.StringVar(&f.driver, "driver", host.DriverAuto, "how machines run: auto (as root the sandbox or an error; else the rootless sandbox where the kernel allows it, else exec, where you are the only tenant), sandbox or exec (as root: needs --allow-host-exec)")
	fs.BoolVar(&f.allowHostExec, "allow-host-exec", false, "as root, allow the exec driver: machines run as plain host processes and \"exec:\" images run host programs (a user other than root is always allowed: the only tenant is that user)")
	fs.StringVar(&f.logLevel, "log-level", "warn", "debug, info, warn or error")
	return c
}

func runDev(c *cobra.Command, f devFlags) error {
	out := c.OutOrStdout()
	log, err := newLogger(c.ErrOrStderr(), f.logLevel)
	if err != nil {
		return err
	}
	if f.hostsPerRegion < 1 {
		return usageError{fmt.Errorf("--hosts-per-region must be at least 1")}
	}
	tcpPorts, err := proxy.ParsePortRange(f.edgeTCPPorts)
	if err != nil {
		return usageError{fmt.Errorf("--edge-tcp-ports: %w", err)}
	}
	if f.token == "" {
		f.token = randomToken()
	}
	temporary := f.dataDir == ""
	if temporary {
		dir, err := os.MkdirTemp("", "flame-dev-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		f.dataDir = dir
	} else if err := privateDir(f.dataDir); err != nil {
		return err
	}
	// The registry takes the hosts' token and, once the control plane is
	// up, any of its tokens, each reaching its org's repositories
	// (read-only ones to pull), so users push images with the token they
	// were given.
	// The control plane of the moment: `flame chaos` may kill and
	// restart it.
	var running atomic.Pointer[devcluster.Cluster]
	reg, err := registry.New(registry.Config{Dir: filepath.Join(f.dataDir, "registry"), Logger: log,
		Auth: func(ctx context.Context, token string) (registry.Scope, error) {
			if d := running.Load(); d != nil {
				if p := d.LivePlane(); p != nil {
					return p.RegistryScope(ctx, token)
				}
			}
			if token == f.token {
				return registry.Scope{Admin: true}, nil
			}
			return registry.Scope{}, registry.ErrUnauthorized
		}})
	if err != nil {
		return err
	}
	// The sandboxes' bridges, cgroups and private network are named after
	// this dev cluster's instance, kept in its data dir: a restart finds
	// its own, another `flame dev` never shares them.
	var instance string
	if f.driver != host.DriverExec {
		if instance, err = sandbox.LoadInstance(f.dataDir); err != nil {
			return err
		}
	}
	leftoversDone, err := devLeftovers(instance, f.dataDir, temporary, log)
	if err != nil {
		return err
	}
	defer leftoversDone()
	kinds := make([]string, 0)
	// Run by a user other than root, flame dev can only run machines as
	// that user's processes: nobody else is a tenant of it, so the exec
	// driver needs no opt-in there (it still says so).
	allowHostExec := f.allowHostExec || os.Geteuid() != 0
	cfg := devcluster.Config{
		Regions:        splitList(f.regions),
		HostsPerRegion: f.hostsPerRegion,
		Dir:            f.dataDir,
		Token:          f.token,
		APIAddr:        f.hostsAddr,
		ServerAddr:     f.apiAddr,
		ControlPlane:   true,
		Chaos:          true,
		DNSAddr:        f.dnsAddr,
		EdgeAddr:       f.edgeAddr,
		EdgeTCPPorts:   tcpPorts,
		EdgeTLSAddr:    f.edgeTLSAddr,
		GlobalAddr:     f.globalAddr,
		ClientRegion:   f.clientRegion,
		Logger:         log,
		Registry:       reg,
		NewHostDriver: func(h devcluster.HostSpec) (driver.Driver, error) {
			kind := f.driver
			if h.Index > 0 {
				kind = kinds[0] // decided (and warned about) once, for the first host
			}
			dc := host.DriverConfig{Kind: kind, DataDir: filepath.Join(f.dataDir, h.ID),
				Registry: h.RegistryAddr, RegistryToken: f.token, Dial: h.Dial,
				Instance: instance, Index: h.Index, AllowHostExec: allowHostExec, Logger: log.With("host", h.ID)}
			if h.Identity != nil { // enrolled hosts pull with their certificates
				dc.RegistryToken, dc.RegistryCredential = "", host.RegistryCredential(h.Identity)
			}
			d, kind, err := host.NewDriver(dc)
			if err != nil {
				return nil, err
			}
			if h.Index == 0 && kind == host.DriverExec {
				fmt.Fprintln(c.ErrOrStderr(), "flame dev: "+host.HostExecWarning+".")
			}
			if h.Index == 0 && kind == host.DriverSandbox && os.Geteuid() != 0 {
				fmt.Fprintln(c.ErrOrStderr(), "flame dev: "+host.RootlessNotice+".")
			}
			kinds = append(kinds, kind)
			return d, nil
		},
	}
	if cfg.Mesh, err = devMesh(instance, f.driver); err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return usageError{err}
	}
	fmt.Fprintf(c.ErrOrStderr(), "flame dev: starting a control plane and %d hosts in %s…\n", len(cfg.Regions)*f.hostsPerRegion, strings.Join(cfg.Regions, ", "))
	dev, err := devcluster.Start(c.Context(), cfg)
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(c.Context(), 30*time.Second)
	err = dev.WaitConverged(wctx)
	cancel()
	if err != nil {
		log.Warn("cluster not converged yet", "err", err)
	}
	running.Store(dev)
	ref, err := host.PushDemoImage(c.Context(), dev.RegistryAddr(), f.token, nil)
	if err != nil {
		log.Warn("demo image not pushed", "err", err)
	}
	tokens, err := devTokens(c.Context(), dev.Plane, f.dataDir)
	if err != nil {
		dev.Close()
		return err
	}
	if !f.noDemo {
		if err := deployDemo(c.Context(), dev, tokens.org, kinds[0], cfg.Regions); err != nil {
			log.Warn("demo app not deployed", "err", err)
		}
	}
	printDevBanner(out, dev, f, kinds[0], ref, tokens, instance)
	<-c.Context().Done()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The control plane stops first, so nothing is placed once the
	// machines are being stopped. Nothing outlives a temporary dev
	// cluster: no machine, mount, bridge or cgroup.
	if temporary {
		fmt.Fprintln(out, "\nflame dev: destroying machines…")
	} else {
		fmt.Fprintln(out, "\nflame dev: stopping machines…")
	}
	err = dev.Shutdown(ctx, temporary)
	fmt.Fprintln(out, "flame dev: stopped")
	return err
}

// devKeys are the tokens `flame dev` prints: the org personal's and the
// admin token.
type devKeys struct{ org, admin string }

// Token files in the data dir, readable by their owner only.
const (
	orgTokenFile   = "personal-token"
	adminTokenFile = "admin-token"
)

// devTokens returns the tokens of a dev cluster: on its first start it makes
// the org personal and a token for it, and keeps both tokens in the data
// dir; on later starts it gives the kept ones back (a kept org token the
// catalog no longer has is replaced).
func devTokens(ctx context.Context, p *server.Plane, dataDir string) (devKeys, error) {
	var k devKeys
	if p.AdminToken != "" {
		if err := writeSecretFile(filepath.Join(dataDir, adminTokenFile), p.AdminToken); err != nil {
			return k, fmt.Errorf("save admin token: %w", err)
		}
		k.admin = p.AdminToken
	} else if b, err := os.ReadFile(filepath.Join(dataDir, adminTokenFile)); err == nil {
		k.admin = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile(filepath.Join(dataDir, orgTokenFile)); err == nil {
		if t := strings.TrimSpace(string(b)); t != "" && p.MayPush(ctx, t) {
			k.org = t
			return k, nil
		}
	}
	tok, err := p.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		return k, fmt.Errorf("create org personal: %w", err)
	}
	if err := writeSecretFile(filepath.Join(dataDir, orgTokenFile), tok); err != nil {
		return k, fmt.Errorf("save token: %w", err)
	}
	k.org = tok
	return k, nil
}

// writeSecretFile writes s to path whole, readable by its owner only.
func writeSecretFile(path, s string) error {
	if err := atomicfile.Write(path, []byte(s+"\n"), filepath.Dir(path)); err != nil {
		return err
	}
	return os.Chmod(path, 0o600)
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func randomToken() string {
	var b [16]byte
	rand.Read(b[:])
	return "fdev_" + hex.EncodeToString(b[:])
}

// deployDemo creates the app "demo" in the org personal and declares one
// machine of the demo image per region; the control plane's reconciler
// places them. A demo group that exists already (a restart on the same
// data dir) is the user's: it is left as it is.
func deployDemo(ctx context.Context, dev *devcluster.Cluster, token, driverKind string, regions []string) error {
	cl := api.NewClient(dev.Plane.URL(), token)
	if _, err := cl.CreateApp(ctx, api.CreateAppInput{AppName: "demo", OrgSlug: "personal"}); err != nil && !errors.Is(err, api.ErrConflict) {
		return err
	}
	if _, err := cl.GetGroup(ctx, "demo", "app"); err == nil {
		return nil
	} else if !errors.Is(err, api.ErrNotFound) {
		return err
	}
	// Exec machines share the host's network: let each pick a free port.
	port := "8080"
	if driverKind == host.DriverExec {
		port = "0"
	}
	counts := map[string]int{}
	for _, r := range regions {
		counts[r] = 1
	}
	cfg := &api.MachineConfig{Image: host.DemoImage, Env: map[string]string{"PORT": port},
		Guest: &api.MachineGuest{CPUKind: api.CPUKindShared, CPUs: api.DefaultGuestCPUs, MemoryMB: api.DefaultGuestMemoryMB}}
	if port != "0" {
		// Served by the edges on port 80, once its check passes.
		cfg.Services = []api.MachineService{{
			Protocol: "tcp", InternalPort: 8080,
			Ports: []api.MachinePort{{Port: ptrTo(80), Handlers: []string{"http"}},
				{Port: ptrTo(443), Handlers: []string{"tls", "http"}}},
			Checks: []api.MachineServiceCheck{{Type: ptrTo("tcp")}},
		}}
	}
	_, err := cl.PutGroup(ctx, "demo", api.Group{Name: "app", Regions: counts, Config: cfg})
	return err
}

func printDevBanner(w io.Writer, dev *devcluster.Cluster, f devFlags, driverKind, demoRef string, tokens devKeys, instance string) {
	token := tokens.org
	first := dev.Hosts[0]
	url := dev.Plane.URL()
	fmt.Fprintf(w, "flame dev is running: a control plane and %d hosts, %s driver (state in %s)\n\n", len(dev.Hosts), driverKind, f.dataDir)
	fmt.Fprintf(w, "  Machines API  %s   (org \"personal\")\n", url)
	fmt.Fprintf(w, "  Token         %s\n", token)
	if tokens.admin != "" {
		fmt.Fprintf(w, "  Admin token   %s   (creates orgs and tokens; flame chaos reads it from $FLAME_ADMIN_TOKEN)\n", tokens.admin)
	}
	fmt.Fprintf(w, "  Registry      %s/v2/   (demo app: %s)\n", url, demoRef)
	if driverKind == host.DriverSandbox && os.Geteuid() == 0 {
		printSandboxNames(w, instance, len(dev.Hosts))
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "  %-8s %-6s %-28s %s\n", "HOST", "REGION", "INTERNAL API", ".internal DNS (udp+tcp)")
	for _, h := range dev.Hosts {
		fmt.Fprintf(w, "  %-8s %-6s %-28s %s\n", h.ID, h.Region, h.APIURL, h.DNSAddr)
	}
	fmt.Fprintln(w)
	for _, h := range dev.Hosts {
		if h.EdgeAddr != "" {
			fmt.Fprintf(w, "  Edge %-8s http://<app>.%s/   (on %s)\n", h.Region, edgeHost(h.EdgeAddr), h.ID)
		}
	}
	printHTTPSEdges(w, dev)
	for _, h := range dev.Hosts {
		if h.EdgeTCPIP != "" {
			fmt.Fprintf(w, "  TCP  %-8s %s:<port>, raw TCP services on their ports %s\n", h.Region, h.EdgeTCPIP, f.edgeTCPPorts)
		}
	}
	client := f.clientRegion
	if client == "" {
		client = first.Region
	}
	fmt.Fprintf(w, "  Global        http://<app>.%s/   (client in %s)\n", edgeHost(dev.GlobalAddr), client)
	demoURL := "http://demo." + edgeHost(first.EdgeAddr) + "/"
	if driverKind == host.DriverExec {
		demoURL += "   (exec machines share this host's ports: the demo app is not behind the edges)"
	}
	dnsHost, dnsPort, _ := strings.Cut(first.DNSAddr, ":")
	qtype := "AAAA" // sandboxes have 6PN addresses; exec and rootless machines have loopback ones
	if driverKind == host.DriverExec || os.Geteuid() != 0 {
		qtype = "A"
	}
	fmt.Fprintf(w, `
The demo app runs one machine in each region. Try it:

  export FLY_API_TOKEN=%s FLY_FLAPS_BASE_URL=%s
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" $FLY_FLAPS_BASE_URL/v1/apps/demo/machines
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" $FLY_FLAPS_BASE_URL/v1/apps/demo/groups/app
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" -X POST $FLY_FLAPS_BASE_URL/v1/apps/demo/machines \
    -d '{"region": "syd,any", "config": {"image": "%s"}}'
  curl -s -H "Authorization: Bearer $FLY_API_TOKEN" $FLY_FLAPS_BASE_URL/v1/platform/regions
  dig @%s -p %s +short demo.internal %s
  curl -s %s

Press Ctrl-C to stop every machine and exit.
`, token, url, host.DemoImage, dnsHost, dnsPort, qtype, demoURL)
}

// edgeHost is how an edge address is written after "<app>.": localhost with
// the edge's port (<app>.localhost resolves to loopback with no setup).
func edgeHost(addr string) string {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return addr
	}
	return "localhost:" + port
}

func ptrTo[T any](v T) *T { return &v }

// printSandboxNames says what the sandbox driver names on this machine
// after the dev cluster's instance.
func printSandboxNames(w io.Writer, instance string, hosts int) {
	first, err := sandbox.InstanceNames(instance, 0)
	if err != nil {
		return
	}
	last, _ := sandbox.InstanceNames(instance, hosts-1)
	net := first.HostPrefix.String() + "…"
	if first.Network != 0 {
		net = layout.NetworkPrefix(first.Network).String()
	}
	fmt.Fprintf(w, "  Instance      %s   (bridges %s…%s, cgroups %s…%s, 6PN %s)\n",
		instance, first.Bridge, last.Bridge, first.CgroupParent, last.CgroupParent, net)
}
