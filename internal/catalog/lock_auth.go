package catalog

import (
	"encoding/base64"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// A locked catalog (Config.Secret) admits a client only with an nkey: the
// control role's, derived from the secret (everything is allowed to it), or
// one Config.Users names (a host), with the permissions Users gives.

// Permissions are what a user other than the control role may do: the
// subjects it may publish on and subscribe to. Both are allow-lists;
// anything else is refused.
type Permissions struct {
	Publish, Subscribe []string
}

// User is a client a locked catalog admits besides the control role.
type User struct {
	Name        string
	Permissions Permissions
}

// UserSource says who the holder of a public nkey is, or refuses it. It is
// called for every connection (keep it a map read) and again by Recheck.
type UserSource func(nkey string) (User, bool)

// controlKey is the control role's nkey, derived from the secret: every
// control plane holding the secret has it.
func controlKey(secret []byte) (nkeys.KeyPair, error) {
	return nkeys.FromRawSeed(nkeys.PrefixByteUser, derive(secret, "control nkey", 32))
}

// ControlSeed is the control role's nkey seed, derived from secret: what
// another process acting for the control plane authenticates with
// (written to a file for Config.Credentials).
func ControlSeed(secret []byte) ([]byte, error) {
	if len(secret) != SecretLen {
		return nil, fmt.Errorf("catalog secret: %d bytes, want %d", len(secret), SecretLen)
	}
	kp, err := controlKey(secret)
	if err != nil {
		return nil, err
	}
	return kp.Seed()
}

// NewUserKey makes a fresh user nkey: the seed its holder keeps (as a
// Config.Credentials file) and the public key a UserSource knows it by.
func NewUserKey() (seed []byte, public string, err error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, "", err
	}
	if seed, err = kp.Seed(); err != nil {
		return nil, "", err
	}
	public, err = kp.PublicKey()
	return seed, public, err
}

// ValidUserKey reports whether s is a public user nkey.
func ValidUserKey(s string) bool { return nkeys.IsValidPublicUserKey(s) }

// InboxPrefix is where a restricted user's replies arrive: its own, so no
// user reads another's (nor the control role's) replies. Dots in the name
// become '~', so the prefix is one token ("a.b" is not a prefix of "a").
func InboxPrefix(name string) string { return "_INBOX_" + strings.ReplaceAll(name, ".", "~") }

// BucketAccess grants a restricted user one bucket, to read, or to read and
// write.
type BucketAccess struct {
	Bucket string
	Write  bool
}

// Restricted is the permissions of a user named name that publishes on the
// subjects of publish and uses the buckets given through this package
// (Config.Bind), and nothing else: no other bucket, no stream or consumer
// of its own, no JetStream account calls.
func Restricted(name string, publish []string, buckets []BucketAccess) Permissions {
	p := Permissions{Publish: append([]string(nil), publish...), Subscribe: []string{InboxPrefix(name) + ".>"}}
	for _, b := range buckets {
		s := "KV_" + b.Bucket
		p.Publish = append(p.Publish,
			"$JS.API.STREAM.INFO."+s,     // bind
			"$JS.API.STREAM.MSG.GET."+s,  // Get (reads go to the leader)
			"$JS.API.CONSUMER.CREATE."+s, // List and Watch: an ordered consumer
			"$JS.API.CONSUMER.CREATE."+s+".>",
			"$JS.API.CONSUMER.INFO."+s+".>",
			"$JS.API.CONSUMER.DELETE."+s+".>",
			"$JS.FC."+s+".>", // the consumer's flow control
		)
		if b.Write {
			p.Publish = append(p.Publish, "$KV."+b.Bucket+".>")
		}
	}
	return p
}

func (p Permissions) server() *server.Permissions {
	return &server.Permissions{
		Publish:   &server.SubjectPermission{Allow: append([]string{}, p.Publish...)},
		Subscribe: &server.SubjectPermission{Allow: append([]string{}, p.Subscribe...)},
	}
}

// authenticator is the embedded server's check of every client: a valid
// signature of the server's nonce by an nkey the catalog admits.
type authenticator struct {
	control string
	users   UserSource
	log     *slog.Logger

	mu sync.Mutex
	// conns are the open connections of users (not the control role), by
	// client id, with their nkeys: what Recheck looks at.
	conns map[uint64]string
}

var _ server.Authentication = (*authenticator)(nil)

func (a *authenticator) Check(c server.ClientAuthentication) bool {
	if c.Kind() != server.CLIENT {
		return false
	}
	o := c.GetOpts()
	if o == nil || o.Nkey == "" || !nkeys.IsValidPublicUserKey(o.Nkey) {
		a.log.Debug("catalog client refused: no nkey", "addr", c.RemoteAddress())
		return false
	}
	sig, err := base64.RawURLEncoding.DecodeString(o.Sig)
	if err != nil {
		if sig, err = base64.StdEncoding.DecodeString(o.Sig); err != nil {
			return false
		}
	}
	pub, err := nkeys.FromPublicKey(o.Nkey)
	if err != nil || len(c.GetNonce()) == 0 || pub.Verify(c.GetNonce(), sig) != nil {
		a.log.Debug("catalog client refused: bad signature", "addr", c.RemoteAddress())
		return false
	}
	if o.Nkey == a.control {
		c.RegisterUser(&server.User{Username: "control"})
		return true
	}
	var u User
	ok := false
	if a.users != nil {
		u, ok = a.users(o.Nkey)
	}
	if !ok {
		a.log.Info("catalog client refused: unknown or revoked nkey", "nkey", o.Nkey, "addr", c.RemoteAddress())
		return false
	}
	c.RegisterUser(&server.User{Username: u.Name, Permissions: u.Permissions.server()})
	a.mu.Lock()
	a.conns[c.GetID()] = o.Nkey
	a.mu.Unlock()
	return true
}

// Recheck asks Config.Users again about every connected user and closes the
// connections of those it now refuses (a revoked host's): a refused
// credential stops working at once, not only at its next connect. A no-op
// on a catalog that is not a locked embedded server.
func (n *NATS) Recheck() {
	if n.srv == nil || n.auth == nil {
		return
	}
	// Client ids only grow, and a client is listed from its creation on:
	// one missing from the list below the newest listed has closed (a
	// newer one may have connected since, and is kept).
	open := map[uint64]bool{}
	var newest uint64
	if cz, err := n.srv.Connz(&server.ConnzOptions{State: server.ConnOpen, Limit: 1 << 20}); err == nil {
		for _, ci := range cz.Conns {
			open[ci.Cid] = true
			newest = max(newest, ci.Cid)
		}
	}
	a := n.auth
	a.mu.Lock()
	var refused []uint64
	for cid, key := range a.conns {
		if !open[cid] && cid < newest {
			delete(a.conns, cid)
			continue
		}
		if _, ok := a.users(key); !ok {
			refused = append(refused, cid)
			delete(a.conns, cid)
		}
	}
	a.mu.Unlock()
	for _, cid := range refused {
		if err := n.srv.DisconnectClientByID(cid); err == nil {
			n.log.Info("catalog client disconnected: its credential was withdrawn", "cid", cid)
		}
	}
}

// recheckEvery is how often a locked server rechecks its users by itself,
// besides the Recheck its owner calls on a revocation: it also forgets
// the connections that have closed.
const recheckEvery = time.Minute

func (n *NATS) recheckLoop() {
	defer n.wg.Done()
	t := time.NewTicker(recheckEvery)
	defer t.Stop()
	for {
		select {
		case <-n.closing:
			return
		case <-t.C:
			n.Recheck()
		}
	}
}

// credentialOption reads a credential file: a NATS .creds file (a user JWT
// and its seed) or a bare nkey seed.
func credentialOption(path string) (nats.Option, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("catalog credentials: %w", err)
	}
	if strings.Contains(string(b), "BEGIN NATS USER JWT") {
		return nats.UserCredentials(path), nil
	}
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(string(b))))
	if err != nil {
		return nil, fmt.Errorf("catalog credentials %s: not an nkey seed nor a .creds file", path)
	}
	return nkeyOption(kp)
}

// nkeyOption authenticates a connection with kp.
func nkeyOption(kp nkeys.KeyPair) (nats.Option, error) {
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, err
	}
	return nats.Nkey(pub, kp.Sign), nil
}

// lockOptions are the connection's credentials and TLS: the control role's
// nkey with a secret; else the credential file, the CA and the user's own
// inbox for a connection to a URL.
func (n *NATS) lockOptions() ([]nats.Option, error) {
	c := n.cfg
	var opts []nats.Option
	caPEM, name := c.CA, c.TLSName
	if c.Secret != nil {
		ca, err := newLockCA(c.Secret)
		if err != nil {
			return nil, err
		}
		n.ca = ca
		kp, err := controlKey(c.Secret)
		if err != nil {
			return nil, fmt.Errorf("catalog control key: %w", err)
		}
		opt, err := nkeyOption(kp)
		if err != nil {
			return nil, err
		}
		opts = append(opts, opt)
		if caPEM == nil {
			caPEM = ca.pem
			if name == "" {
				name = ServerTLSName
			}
		}
	}
	if c.URL == "" {
		return opts, nil
	}
	if c.Credentials != "" {
		opt, err := credentialOption(c.Credentials)
		if err != nil {
			return nil, err
		}
		opts = append(opts, opt)
	}
	if c.User != "" {
		opts = append(opts, nats.CustomInboxPrefix(InboxPrefix(c.User)))
	}
	if caPEM != nil {
		tc, err := clientTLS(caPEM, name)
		if err != nil {
			return nil, err
		}
		opts = append(opts, nats.Secure(tc))
	}
	return opts, nil
}

// lockServer locks an embedded server when the config has a secret: TLS on
// the client listener and the routes, and every client's nkey checked.
func (n *NATS) lockServer(opts *server.Options) error {
	c := n.cfg
	if c.Secret == nil {
		return nil
	}
	leaf, err := n.ca.leaf(time.Now())
	if err != nil {
		return err
	}
	kp, err := controlKey(c.Secret)
	if err != nil {
		return err
	}
	control, err := kp.PublicKey()
	if err != nil {
		return err
	}
	n.auth = &authenticator{control: control, users: c.Users, log: n.log, conns: map[uint64]string{}}
	opts.CustomClientAuthentication = n.auth
	opts.AlwaysEnableNonce = true
	// A busy machine may take a while to finish a handshake.
	opts.TLSConfig, opts.TLSTimeout = serverTLS(leaf), tlsTimeout.Seconds()
	if c.ClusterListen != "" {
		opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = routeTLS(n.ca, leaf), tlsTimeout.Seconds()
	}
	return nil
}

// tlsTimeout bounds a TLS handshake with the embedded server.
const tlsTimeout = 10 * time.Second
