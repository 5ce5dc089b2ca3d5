package catalog

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// NATS is the Catalog on NATS JetStream.
type NATS struct {
	cfg     Config
	log     *slog.Logger
	srv     *server.Server // nil with Config.URL
	auth    *authenticator // a locked embedded server's check of clients
	ca      *lockCA        // derived from Config.Secret
	nc      *nats.Conn
	js      jetstream.JetStream
	buckets map[string]*bucket
	ncDone  chan struct{} // closed when nc has closed
	ncEnd   func()        // closes ncDone once

	mu      sync.Mutex
	closed  bool
	closing chan struct{}  // closed by Close: watchers stop
	wg      sync.WaitGroup // watchers

	closeOnce sync.Once
	closeErr  error
}

var _ Catalog = (*NATS)(nil)

// Open starts the embedded server (or connects to Config.URL), waits until
// JetStream answers — in a cluster, until it has a metadata leader — and
// creates the declared buckets. It gives up when ctx ends.
func Open(ctx context.Context, cfg Config) (*NATS, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	n := &NATS{
		cfg:     cfg,
		log:     cfg.Logger.With("component", "catalog"),
		buckets: map[string]*bucket{},
		ncDone:  make(chan struct{}),
		closing: make(chan struct{}),
	}
	n.ncEnd = sync.OnceFunc(func() { close(n.ncDone) })
	if err := n.open(ctx); err != nil {
		n.shutdown()
		return nil, err
	}
	return n, nil
}

func (n *NATS) open(ctx context.Context) error {
	opts := []nats.Option{
		nats.Name("flame-catalog"),
		nats.ClosedHandler(func(*nats.Conn) { n.ncEnd() }),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			n.log.Warn("nats connection", "subject", subject, "err", err)
		}),
	}
	lock, err := n.lockOptions()
	if err != nil {
		return err
	}
	opts = append(opts, lock...)
	addr := n.cfg.URL
	if addr == "" {
		srv, err := n.startServer(ctx)
		if err != nil {
			return err
		}
		n.srv = srv
		opts = append(opts, nats.InProcessServer(srv))
	}
	nc, err := nats.Connect(addr, append(opts, nats.MaxReconnects(-1))...)
	if err != nil {
		return fmt.Errorf("connect to nats: %w", err)
	}
	n.nc = nc
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("jetstream: %w", err)
	}
	n.js = js
	if !n.cfg.Bind {
		// A restricted user may not ask for the account's information;
		// binding a bucket waits for JetStream just as well.
		if err := n.waitJetStream(ctx); err != nil {
			return err
		}
	}
	for _, spec := range n.cfg.Buckets {
		b, err := n.createBucket(ctx, spec)
		if err != nil {
			return err
		}
		n.buckets[spec.Name] = b
	}
	if n.auth != nil && n.track() {
		go n.recheckLoop()
	}
	n.log.Info("catalog open", "server", n.cfg.ServerName, "url", n.cfg.URL, "dir", n.cfg.DataDir,
		"cluster", n.cfg.ClusterName, "replicas", n.cfg.Replicas, "buckets", len(n.buckets))
	return nil
}

func (n *NATS) startServer(ctx context.Context) (*server.Server, error) {
	c := n.cfg
	opts := &server.Options{
		ServerName:             c.ServerName,
		DontListen:             c.ClientListen == "",
		JetStream:              true,
		StoreDir:               c.DataDir,
		SyncAlways:             !c.relaxedSync,
		NoSigs:                 true,
		DisableJetStreamBanner: true,
		Debug:                  c.Logger.Enabled(ctx, slog.LevelDebug),
		// A peer that is down is retried every second; say so once a
		// minute, not every time.
		ReconnectErrorReports: 60,
	}
	switch {
	case c.ClientListen != "":
		host, port, _ := splitHostPort(c.ClientListen)
		opts.Host, opts.Port = host, anyPort(port)
	case c.ClusterListen != "":
		// nats-server starts routing only after its client listener is
		// up, so a clustered server needs one: loopback, any port.
		opts.DontListen = false
		opts.Host, opts.Port = "127.0.0.1", server.RANDOM_PORT
	}
	if err := n.lockServer(opts); err != nil {
		return nil, err
	}
	if c.ClusterListen != "" {
		host, port, _ := splitHostPort(c.ClusterListen)
		opts.Cluster.Name = c.ClusterName
		opts.Cluster.Host, opts.Cluster.Port = host, anyPort(port)
		for _, r := range c.Routes {
			u, _ := parseRoute(r)
			opts.Routes = append(opts.Routes, u)
		}
	}
	srv, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats server: %w", err)
	}
	logger := &serverLogger{l: n.log.With("nats", c.ServerName)}
	srv.SetLoggerV2(logger, opts.Debug, false, false)
	srv.Start() // returns once listening and JetStream is up, or failed
	if !srv.JetStreamEnabled() {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("nats server: jetstream did not start: %s", logger.lastFatal())
	}
	wait := 10 * time.Second
	if d, ok := ctx.Deadline(); ok {
		wait = time.Until(d)
	}
	if !srv.ReadyForConnections(wait) {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil, fmt.Errorf("nats server %q: not ready after %s", c.ServerName, wait.Round(time.Millisecond))
	}
	return srv, nil
}

// anyPort maps port 0 ("any") to the server's spelling of it.
func anyPort(port int) int {
	if port == 0 {
		return server.RANDOM_PORT
	}
	return port
}

// waitJetStream polls until JetStream answers an account query, which in a
// cluster needs a metadata leader.
func (n *NATS) waitJetStream(ctx context.Context) error {
	delay, timeout := 10*time.Millisecond, 200*time.Millisecond
	for {
		qctx, cancel := context.WithTimeout(ctx, timeout)
		_, err := n.js.AccountInfo(qctx)
		cancel()
		if err == nil {
			return nil
		}
		n.log.Debug("waiting for jetstream", "err", err)
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for jetstream: %w (last: %w)", ctx.Err(), err)
		case <-time.After(delay):
		}
		delay, timeout = min(2*delay, 500*time.Millisecond), min(2*timeout, 2*time.Second)
	}
}

// ClientURL is the URL other NATS clients reach this catalog's server at:
// the embedded server's client listener ("" without one), or Config.URL.
func (n *NATS) ClientURL() string {
	if n.srv == nil {
		return n.cfg.URL
	}
	if n.srv.Addr() == nil {
		return ""
	}
	return n.srv.ClientURL()
}

// ClusterURL is the route URL other servers list in Config.Routes to join
// this one ("" when it is not clustered).
func (n *NATS) ClusterURL() string {
	if n.srv == nil || n.cfg.ClusterListen == "" {
		return ""
	}
	addr := n.srv.ClusterAddr()
	if addr == nil {
		return ""
	}
	return (&url.URL{Scheme: "nats-route", Host: addr.String()}).String()
}

// Bucket returns a declared bucket.
func (n *NATS) Bucket(name string) (Bucket, error) {
	b, ok := n.buckets[name]
	if !ok {
		return nil, fmt.Errorf("bucket %q is not declared: %w", name, ErrNotFound)
	}
	return b, nil
}

// Publish sends data on subject.
func (n *NATS) Publish(ctx context.Context, subject string, data []byte) error {
	if err := checkSubject(subject, false); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	if err := n.nc.Publish(subject, data); err != nil {
		return fmt.Errorf("publish %s: %w", subject, mapConnErr(err))
	}
	return nil
}

// subscribeFlush bounds how long Subscribe waits for the server to confirm
// the subscription.
const subscribeFlush = 10 * time.Second

// Subscribe calls fn for every message on subject; it returns once the
// server has the subscription. fn runs on a goroutine
// of the subscription, one message at a time; unsubscribe stops delivery
// (a call to fn in progress finishes).
func (n *NATS) Subscribe(subject string, fn func(subject string, data []byte)) (func(), error) {
	if err := checkSubject(subject, true); err != nil {
		return nil, err
	}
	sub, err := n.nc.Subscribe(subject, func(m *nats.Msg) {
		// The bus carries what clients publish. A stream's consumer may be
		// told to deliver anywhere (a user who may read a bucket may make
		// one), so what a stream delivers is never taken as a message.
		if strings.HasPrefix(m.Reply, "$JS.") {
			return
		}
		fn(m.Subject, m.Data)
	})
	if err != nil {
		return nil, fmt.Errorf("subscribe %s: %w", subject, mapConnErr(err))
	}
	// Once the server has the subscription, every later publish reaches
	// it: a caller may subscribe, then read what came before.
	if err := n.nc.FlushTimeout(subscribeFlush); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("subscribe %s: %w", subject, mapConnErr(err))
	}
	return func() { _ = sub.Unsubscribe() }, nil
}

// checkSubject keeps the bus off the store's own subjects ($KV, $JS, …).
func checkSubject(subject string, wildcards bool) error {
	bad := subject == "" || strings.HasPrefix(subject, "$") || strings.ContainsAny(subject, " \t\r\n")
	if !bad {
		for tok := range strings.SplitSeq(subject, ".") {
			if tok == "" || (!wildcards && (tok == "*" || tok == ">")) {
				bad = true
				break
			}
		}
	}
	if bad {
		return fmt.Errorf("subject %q: %w", subject, ErrInvalid)
	}
	return nil
}

// track registers a goroutine that Close must wait for; false once closed.
func (n *NATS) track() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.wg.Add(1)
	return true
}

// Close stops the watchers, drains the connection (pending publishes go
// out, subscriptions finish the messages they hold), shuts the embedded
// server down and waits for all of it.
func (n *NATS) Close() error {
	n.closeOnce.Do(func() { n.closeErr = n.shutdown() })
	return n.closeErr
}

func (n *NATS) shutdown() error {
	n.mu.Lock()
	n.closed = true
	close(n.closing)
	n.mu.Unlock()
	n.wg.Wait()

	var errs []error
	if n.nc != nil {
		if err := n.nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			errs = append(errs, fmt.Errorf("drain nats connection: %w", err))
			n.nc.Close()
		}
		select {
		case <-n.ncDone:
		case <-time.After(30 * time.Second):
			n.nc.Close()
			<-n.ncDone
		}
	}
	if n.srv != nil {
		n.srv.Shutdown()
		n.srv.WaitForShutdown()
	}
	return errors.Join(errs...)
}

// mapConnErr turns the connection's end into ErrClosed.
func mapConnErr(err error) error {
	if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrConnectionDraining) {
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	return err
}
