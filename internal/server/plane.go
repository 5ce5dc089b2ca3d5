package server

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/httpserve"
)

// PlaneConfig describes a whole control plane process: its catalog, its own
// member of the hosts' cluster (it runs no machines), and its API. `flame
// server`, `flame dev` and the tests build it with StartPlane.
type PlaneConfig struct {
	// DataDir holds the catalog (unless Catalog.URL names an external
	// NATS) and, by default, the key that seals secrets.
	DataDir string
	// SecretKeyFile is the key that seals secrets (32 bytes), created on
	// first use; default <DataDir>/secret.key. Control planes that share a
	// catalog must share this key: a plane that cannot open the secrets
	// already in the catalog refuses to start.
	SecretKeyFile string
	// Listener is where the public API is served.
	Listener net.Listener
	// Catalog configures the catalog; DataDir and Buckets are filled in.
	Catalog catalog.Config
	// Cluster configures the plane's member of the cluster (HostID,
	// Region, Transport or bind address); its capacity is zero and it
	// advertises the API address as "control".
	Cluster cluster.Config
	// Join lists gossip addresses of hosts to join.
	Join []string
	// Registry, when set, is served under /v2/ beside the API: the OCI
	// registry hosts pull images from.
	Registry http.Handler
	// Server tunes the control plane; Catalog, Cluster, SecretKey and
	// Logger are filled in.
	Server Config
	// HTTP bounds how long a client may hold the API (zero: the defaults).
	HTTP   httpserve.Limits
	Logger *slog.Logger
	// TLS serves the API over TLS (apitls.go); nil: plain HTTP.
	TLS *tls.Config
}

// Plane is a running control plane.
type Plane struct {
	*Server
	Catalog *catalog.NATS
	Cluster *cluster.Cluster
	// AdminToken is set when this start created the first admin token (on
	// a fresh data dir); it is shown once and never stored in plain text.
	AdminToken string

	dataDir   string
	closeOnce sync.Once
	closeErr  error
	srv       *http.Server
	ln        net.Listener
	wg        chan struct{}
	tls       bool // the API is served over TLS
}

// DataDir is where the plane keeps its state.
func (p *Plane) DataDir() string { return p.dataDir }

// StartPlane opens the catalog, joins the cluster and serves the API.
func StartPlane(ctx context.Context, cfg PlaneConfig) (p *Plane, err error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DataDir == "" || cfg.Listener == nil {
		return nil, errors.New("control plane: data dir and listener are required")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, err
	}
	if cfg.SecretKeyFile == "" {
		cfg.SecretKeyFile = filepath.Join(cfg.DataDir, "secret.key")
	}
	key, err := secretKey(cfg.SecretKeyFile)
	if err != nil {
		return nil, err
	}
	p = &Plane{ln: cfg.Listener, wg: make(chan struct{}), dataDir: cfg.DataDir, tls: cfg.TLS != nil}
	built := p // the named result is nil on the error paths
	defer func() {
		if err != nil {
			built.closeParts()
		}
	}()
	cc := cfg.Catalog
	if cc.URL == "" && cc.DataDir == "" {
		cc.DataDir = filepath.Join(cfg.DataDir, "catalog")
	}
	cc.Buckets = append(cc.Buckets, Buckets()...)
	if cc.Logger == nil {
		cc.Logger = cfg.Logger
	}
	// The embedded NATS is locked with the secrets key (natsauth.go):
	// every plane sharing the catalog has it, and admits the enrolled
	// hosts the Server names once it runs.
	var users atomic.Pointer[Server]
	if cc.URL == "" {
		cc.Secret = key
		cc.Users = func(nkey string) (catalog.User, bool) {
			if s := users.Load(); s != nil {
				return s.NATSUser(nkey)
			}
			return catalog.User{}, false
		}
	}
	if p.Catalog, err = catalog.Open(ctx, cc); err != nil {
		return nil, fmt.Errorf("control plane: catalog: %w", err)
	}
	mc := cfg.Cluster
	mc.Capacity = cluster.Resources{}
	mc.Addrs = map[string]string{"control": cfg.Listener.Addr().String()}
	mc.Logger = cfg.Logger
	if p.Cluster, err = cluster.New(mc); err != nil {
		return nil, fmt.Errorf("control plane: cluster: %w", err)
	}
	if err = p.Cluster.Start(ctx); err != nil {
		return nil, fmt.Errorf("control plane: cluster: %w", err)
	}
	sc := cfg.Server
	if sc.ID == "" {
		if sc.ID, err = serverID(filepath.Join(cfg.DataDir, "server-id")); err != nil {
			return nil, fmt.Errorf("control plane: %w", err)
		}
	}
	sc.Catalog, sc.Cluster, sc.SecretKey, sc.Logger = p.Catalog, p.Cluster, key, cfg.Logger
	if res, ok := cfg.Registry.(ImageResolver); ok && sc.Images == nil {
		sc.Images = res
		sc.RegistryNames = append(sc.RegistryNames, registryNames(cfg.Listener.Addr().String())...)
	}
	if cc.Secret != nil && sc.CatalogCA == nil {
		if sc.CatalogCA, err = catalog.CAPEM(cc.Secret); err != nil {
			return nil, err
		}
	}
	if p.Server, err = New(sc); err != nil {
		return nil, err
	}
	users.Store(p.Server)
	if err = p.Server.checkSecretKey(ctx); err != nil {
		return nil, fmt.Errorf("control plane: %w", err)
	}
	// The member gossips with the catalog's keyring before it joins.
	if err = p.Server.useGossipKeys(ctx); err != nil {
		return nil, fmt.Errorf("control plane: %w", err)
	}
	if len(cfg.Join) > 0 {
		if _, jerr := p.Cluster.Join(cfg.Join); jerr != nil {
			cfg.Logger.Warn("control plane: join cluster", "err", jerr)
		}
	}
	if p.AdminToken, err = p.Server.Bootstrap(ctx); err != nil {
		return nil, fmt.Errorf("control plane: bootstrap admin token: %w", err)
	}
	if err = p.Server.Start(context.WithoutCancel(ctx)); err != nil {
		return nil, err
	}
	handler := p.Server.Handler()
	if cfg.Registry != nil {
		mux := http.NewServeMux()
		mux.Handle("/", handler)
		mux.Handle("/v2/", cfg.Registry)
		handler = mux
	}
	p.srv = httpserve.New(handler, cfg.HTTP)
	go func() {
		defer close(p.wg)
		if err := p.srv.Serve(apiListener(cfg)); err != nil && !errors.Is(err, http.ErrServerClosed) {
			cfg.Logger.Error("control plane api stopped", "err", err)
		}
	}()
	return p, nil
}

// URL is the API's base URL.
func (p *Plane) URL() string { return apiScheme(p.tls) + "://" + p.ln.Addr().String() }

// Close stops serving, the reconciler, the cluster member and the catalog.
// Closing twice is harmless.
func (p *Plane) Close() error {
	p.closeOnce.Do(func() {
		if p.srv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			if serr := p.srv.Shutdown(ctx); serr != nil {
				p.srv.Close()
			}
			cancel()
			<-p.wg
		}
		p.closeErr = p.closeParts()
	})
	return p.closeErr
}

func (p *Plane) closeParts() error {
	var err error
	if p.Server != nil {
		err = errors.Join(err, p.Server.Close())
	}
	if p.Cluster != nil {
		p.Cluster.Leave(time.Second)
		err = errors.Join(err, p.Cluster.Close())
	}
	if p.Catalog != nil {
		err = errors.Join(err, p.Catalog.Close())
	}
	return err
}

// serverID reads the server's id, making and keeping one on first use.
func serverID(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if id == "" || len(id) > 64 {
			return "", fmt.Errorf("server id %s: want 1 to 64 characters", path)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", err
	}
	id := newServerID()
	if err := atomicfile.Write(path, []byte(id+"\n"), filepath.Dir(path)); err != nil {
		return "", fmt.Errorf("server id: %w", err)
	}
	return id, nil
}

// secretKey reads the key that seals secrets, creating it on first use.
func secretKey(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		if len(b) != 32 {
			return nil, fmt.Errorf("secret key %s: %d bytes, want 32", path, len(b))
		}
		return b, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	b = make([]byte, 32)
	rand.Read(b)
	if err := atomicfile.Write(path, b, filepath.Dir(path)); err != nil {
		return nil, fmt.Errorf("write secret key: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return nil, err
	}
	return b, nil
}
