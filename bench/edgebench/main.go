// Command edgebench runs Flame's edge proxy in front of one HTTP server, as
// hosts run it, for bench/proxies.sh to measure against other proxies.
//
// Each host is what `flame agent` wires for routing: a cluster member
// (memberlist over loopback) publishing its machines, and an
// internal/proxy.Proxy whose route table follows that member. The machine
// is the given backend: app "demo", a service on public port 80 whose
// internal port is the backend's.
//
//	edgebench -backend 127.0.0.1:8080 -hops 1 -addr-file /tmp/x/edge
//
// With -hops 1 the machine is on the edge's own host; with -hops 2 it is on
// a second host in the same region, and every request crosses the backhaul
// from the edge's proxy to that host's proxy. Once a request through the
// edge is answered by the backend, the edge's address is written to
// -addr-file and printed; the program then serves until SIGINT or SIGTERM.
//
// With -tls-cert and -tls-key the edge serves HTTPS too, at -tls-listen
// (public port 443 of the service), its address written to
// -tls-addr-file: what bench/tls.sh measures against nginx.
//
// Pin it to one CPU (taskset) and the Go runtime uses that one.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/proxy"
)

// The machine every request is routed to.
const (
	appName    = "demo"
	machineID  = "bench-machine"
	region     = "ams"
	publicPort = 80
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.As(err, new(usageError)):
		fmt.Fprintln(os.Stderr, "edgebench:", err)
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "edgebench:", err)
		os.Exit(1)
	}
}

// usageError is a bad command line.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// options are the command line's.
type options struct {
	backend   netip.AddrPort // the machine's address
	hops      int            // 1: the machine is on the edge's host; 2: on another host
	listen    string         // the edge listener's address
	addrFile  string         // where the edge's address is written once it answers
	domain    string         // apps are served as <app>.<domain>
	limit     int            // the service's soft and hard concurrency limits
	readyWait time.Duration  // how long the first answer through the edge may take
	verbose   bool

	tlsCert, tlsKey, tlsListen, tlsAddrFile string // HTTPS at the edge
	noEventLoop                             bool   // a goroutine per connection (proxy.Config.DisableEventLoop)
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	var backend string
	fs := flag.NewFlagSet("edgebench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&backend, "backend", "", "the backend's `ip:port` (required)")
	fs.IntVar(&o.hops, "hops", 1, "1: the machine is on the edge's host; 2: on a second host, over the backhaul")
	fs.StringVar(&o.listen, "listen", "127.0.0.1:0", "the edge listener's `address`")
	fs.StringVar(&o.addrFile, "addr-file", "", "write the edge's address to this `file` once it answers")
	fs.StringVar(&o.domain, "domain", proxy.DefaultDomain, "apps are served as <app>.`domain`")
	fs.IntVar(&o.limit, "limit", 10000, "the service's soft and hard concurrency limits")
	fs.DurationVar(&o.readyWait, "ready-wait", 30*time.Second, "how long the first answer through the edge may take")
	fs.BoolVar(&o.verbose, "v", false, "log the proxies' debug messages")
	fs.BoolVar(&o.noEventLoop, "no-event-loop", false, "serve every edge connection from a goroutine of its own, not from event loops")
	fs.StringVar(&o.tlsCert, "tls-cert", "", "PEM `file` of the edge's certificate: serve HTTPS too")
	fs.StringVar(&o.tlsKey, "tls-key", "", "PEM `file` of its key")
	fs.StringVar(&o.tlsListen, "tls-listen", "127.0.0.1:0", "the HTTPS listener's `address`")
	fs.StringVar(&o.tlsAddrFile, "tls-addr-file", "", "write the HTTPS listener's address to this `file` once the edge answers")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return o, err
		}
		return o, usageError{err.Error()}
	}
	switch {
	case fs.NArg() > 0:
		return o, usageError{fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	case backend == "":
		return o, usageError{"-backend is required"}
	case o.hops != 1 && o.hops != 2:
		return o, usageError{fmt.Sprintf("-hops %d: must be 1 or 2", o.hops)}
	case o.limit < 1 || o.limit > api.MaxConcurrencyLimit:
		return o, usageError{fmt.Sprintf("-limit %d: must be between 1 and %d", o.limit, api.MaxConcurrencyLimit)}
	case o.readyWait <= 0:
		return o, usageError{"-ready-wait must be positive"}
	case (o.tlsCert == "") != (o.tlsKey == ""):
		return o, usageError{"-tls-cert and -tls-key go together"}
	}
	ap, err := netip.ParseAddrPort(backend)
	if err != nil || ap.Port() == 0 {
		return o, usageError{fmt.Sprintf("-backend %q: want ip:port", backend)}
	}
	o.backend = ap
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	level := slog.LevelWarn
	if o.verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	b, err := start(ctx, o, log)
	if err != nil {
		return err
	}
	defer b.Close()
	if o.addrFile != "" {
		if err := writeAtomic(o.addrFile, b.edge+"\n"); err != nil {
			return err
		}
	}
	if b.tls != "" && o.tlsAddrFile != "" {
		if err := writeAtomic(o.tlsAddrFile, b.tls+"\n"); err != nil {
			return err
		}
	}
	fmt.Fprintf(stdout, "edge %s hops %d gomaxprocs %d\n", b.edge, o.hops, runtime.GOMAXPROCS(0))
	if b.tls != "" {
		fmt.Fprintf(stdout, "edge https %s\n", b.tls)
	}
	<-ctx.Done()
	return nil
}

// writeAtomic writes a file whole or not at all, so a reader polling for
// it never sees half an address.
func writeAtomic(path, content string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".edgebench-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(content); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// host is one host's routing: its cluster member and its proxy.
type host struct {
	id      string
	cluster *cluster.Cluster
	proxy   *proxy.Proxy
}

// bench is the hosts, the first one holding the edge.
type bench struct {
	edge  string
	tls   string // the HTTPS listener's address ("" without)
	hosts []*host
}

// Close stops every proxy, then every cluster member.
func (b *bench) Close() {
	for _, h := range b.hosts {
		h.proxy.Close()
	}
	for _, h := range b.hosts {
		h.cluster.Close()
	}
}

// start builds the hosts, publishes the machine and waits until a request
// through the edge is answered by the backend.
func start(ctx context.Context, o options, log *slog.Logger) (_ *bench, err error) {
	token, err := randomToken()
	if err != nil {
		return nil, err
	}
	b := &bench{}
	defer func() {
		if err != nil {
			b.Close()
		}
	}()
	tlsConf, err := edgeTLS(o)
	if err != nil {
		return nil, err
	}
	edge, err := startHost(ctx, "edge-host", o.listen, o.domain, token, log, tlsConf, o.noEventLoop)
	if err != nil {
		return nil, err
	}
	b.hosts = append(b.hosts, edge)
	b.edge, b.tls = edge.proxy.EdgeAddr(), edge.proxy.TLSAddr()
	owner := edge
	if o.hops == 2 {
		if owner, err = startHost(ctx, "machine-host", "", o.domain, token, log, nil, false); err != nil {
			return nil, err
		}
		b.hosts = append(b.hosts, owner)
		if _, err := edge.cluster.Join([]string{owner.cluster.GossipAddr()}); err != nil {
			return nil, err
		}
	}
	m := cluster.Machine{
		ID: machineID, App: appName, Region: region, State: "started", InstanceID: "bench-instance",
		PrivateIP: o.backend.Addr().String(),
		Services: []cluster.Service{{
			Protocol: "tcp", InternalPort: int(o.backend.Port()),
			Ports:       []cluster.Port{{Port: publicPort, Handlers: []string{"http"}}, {Port: proxy.DefaultTLSPort, Handlers: []string{"tls", "http"}}},
			Concurrency: cluster.Concurrency{Type: api.ConcurrencyRequests, SoftLimit: o.limit, HardLimit: o.limit},
		}},
	}
	if err := owner.cluster.Publish(cluster.HostFacts{Machines: []cluster.Machine{m}}); err != nil {
		return nil, fmt.Errorf("publish the machine: %w", err)
	}
	if err := waitReady(ctx, b.edge, appName+"."+o.domain, o.readyWait); err != nil {
		return nil, err
	}
	return b, nil
}

// startHost starts a cluster member and its proxy; edgeAddr "" makes a
// host with no edge listener, reached only over the backhaul.
func startHost(ctx context.Context, id, edgeAddr, domain, token string, log *slog.Logger, tlsConf *proxy.TLSConfig, noEventLoop bool) (_ *host, err error) {
	log = log.With("host", id)
	var edge net.Listener
	if edgeAddr != "" {
		if edge, err = net.Listen("tcp", edgeAddr); err != nil {
			return nil, fmt.Errorf("edge listener: %w", err)
		}
	}
	backhaul, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		if edge != nil {
			edge.Close()
		}
		return nil, fmt.Errorf("backhaul listener: %w", err)
	}
	closeListeners := func() {
		if edge != nil {
			edge.Close()
		}
		backhaul.Close()
	}
	c, err := cluster.New(cluster.Config{
		HostID: id, Region: region, BindAddr: "127.0.0.1", BindPort: 0,
		Addrs:            map[string]string{"proxy": backhaul.Addr().String()},
		Capacity:         cluster.Resources{CPUs: 1, MemoryMB: 1024},
		NoRegionDetector: true, // one region: the cluster-wide detector is the region's
		Logger:           log,
	})
	if err != nil {
		closeListeners()
		return nil, fmt.Errorf("host %s: %w", id, err)
	}
	if err := c.Start(ctx); err != nil {
		closeListeners()
		return nil, fmt.Errorf("host %s: %w", id, err)
	}
	p, err := proxy.New(proxy.Config{
		HostID: id, Region: region, Domain: domain, Port: publicPort,
		Edge: edge, Backhaul: backhaul, Token: token, Source: c, Logger: log, TLS: tlsConf,
		DisableEventLoop: noEventLoop,
	})
	if err != nil {
		c.Close()
		closeListeners()
		return nil, fmt.Errorf("host %s: %w", id, err)
	}
	if err := p.Start(ctx); err != nil {
		p.Close()
		c.Close()
		return nil, fmt.Errorf("host %s: %w", id, err)
	}
	return &host{id: id, cluster: c, proxy: p}, nil
}

// waitReady sends requests through the edge until the backend answers one:
// the route table has the machine (over the backhaul too, with two hosts).
func waitReady(ctx context.Context, edge, hostHeader string, wait time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	var last string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+edge+"/", nil)
		if err != nil {
			return err
		}
		req.Host = hostHeader
		resp, err := client.Do(req)
		if err == nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			resp.Body.Close()
			// The edge's own answers name their reason in Flame-Error.
			if resp.StatusCode == http.StatusOK && resp.Header.Get("Flame-Error") == "" {
				return nil
			}
			last = fmt.Sprintf("status %d, Flame-Error %q", resp.StatusCode, resp.Header.Get("Flame-Error"))
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("the edge at %s did not reach the backend within %v (last: %s)", edge, wait, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func randomToken() (string, error) {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("hosts' token: %w", err)
	}
	return hex.EncodeToString(b), nil
}

// edgeTLS is the edge's HTTPS listener with the given certificate (nil
// without -tls-cert).
func edgeTLS(o options) (*proxy.TLSConfig, error) {
	if o.tlsCert == "" {
		return nil, nil
	}
	pair, err := tls.LoadX509KeyPair(o.tlsCert, o.tlsKey)
	if err != nil {
		return nil, fmt.Errorf("-tls-cert/-tls-key: %w", err)
	}
	ln, err := net.Listen("tcp", o.tlsListen)
	if err != nil {
		return nil, fmt.Errorf("tls listener: %w", err)
	}
	return &proxy.TLSConfig{Listener: ln, GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &pair, nil }}, nil
}
