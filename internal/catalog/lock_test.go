package catalog

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/flamehq/flame/api"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// lockedCatalog is a locked embedded server with a client listener on
// loopback, the buckets a control plane keeps (tokens, secrets, authority)
// and those an edge uses (hostnames read-only, certs and certlocks
// read-write), and one host user per key of its users map.
type lockedCatalog struct {
	*NATS
	secret []byte
	mu     sync.Mutex
	users  map[string]User // nkey → user
}

var lockBuckets = []BucketSpec{
	{Name: "tokens"}, {Name: "secrets"}, {Name: "authority"},
	{Name: "hostnames"}, {Name: "certs"}, {Name: "certlocks", TTL: true},
}

// edgeAccess is what a host's edge may do with the buckets.
var edgeAccess = []BucketAccess{{Bucket: "hostnames"}, {Bucket: "certs", Write: true}, {Bucket: "certlocks", Write: true}}

func newSecret(t testing.TB) []byte {
	s := make([]byte, SecretLen)
	rand.Read(s)
	return s
}

func openLocked(t testing.TB) *lockedCatalog {
	t.Helper()
	lc := &lockedCatalog{secret: newSecret(t), users: map[string]User{}}
	cfg := testConfig(t)
	cfg.Buckets = lockBuckets
	cfg.ClientListen = "127.0.0.1:0"
	cfg.Secret = lc.secret
	cfg.Users = func(nkey string) (User, bool) {
		lc.mu.Lock()
		defer lc.mu.Unlock()
		u, ok := lc.users[nkey]
		return u, ok
	}
	lc.NATS = open(t, cfg)
	return lc
}

// addHost admits a host user and returns its credential file.
func (lc *lockedCatalog) addHost(t testing.TB, id string) (creds, nkey string) {
	t.Helper()
	seed, pub, err := NewUserKey()
	if err != nil {
		t.Fatal(err)
	}
	creds = filepath.Join(t.TempDir(), "nats.seed")
	if err := os.WriteFile(creds, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	lc.mu.Lock()
	lc.users[pub] = User{Name: id, Permissions: Restricted(id,
		api.HostBusSubjects(id), edgeAccess)}
	lc.mu.Unlock()
	return creds, pub
}

func (lc *lockedCatalog) revoke(nkey string) {
	lc.mu.Lock()
	delete(lc.users, nkey)
	lc.mu.Unlock()
	lc.Recheck()
}

// hostConfig is how a host opens the catalog: its credential, the
// catalog's CA, bound to the edge's buckets.
func (lc *lockedCatalog) hostConfig(t testing.TB, id, creds string) Config {
	ca, err := CAPEM(lc.secret)
	if err != nil {
		t.Fatal(err)
	}
	return Config{URL: lc.ClientURL(), Credentials: creds, User: id, CA: ca, TLSName: ServerTLSName, Bind: true,
		Buckets: []BucketSpec{{Name: "hostnames"}, {Name: "certs"}, {Name: "certlocks", TTL: true}}, Logger: testLogger(t)}
}

// rawHost is a bare NATS connection with a host's credential: what an
// attacker holding it can do beyond this package's API.
func (lc *lockedCatalog) rawHost(t testing.TB, id, creds string) (*nats.Conn, chan error) {
	t.Helper()
	opt, err := credentialOption(creds)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := CAPEM(lc.secret)
	tc, err := clientTLS(ca, ServerTLSName)
	if err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 64)
	nc, err := nats.Connect(lc.ClientURL(), opt, nats.Secure(tc), nats.CustomInboxPrefix(InboxPrefix(id)),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	if err != nil {
		t.Fatalf("host connects: %v", err)
	}
	t.Cleanup(nc.Close)
	return nc, errs
}

func TestLockedRefusesClientsWithoutCredentials(t *testing.T) {
	lc := openLocked(t)
	ca, _ := CAPEM(lc.secret)
	tc, _ := clientTLS(ca, ServerTLSName)
	url := lc.ClientURL()

	// Over TLS, without credentials.
	if nc, err := nats.Connect(url, nats.Secure(tc)); err == nil {
		nc.Close()
		t.Fatal("a client without credentials connected")
	} else if !errors.Is(err, nats.ErrAuthorization) && !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Fatalf("refused, but not for authorization: %v", err)
	}
	// In clear: the server insists on TLS.
	if nc, err := nats.Connect(url); err == nil {
		nc.Close()
		t.Fatal("a client connected without TLS")
	}
	// A key the catalog does not know.
	seed, _, _ := NewUserKey()
	stranger := filepath.Join(t.TempDir(), "stranger.seed")
	os.WriteFile(stranger, seed, 0o600)
	opt, _ := credentialOption(stranger)
	if nc, err := nats.Connect(url, opt, nats.Secure(tc)); err == nil {
		nc.Close()
		t.Fatal("an unknown nkey connected")
	}
	// The control role's key, but not the server's CA: a client checking
	// the server's certificate against the system's roots refuses it.
	control, _ := ControlSeed(lc.secret)
	cf := filepath.Join(t.TempDir(), "control.seed")
	os.WriteFile(cf, control, 0o600)
	opt, _ = credentialOption(cf)
	if nc, err := nats.Connect(url, opt, nats.Secure(&tls.Config{ServerName: ServerTLSName})); err == nil {
		nc.Close()
		t.Fatal("the server's certificate passed for a public one")
	}
	// The control role's key with the CA: everything.
	ctl := open(t, Config{URL: url, Credentials: cf, CA: ca, TLSName: ServerTLSName, Buckets: lockBuckets, Logger: testLogger(t)})
	if _, err := bucketOf(t, ctl, "tokens").Put(ctxFor(t, 10*time.Second), "abc", []byte(`{"admin":true}`)); err != nil {
		t.Fatalf("the control role writes tokens: %v", err)
	}
}

func TestLockedHostDoesItsEdgesWorkOnly(t *testing.T) {
	lc := openLocked(t)
	ctx := ctxFor(t, 30*time.Second)
	creds, _ := lc.addHost(t, "h1.ams")
	if _, err := bucketOf(t, lc, "hostnames").Put(ctx, "www.example.com", []byte(`{"app":"a"}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := bucketOf(t, lc, "secrets").Put(ctx, "app1.KEY", []byte("sealed")); err != nil {
		t.Fatal(err)
	}

	// Through the package, with the edge's buckets: all of its work.
	h := open(t, lc.hostConfig(t, "h1.ams", creds))
	names := bucketOf(t, h, "hostnames")
	if e, err := names.Get(ctx, "www.example.com"); err != nil || string(e.Value) != `{"app":"a"}` {
		t.Fatalf("host reads hostnames: %q, %v", e.Value, err)
	}
	if es, err := names.List(ctx, ""); err != nil || len(es) != 1 {
		t.Fatalf("host lists hostnames: %d, %v", len(es), err)
	}
	// A refused publish is never acknowledged: the write times out.
	if _, err := names.Put(ctxFor(t, 2*time.Second), "evil.example.com", []byte(`{"app":"b"}`)); err == nil {
		t.Fatal("host wrote hostnames, which only the control plane writes")
	}
	certs := bucketOf(t, h, "certs")
	rev, err := certs.Create(ctx, "certificates.x", []byte("pem"), 0)
	if err != nil {
		t.Fatalf("host creates in certs: %v", err)
	}
	if _, err := certs.Update(ctx, "certificates.x", []byte("pem2"), rev); err != nil {
		t.Fatalf("host updates certs: %v", err)
	}
	w, err := certs.Watch(ctx, "certificates.")
	if err != nil {
		t.Fatalf("host watches certs: %v", err)
	}
	if c := recv(t, w); c.Key != "certificates.x" || string(c.Value) != "pem2" {
		t.Fatalf("watch: %+v", c)
	}
	if err := certs.Delete(ctx, "certificates.x", 0); err != nil {
		t.Fatalf("host deletes from certs: %v", err)
	}
	if c := recv(t, w); !c.Deleted {
		t.Fatalf("watch: %+v", c)
	}
	locks := bucketOf(t, h, "certlocks")
	lrev, err := locks.Create(ctx, "issue.x", []byte("h1"), 5*time.Second)
	if err != nil {
		t.Fatalf("host takes a lock: %v", err)
	}
	if _, err := locks.Refresh(ctx, "issue.x", []byte("h1"), lrev, 5*time.Second); err != nil {
		t.Fatalf("host renews a lock: %v", err)
	}

	// Everything else is refused. A refused publish is never answered,
	// so each attempt waits out its deadline: they run at once.
	short := func() context.Context { return ctxFor(t, 3*time.Second) }
	nc, errs := lc.rawHost(t, "h1.ams", creds)
	js, _ := jetstream.New(nc)
	attempts := map[string]func() error{}
	for _, b := range []string{"tokens", "secrets", "authority"} {
		attempts["bind "+b] = func() error {
			cfg := lc.hostConfig(t, "h1.ams", creds)
			cfg.Buckets = []BucketSpec{{Name: b}}
			n, err := Open(short(), cfg)
			if err == nil {
				n.Close()
			}
			return err
		}
		attempts["kv "+b] = func() error { _, err := js.KeyValue(short(), b); return err }
		attempts["read "+b] = func() error {
			_, err := nc.Request("$JS.API.STREAM.MSG.GET.KV_"+b, []byte(`{"last_by_subj":"$KV.`+b+`.app1.KEY"}`), 3*time.Second)
			return err
		}
	}
	attempts["write tokens"] = func() error {
		_, err := js.Publish(short(), "$KV.tokens."+strings.Repeat("a", 64), []byte(`{"admin":true}`))
		return err
	}
	attempts["make a stream"] = func() error {
		_, err := js.CreateStream(short(), jetstream.StreamConfig{Name: "MINE", Subjects: []string{"mine.>"}})
		return err
	}
	attempts["change a bucket"] = func() error {
		_, err := js.UpdateKeyValue(short(), jetstream.KeyValueConfig{Bucket: "certs", History: 64})
		return err
	}
	attempts["account info"] = func() error { _, err := js.AccountInfo(short()); return err }
	var wg sync.WaitGroup
	var amu sync.Mutex
	for what, try := range attempts {
		wg.Go(func() {
			if err := try(); err == nil {
				amu.Lock()
				t.Errorf("a host's credential could %s", what)
				amu.Unlock()
			}
		})
	}
	wg.Wait()
	if e, err := bucketOf(t, lc, "tokens").Get(ctx, strings.Repeat("a", 64)); err == nil {
		t.Fatalf("a token was written: %q", e.Value)
	}
	for _, subj := range []string{"$KV.secrets.>", "_INBOX.>", "events.>"} {
		if _, err := nc.SubscribeSync(subj); err != nil {
			t.Fatal(err)
		}
	}
	nc.Flush()
	for range 3 {
		select {
		case err := <-errs:
			if !strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
				t.Fatalf("host's subscription refused with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a host subscribed beyond its inbox")
		}
	}
	drain := func() {
		for {
			select {
			case <-errs:
			default:
				return
			}
		}
	}
	drain()

	// Its own events reach the control plane; another host's are refused.
	got := make(chan string, 16)
	unsub, err := lc.Subscribe("events.>", func(subject string, _ []byte) { got <- subject })
	if err != nil {
		t.Fatal(err)
	}
	defer unsub()
	if err := nc.Publish("events.h2.app.m1", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if err := nc.Publish("events.h1.app.m1", []byte("{}")); err != nil { // "h1" is not "h1.ams"
		t.Fatal(err)
	}
	if err := nc.Publish("events.h1~ams.app.m1", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	nc.Flush()
	select {
	case s := <-got:
		if s != "events.h1~ams.app.m1" {
			t.Fatalf("the control plane got %s", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the host's own event never arrived")
	}
	// The server answers each refused publish with a permissions
	// violation, in order: two of them came before the own event.
	for range 2 {
		select {
		case err := <-errs:
			if !strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
				t.Fatalf("host's publish refused with %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no permissions violation reported")
		}
	}
	select {
	case s := <-got:
		t.Fatalf("the control plane got %s", s)
	default:
	}

	// A consumer told to deliver a bucket the host writes onto another
	// host's subject: what a stream delivers is not taken as a message.
	raw, err := lc.nc.SubscribeSync("events.h2.app.m1")
	if err != nil {
		t.Fatal(err)
	}
	lc.nc.Flush()
	if _, err := js.Publish(short(), "$KV.certs.forged", []byte(`{"forged":true}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateOrUpdateConsumer(short(), "KV_certs", jetstream.ConsumerConfig{
		DeliverSubject: "events.h2.app.m1", FilterSubject: "$KV.certs.forged", AckPolicy: jetstream.AckNonePolicy}); err != nil {
		t.Fatalf("host makes a consumer of certs: %v", err)
	}
	if _, err := raw.NextMsg(10 * time.Second); err != nil {
		t.Fatalf("the consumer did not deliver: %v", err)
	}
	// Delivered to the control plane's connection before this marker, so
	// the subscription saw it first.
	if err := nc.Publish("events.h1~ams.app.marker", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	select {
	case s := <-got:
		if s != "events.h1~ams.app.marker" {
			t.Fatalf("a stream's delivery passed for an event on %s", s)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the marker never arrived")
	}
}

func TestLockedRevokedHostIsCutOff(t *testing.T) {
	lc := openLocked(t)
	creds, nkey := lc.addHost(t, "h1")
	h, err := Open(ctxFor(t, 20*time.Second), lc.hostConfig(t, "h1", creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() }) // it reports the connection it lost
	certs := bucketOf(t, h, "certs")
	ctx := ctxFor(t, 30*time.Second)
	if _, err := certs.Put(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	lc.revoke(nkey)
	// The open connection is closed; its reconnects are refused.
	eventually(t, 10*time.Second, "revoked host's connection closed", func() bool { return !h.nc.IsConnected() })
	if _, err := certs.Put(ctxFor(t, 2*time.Second), "k", []byte("v2")); err == nil {
		t.Fatal("a revoked host wrote")
	}
	if n, err := Open(ctxFor(t, 10*time.Second), lc.hostConfig(t, "h1", creds)); err == nil {
		n.Close()
		t.Fatal("a revoked host connected again")
	}
}

// routeLog records what a server logs, so a test can wait for a route's
// refusal rather than for time to pass.
type routeLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *routeLog) add(format string, v ...any) {
	l.mu.Lock()
	l.lines = append(l.lines, fmt.Sprintf(format, v...))
	l.mu.Unlock()
}
func (l *routeLog) Noticef(f string, v ...any) { l.add(f, v...) }
func (l *routeLog) Warnf(f string, v ...any)   { l.add(f, v...) }
func (l *routeLog) Fatalf(f string, v ...any)  { l.add(f, v...) }
func (l *routeLog) Errorf(f string, v ...any)  { l.add(f, v...) }
func (l *routeLog) Debugf(f string, v ...any)  { l.add(f, v...) }
func (l *routeLog) Tracef(string, ...any)      {}

func (l *routeLog) count(sub string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, s := range l.lines {
		if strings.Contains(strings.ToLower(s), sub) {
			n++
		}
	}
	return n
}

func TestLockedClusterRoutesWithTheSecret(t *testing.T) {
	secret := newSecret(t)
	nodes := openClusterWith(t, secret)
	ctx := ctxFor(t, 30*time.Second)
	rev, err := bucketOf(t, nodes[0], "data").Create(ctx, "k", []byte("v"), 0)
	if err != nil {
		t.Fatal(err)
	}
	e, err := bucketOf(t, nodes[2], "data").Get(ctx, "k")
	if err != nil || e.Revision != rev {
		t.Fatalf("another server reads %+v, %v", e, err)
	}
	for i, n := range nodes {
		if n.srv.NumRoutes() == 0 {
			t.Fatalf("server %d has no routes", i)
		}
	}
}

func TestLockedClusterRefusesStrangerRoutes(t *testing.T) {
	// Three servers sharing the secret route to each other (their
	// buckets have three replicas, so Open needs all three).
	nodes := openClusterWith(t, newSecret(t))
	locked := nodes[0]
	routes := locked.srv.NumRoutes()
	if routes == 0 {
		t.Fatal("the locked servers did not route")
	}

	// A stranger's own CA and certificate: TLS, but not the catalog's.
	other, err := newLockCA(newSecret(t))
	if err != nil {
		t.Fatal(err)
	}
	otherLeaf, err := other.leaf(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	strangers := map[string]*tls.Config{
		"plain":     nil,
		"other-ca":  {Certificates: []tls.Certificate{otherLeaf}, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12},
		"no-client": {InsecureSkipVerify: true, MinVersion: tls.VersionTLS12},
	}
	for name, tc := range strangers {
		t.Run(name, func(t *testing.T) {
			rurl, _ := parseRoute(locked.ClusterURL())
			opts := &server.Options{ServerName: "stranger-" + name, Host: "127.0.0.1", Port: server.RANDOM_PORT,
				NoSigs: true, NoSystemAccount: true}
			opts.Cluster.Name, opts.Cluster.Host, opts.Cluster.Port = "flame", "127.0.0.1", server.RANDOM_PORT
			opts.Cluster.TLSConfig, opts.Cluster.TLSTimeout = tc, 5
			opts.Routes = append(opts.Routes, rurl)
			srv, err := server.NewServer(opts)
			if err != nil {
				t.Fatal(err)
			}
			log := &routeLog{}
			srv.SetLoggerV2(log, true, false, false)
			srv.Start()
			t.Cleanup(func() { srv.Shutdown(); srv.WaitForShutdown() })
			// Wait for the stranger to have tried (and failed) twice:
			// each failure is logged before the next attempt.
			eventually(t, 60*time.Second, "two failed route attempts", func() bool {
				return log.count("error") >= 2 || log.count("closed") >= 2
			})
			if n := srv.NumRoutes(); n != 0 {
				t.Fatalf("stranger has %d routes", n)
			}
			if n := locked.srv.NumRoutes(); n != routes {
				t.Fatalf("the locked server has %d routes, had %d", n, routes)
			}
		})
	}
}

func TestLockedConfigValidate(t *testing.T) {
	users := func(string) (User, bool) { return User{}, false }
	secret := make([]byte, SecretLen)
	for _, tc := range []struct {
		name string
		cfg  Config
		ok   bool
	}{
		{"locked embedded", Config{DataDir: "d", Secret: secret, Users: users}, true},
		{"control client of a url", Config{URL: "nats://x:4222", Secret: secret}, true},
		{"host client of a url", Config{URL: "nats://x:4222", Credentials: "f", CA: []byte("pem"), TLSName: ServerTLSName, User: "h1", Bind: true}, true},
		{"short secret", Config{DataDir: "d", Secret: secret[:16]}, false},
		{"users without a secret", Config{DataDir: "d", Users: users}, false},
		{"users of a url", Config{URL: "nats://x:4222", Secret: secret, Users: users}, false},
		{"credentials for an embedded server", Config{DataDir: "d", Credentials: "f"}, false},
		{"user for an embedded server", Config{DataDir: "d", User: "h1"}, false},
		{"credentials and secret", Config{URL: "nats://x:4222", Secret: secret, Credentials: "f"}, false},
		{"bind an embedded server", Config{DataDir: "d", Bind: true}, false},
	} {
		if err := tc.cfg.Validate(); (err == nil) != tc.ok {
			t.Errorf("%s: %v", tc.name, err)
		}
	}
}

// TestLockedCAIsTheSameFromTheSecret: every server holding the secret has
// one CA, and another secret another.
func TestLockedCAIsTheSameFromTheSecret(t *testing.T) {
	s := newSecret(t)
	a, err := CAPEM(s)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := CAPEM(slices.Clone(s))
	c, _ := CAPEM(newSecret(t))
	if string(a) != string(b) {
		t.Fatal("one secret, two CAs")
	}
	if string(a) == string(c) {
		t.Fatal("two secrets, one CA")
	}
	k1, _ := ControlSeed(s)
	k2, _ := ControlSeed(newSecret(t))
	if string(k1) == string(k2) {
		t.Fatal("two secrets, one control key")
	}
}

// TestBucketMaxBytes: a bounded bucket refuses a write past its bound.
func TestBucketMaxBytes(t *testing.T) {
	cfg := testConfig(t)
	cfg.Buckets = []BucketSpec{{Name: "small", MaxBytes: 4096}}
	b := bucketOf(t, open(t, cfg), "small")
	ctx := ctxFor(t, 20*time.Second)
	value := []byte(strings.Repeat("x", 1000))
	var err error
	for i := range 10 {
		if _, err = b.Put(ctx, fmt.Sprintf("k%d", i), value); err != nil {
			break
		}
	}
	if err == nil {
		t.Fatal("10 kB went into a bucket of 4 kB")
	}
}
