package catalog

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"regexp"
	"strconv"
)

// Config says where the catalog's NATS runs and which buckets it holds.
type Config struct {
	// DataDir holds the embedded server's JetStream store (required when
	// URL is empty).
	DataDir string
	// URL connects to an existing NATS (cluster) instead of embedding a
	// server; DataDir and the server's fields below (ClientListen through
	// Routes) must then be empty.
	URL string
	// ClientListen is the embedded server's client address: "" for none
	// (only the in-process connection), "127.0.0.1:0" for any free port.
	// ClientURL reports the address bound. A clustered server always has
	// one, by default on loopback: nats-server starts routing only after
	// its client listener.
	ClientListen string
	// ServerName names the embedded server; required in a cluster, where
	// it must be unique and stable across restarts.
	ServerName string

	// ClusterName, ClusterListen and Routes join embedded servers into one
	// JetStream cluster: ClusterListen is this server's route listener
	// ("host:port"), Routes the route URLs (nats-route://host:port) of the
	// other servers; listing every server, this one included, lets all of
	// them share one configuration. ClusterName defaults to "flame".
	ClusterName   string
	ClusterListen string
	Routes        []string

	// Replicas is how many servers hold each bucket: 1 (default), or 3 in
	// a three-server cluster.
	Replicas int
	// Buckets are created (or their settings updated) by Open.
	Buckets []BucketSpec

	// Secret locks the catalog (SecretLen bytes, the same for every server
	// and control client of one catalog: the control plane's secrets key).
	// An embedded server then speaks TLS to clients and on routes, with
	// certificates of a CA derived from the secret (routes both ways, so a
	// server without it cannot join), and admits only clients signing its
	// nonce with an nkey: the control role's, derived from the secret too
	// (the one this connection uses), or one Users names. With URL, the
	// connection authenticates as the control role and checks the server
	// against that CA.
	Secret []byte
	// Users names whom a locked embedded server admits besides the control
	// role (nil: nobody), with their permissions.
	Users UserSource

	// Credentials is the file the connection to URL authenticates with: an
	// nkey seed or a NATS .creds file, readable by its owner only.
	Credentials string
	// CA (PEM) is what the connection to URL checks the server's TLS
	// certificate against (nil: the system's roots, if the server speaks
	// TLS), as TLSName (default: the URL's host; ServerTLSName for a locked
	// catalog's server).
	CA      []byte
	TLSName string
	// User is the name a restricted user connects to URL as: its replies
	// arrive under InboxPrefix(User), the only subjects it may subscribe to.
	User string
	// Bind opens the declared buckets without creating or changing them: a
	// restricted user (a host) may do neither. They must exist.
	Bind bool

	Logger *slog.Logger

	// relaxedSync lets the file store sync on an interval instead of on
	// every write; only benchmarks and bulk test fixtures set it.
	relaxedSync bool
}

// BucketSpec declares a bucket.
type BucketSpec struct {
	// Name: letters, digits, '-' and '_'.
	Name string
	// TTL lets Create and Refresh give keys a time to live. Such a bucket
	// keeps one revision per key (History 0 or 1).
	TTL bool
	// History is how many revisions per key the bucket keeps (1–64,
	// default 1). Only the latest is visible through this package; older
	// ones are there for inspection with NATS tools.
	History int
	// MaxBytes bounds the bucket's size on disk (0: unbounded); a write
	// beyond it is refused. Buckets that restricted users (hosts) write
	// are bounded, so none of them can fill the catalog's disk.
	MaxBytes int64
}

var bucketNameRE = regexp.MustCompile(`^[a-zA-Z0-9_-]+$`)

// Validate reports the first problem with c.
func (c Config) Validate() error {
	embedded := c.URL == ""
	if embedded {
		if c.DataDir == "" {
			return errors.New("catalog config: data dir is required without a url")
		}
		if c.ClientListen != "" {
			if err := checkHostPort(c.ClientListen); err != nil {
				return fmt.Errorf("catalog config: client listen: %w", err)
			}
		}
		if c.ClusterListen != "" {
			if err := checkHostPort(c.ClusterListen); err != nil {
				return fmt.Errorf("catalog config: cluster listen: %w", err)
			}
			if c.ServerName == "" {
				return errors.New("catalog config: a clustered server needs a server name")
			}
			if len(c.Routes) == 0 {
				return errors.New("catalog config: a clustered server needs routes to the others (its own may be listed too)")
			}
		} else if len(c.Routes) > 0 || c.ClusterName != "" {
			return errors.New("catalog config: routes and cluster name need a cluster listen address")
		}
		for _, r := range c.Routes {
			if _, err := parseRoute(r); err != nil {
				return fmt.Errorf("catalog config: %w", err)
			}
		}
		if c.ClusterListen == "" && c.Replicas > 1 {
			return fmt.Errorf("catalog config: %d replicas need a cluster", c.Replicas)
		}
	} else {
		if _, err := url.Parse(c.URL); err != nil {
			return fmt.Errorf("catalog config: url: %w", err)
		}
		if c.DataDir != "" || c.ClientListen != "" || c.ServerName != "" ||
			c.ClusterName != "" || c.ClusterListen != "" || len(c.Routes) > 0 {
			return errors.New("catalog config: a url excludes the embedded server's settings (data dir, listen addresses, server name, cluster, routes)")
		}
	}
	if c.Secret != nil && len(c.Secret) != SecretLen {
		return fmt.Errorf("catalog config: secret of %d bytes, want %d", len(c.Secret), SecretLen)
	}
	switch {
	case c.Users != nil && (c.Secret == nil || !embedded):
		return errors.New("catalog config: users need a locked embedded server (a secret, no url)")
	case embedded && (c.Credentials != "" || c.CA != nil || c.TLSName != "" || c.User != ""):
		return errors.New("catalog config: credentials, ca, tls name and user are for a connection to a url")
	case c.Credentials != "" && c.Secret != nil:
		return errors.New("catalog config: a connection authenticates with credentials or the secret, not both")
	case embedded && c.Bind:
		return errors.New("catalog config: an embedded server makes its buckets; bind is for a connection to a url")
	}
	if c.Replicas < 0 || c.Replicas > 5 {
		return fmt.Errorf("catalog config: replicas %d outside 1–5", c.Replicas)
	}
	seen := map[string]bool{}
	for _, b := range c.Buckets {
		if !bucketNameRE.MatchString(b.Name) {
			return fmt.Errorf("catalog config: bucket name %q: letters, digits, '-' and '_' only", b.Name)
		}
		if seen[b.Name] {
			return fmt.Errorf("catalog config: bucket %q declared twice", b.Name)
		}
		seen[b.Name] = true
		if b.History < 0 || b.History > 64 {
			return fmt.Errorf("catalog config: bucket %q: history %d outside 1–64", b.Name, b.History)
		}
		if b.MaxBytes < 0 {
			return fmt.Errorf("catalog config: bucket %q: max bytes %d below zero", b.Name, b.MaxBytes)
		}
		if b.TTL && b.History > 1 {
			return fmt.Errorf("catalog config: bucket %q: per-key ttl needs history 1", b.Name)
		}
	}
	return nil
}

func (c Config) withDefaults() Config {
	if c.Replicas == 0 {
		c.Replicas = 1
	}
	if c.ClusterListen != "" && c.ClusterName == "" {
		c.ClusterName = "flame"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	buckets := make([]BucketSpec, len(c.Buckets))
	for i, b := range c.Buckets {
		if b.History == 0 {
			b.History = 1
		}
		buckets[i] = b
	}
	c.Buckets = buckets
	return c
}

func checkHostPort(addr string) error {
	_, _, err := splitHostPort(addr)
	return err
}

// splitHostPort parses "host:port" with a numeric port; port 0 is any.
func splitHostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, fmt.Errorf("address %q: bad port", addr)
	}
	return host, port, nil
}

func parseRoute(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("route %q: %w", s, err)
	}
	if u.Scheme != "nats-route" && u.Scheme != "nats" {
		return nil, fmt.Errorf("route %q: scheme must be nats-route", s)
	}
	if _, _, err := splitHostPort(u.Host); err != nil {
		return nil, fmt.Errorf("route %q: %w", s, err)
	}
	return u, nil
}
