// Package server is Flame's control plane: one Fly-compatible Machines API
// for every app and machine of the cluster.
//
// It keeps the strongly consistent facts — orgs, apps, tokens, sealed
// secrets, which host runs which machine, apps' declared groups — in the
// catalog (NATS JetStream KV, one key per aggregate, compare-and-swap by
// revision), and reads everything that changes fast — hosts, their free
// capacity and health, the machines they run — from the cluster's gossip
// snapshot. It never keeps a machine's state itself: the host that runs a
// machine owns it, and every lifecycle call is forwarded there.
//
// Creating a machine is a market (place.Index ranks hosts by latency, free
// capacity, health and spread): the best host is asked, and a host without
// room refuses with 503, so the next is asked. When no host has room the
// request waits in a queue served by Dominant Resource Fairness across orgs.
//
// Auth: every request carries a token (Bearer or FlyV1). Tokens are scoped
// to an org, optionally to one app and read-only; an admin token sees
// everything. An app of another org answers 404, as if it did not exist.
//
// The reconciler keeps each declared group true: machines per region, kept
// started, warm standbys, and replacements for machines lost with their host;
// package reconcile decides, the reconciler applies.
package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/place"
)

// ClusterView is what the control plane reads of the cluster: a host's (or
// its own member's) gossip snapshot, and change notifications.
type ClusterView interface {
	Snapshot() *cluster.Snapshot
	Subscribe() (<-chan struct{}, func())
}

// Config wires a control plane.
type Config struct {
	// Catalog holds the strongly consistent facts. Required.
	Catalog catalog.Catalog
	// Cluster is the view of hosts and machines. Required.
	Cluster ClusterView
	// ID names this server in the reconciler lock (empty: a random one per
	// start). StartPlane keeps one in <DataDir>/server-id, so that a plane
	// restarted after a crash takes its lock back at once rather than
	// waiting for it to expire.
	ID string
	// AgentToken, when set, is a token the registry takes as an admin's
	// (pushes and pulls of every repository): a dev cluster's, whose
	// hosts without a control plane share it. Hosts enrolled with the
	// control plane never use it: they pull with their certificates.
	AgentToken string
	// CatalogCA is the CA (PEM) of the catalog's locked NATS when this
	// plane embeds it: enrollment then gives each host an nkey of its own
	// there (natsauth.go). Nil: hosts get none.
	CatalogCA []byte
	// HostCertValidity is how long host certificates last (zero:
	// pki.HostValidity); hosts renew them two thirds in.
	HostCertValidity time.Duration
	// GossipKey is the gossip key the catalog starts with when it holds
	// none (a dev cluster whose hosts start before the plane and get it
	// from their config); empty: a fresh random one (gossip_keys.go).
	GossipKey []byte
	// SecretKey seals app secrets (32 bytes, AES-256-GCM). Required.
	SecretKey []byte
	// HTTPClient calls the hosts (default: a client with sane timeouts).
	HTTPClient *http.Client
	// Weights tune placement (zero: place.DefaultWeights()).
	Weights place.Weights
	// RTT is the latency between regions placement scores by (default:
	// geo's model).
	RTT place.RTT
	// Edges are where each region's edge takes clients' requests (region →
	// host:port), and GlobalEntry where the entry in front of them all
	// does, when known: GET /v1/platform/regions lists them.
	Edges       map[string]string
	GlobalEntry string
	// Images, when set, is the platform registry: a create, update or
	// group may use only its org's images and the public ones, pinned to
	// their digest (see pinImage). RegistryNames are the host:port names
	// hosts reach it by; an image naming one of them is the registry's.
	Images        ImageResolver
	RegistryNames []string
	// EdgeDomain is the domain the edges serve apps under (<app>.<domain>):
	// no app may add a hostname under it but its own (certificates.go).
	EdgeDomain string
	// Seed seeds the placement's tie-breaking (0: random).
	Seed uint64
	// PendingTimeout is how long a create waits for room when no host has
	// any (default 10 s; negative: do not wait).
	PendingTimeout time.Duration
	// ReconcileInterval is how often declared groups are checked even when
	// nothing changes (default 2 s).
	ReconcileInterval time.Duration
	// LostAfter is how long a machine entry may point at a live host that
	// does not show the machine before it is considered lost (default 30 s).
	LostAfter time.Duration
	Logger    *slog.Logger
	Now       func() time.Time

	// FailureBackoff is how long a group's region waits after a failure
	// to start or create a machine before it tries again; it doubles with
	// each further failure, up to FailureBackoffMax (defaults 10 s, 30 min).
	FailureBackoff, FailureBackoffMax time.Duration

	// Follows bounds followed logs and events: per org (per admin for
	// admin tokens), in all, and in duration (zero fields: the defaults).
	Follows httpapi.FollowLimits

	// OnRevoke, when set, is told the id (hex SHA-256) of each token this
	// server revokes, for whoever remembers verified tokens beside it.
	OnRevoke func(id string)
}

// DefaultReconcileInterval is how often declared groups are checked when
// nothing changes, unless Config says otherwise.
const DefaultReconcileInterval = 2 * time.Second

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Weights == (place.Weights{}) {
		c.Weights = place.DefaultWeights()
	}
	if c.RTT == nil {
		c.RTT = geoRTT
	}
	if c.PendingTimeout == 0 {
		c.PendingTimeout = 10 * time.Second
	}
	if c.ReconcileInterval == 0 {
		c.ReconcileInterval = DefaultReconcileInterval
	}
	if c.LostAfter == 0 {
		c.LostAfter = 30 * time.Second
	}
	if c.FailureBackoff == 0 {
		c.FailureBackoff = 10 * time.Second
	}
	if c.FailureBackoffMax == 0 {
		c.FailureBackoffMax = 30 * time.Minute
	}
	if c.HTTPClient == nil {
		// No overall or response-header timeout: waits and followed logs
		// are long by design; each caller bounds its own calls.
		c.HTTPClient = &http.Client{Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 32, IdleConnTimeout: 90 * time.Second,
		}}
	}
	if c.Seed == 0 {
		c.Seed = rand.Uint64()
	}
}

// Validate reports a Config New cannot use.
func (c *Config) Validate() error {
	switch {
	case c.Catalog == nil:
		return errors.New("server: catalog is required")
	case c.Cluster == nil:
		return errors.New("server: cluster view is required")
	case len(c.SecretKey) != 32:
		return fmt.Errorf("server: secret key must be 32 bytes, not %d", len(c.SecretKey))
	}
	return nil
}

// geoRTT is geo's latency model between two region codes; unknown regions
// are far (300 ms).
func geoRTT(from, to string) time.Duration {
	a, ok1 := geo.Lookup(from)
	b, ok2 := geo.Lookup(to)
	if !ok1 || !ok2 {
		return 300 * time.Millisecond
	}
	return geo.RTT(a, b)
}

// Buckets lists the catalog buckets the control plane uses, for whoever
// opens the catalog.
func Buckets() []catalog.BucketSpec {
	return append([]catalog.BucketSpec{
		{Name: bucketOrgs}, {Name: bucketApps}, {Name: bucketTokens},
		{Name: bucketMachines}, {Name: bucketSecrets}, {Name: bucketGroups},
		{Name: bucketLocks, TTL: true}, {Name: bucketDestroyed, TTL: true},
		{Name: bucketTCPPorts}, {Name: bucketOrgNets},
	}, append(certstore.Buckets(), identityBuckets()...)...)
}

// Server is a running control plane.
type Server struct {
	cfg    Config
	log    *slog.Logger
	api    *httpapi.Server
	aead   aeadSealer
	gossip gossipState

	orgs, apps, tokens, machines, secrets, groups, locks, destroyed catalog.Bucket

	tcpPorts catalog.Bucket // raw TCP public ports → the app that holds each
	orgNets  catalog.Bucket // the last org number given (see orgnet.go)
	// hostnames are the apps' custom hostnames, certStore what the edges
	// obtained for them (certificates.go).
	hostnames catalog.Bucket
	certStore *certstore.Storage

	ident *identity // the CA and enrolled hosts (hosts_enroll.go), loaded by Start
	// natsUsers are the hosts the catalog's NATS admits (natsauth.go).
	natsUsers *natsUsers
	handler   http.Handler

	placer *placer
	// Hot reads: every request's token and app.
	tokenCache *cache[token]
	appCache   *cache[app]
	follows    *httpapi.Follows
	// id names this control plane in the reconciler lock.
	id            string
	reconcileKick chan struct{}
	lastSettle    time.Time // owned by the reconciler's loop
	leading       atomic.Bool

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// New builds a control plane; Start runs its background work.
func New(cfg Config) (*Server, error) {
	cfg.setDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger.With("component", "server"), natsUsers: newNATSUsers(),
		id: cfg.ID, reconcileKick: make(chan struct{}, 1)}
	if s.id == "" {
		s.id = newServerID()
	}
	var err error
	if s.aead, err = newSealer(cfg.SecretKey); err != nil {
		return nil, err
	}
	for _, b := range []struct {
		name string
		dst  *catalog.Bucket
	}{
		{bucketOrgs, &s.orgs}, {bucketApps, &s.apps}, {bucketTokens, &s.tokens},
		{bucketMachines, &s.machines}, {bucketSecrets, &s.secrets},
		{bucketGroups, &s.groups}, {bucketLocks, &s.locks}, {bucketDestroyed, &s.destroyed},
		{bucketTCPPorts, &s.tcpPorts}, {bucketOrgNets, &s.orgNets},
	} {
		if *b.dst, err = cfg.Catalog.Bucket(b.name); err != nil {
			return nil, fmt.Errorf("server: bucket %s: %w", b.name, err)
		}
	}
	if err := s.openCertificates(); err != nil {
		return nil, err
	}
	s.placer = newPlacer(placerDeps{now: cfg.Now, cluster: cfg.Cluster, rtt: cfg.RTT, weights: cfg.Weights,
		seed: cfg.Seed, pending: cfg.PendingTimeout, machines: s.machines, hostClient: s.hostClient,
		log: s.log, goOwned: s.wg.Go, callable: s.hostCallable})
	s.tokenCache, s.appCache = newCache[token](), newCache[app]()
	s.follows = httpapi.NewFollows(cfg.Follows)
	s.api, err = httpapi.New(httpapi.Config{Backend: s, Authenticate: s.authenticate, Logger: cfg.Logger,
		Follows: s.follows, FollowKey: followKey,
		MapError: func(err error) error {
			var ae *api.Error
			if !errors.As(err, &ae) && errors.Is(err, catalog.ErrUnavailable) {
				return api.Errorf(http.StatusServiceUnavailable, "catalog unavailable, try again: %v", err)
			}
			return err
		}})
	if err != nil {
		return nil, err
	}
	s.routes()
	mux := http.NewServeMux()
	mux.Handle("/", s.api)
	mux.HandleFunc("POST /v1/hosts/enroll", s.enroll) // the join token's proof is the credential
	mux.HandleFunc("POST /v1/hosts/renew", s.renew)   // the current certificate's assertion is
	s.handler = mux
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Handler serves the public API.
func (s *Server) Handler() http.Handler { return s.handler }

// Start runs the reconciler and the placement queue until Close.
func (s *Server) Start(ctx context.Context) error {
	if err := s.loadIdentity(ctx); err != nil {
		return err
	}
	if err := s.startGossipTrust(ctx); err != nil {
		return fmt.Errorf("server: %w", err)
	}
	s.wg.Go(func() { s.ident.cache.follow(s.ctx, s, s.ident.hosts, bucketHosts) })
	s.wg.Go(func() { s.followNATSUsers(s.ctx) })
	s.wg.Go(func() { s.pushRevocations(s.ctx) })
	s.kickRevocations()
	s.wg.Add(4)
	go func() { defer s.wg.Done(); s.placer.run(s.ctx) }()
	go func() { defer s.wg.Done(); s.reconcileLoop(s.ctx) }()
	go func() { defer s.wg.Done(); s.tokenCache.follow(s.ctx, s, s.tokens, bucketTokens) }()
	go func() { defer s.wg.Done(); s.appCache.follow(s.ctx, s, s.apps, bucketApps) }()
	go func() {
		select {
		case <-ctx.Done():
			s.cancel()
		case <-s.ctx.Done():
		}
	}()
	return nil
}

// Close stops the background work and waits for it.
func (s *Server) Close() error {
	s.cancel()
	s.wg.Wait()
	s.closeHostConns()
	return nil
}

func (s *Server) routes() {
	s.api.Handle("GET /v1/apps", s.listApps)
	s.api.Handle("POST /v1/apps", s.createApp)
	s.api.Handle("GET /v1/apps/{app}", s.getApp)
	s.api.Handle("DELETE /v1/apps/{app}", s.deleteApp)

	s.api.Handle("GET /v1/apps/{app}/secrets", s.listSecrets)
	s.api.Handle("POST /v1/apps/{app}/secrets", s.updateSecrets)
	s.api.Handle("GET /v1/apps/{app}/secrets/{name}", s.getSecret)
	s.api.Handle("POST /v1/apps/{app}/secrets/{name}", s.setSecret)
	s.api.Handle("DELETE /v1/apps/{app}/secrets/{name}", s.deleteSecret)

	s.api.Handle("GET /v1/apps/{app}/groups", s.listGroups)
	s.api.Handle("GET /v1/apps/{app}/groups/{group}", s.getGroup)
	s.api.Handle("PUT /v1/apps/{app}/groups/{group}", s.putGroup)
	s.api.Handle("DELETE /v1/apps/{app}/groups/{group}", s.deleteGroup)

	s.api.Handle("GET /v1/apps/{app}/events", s.appEvents)
	s.api.Handle("GET /v1/apps/{app}/logs", s.appLogs)
	s.api.Handle("GET /v1/platform/regions", s.regions)
	s.api.Handle("POST /v1/orgs", s.createOrg)
	s.api.Handle("GET /v1/orgs", s.listOrgs)
	s.api.Handle("POST /v1/tokens", s.createToken)
	s.api.Handle("GET /v1/tokens", s.listTokens)
	s.api.Handle("DELETE /v1/tokens/{id}", s.revokeToken)
	s.certificateRoutes()
	s.identityRoutes()
}
