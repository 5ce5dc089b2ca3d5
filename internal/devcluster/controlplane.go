package devcluster

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/httpserve"
	"github.com/flamehq/flame/internal/server"
)

// The control plane's faults. The dev cluster, not the control plane,
// owns the API's address: its front (below) serves the chaos API itself
// and hands every other request to the control plane of the moment, by a
// handler swap — no proxy hop, no second listener, and the plane's own
// HTTP server is parked on a listener that never accepts. So the plane
// can be killed and started again while the address, and the chaos API on
// it, stay up. KillControlPlane silences the plane's member on the
// simulated network (no goodbye reaches the gossip), turns its API away
// with a 503 naming the fault, and closes the plane — its reconciler,
// placement, member and embedded NATS catalog — whose state stays in its
// data dir, as a crash leaves it. Hosts, edges and the gossip carry on
// from cluster state. RestartControlPlane starts the plane again from its
// data dir at the same address, as a restarted `flame server` starts: the
// same catalog, so the same tokens.

// Errors of the control plane's faults.
var (
	// ErrPlaneKilled is returned for killing a control plane that is down.
	ErrPlaneKilled = errors.New("devcluster: control plane already killed")
	// ErrPlaneNotKilled is returned for restarting one that is up.
	ErrPlaneNotKilled = errors.New("devcluster: control plane not killed")
)

// front serves the control plane's address: the chaos API, and the rest
// through to the plane while one is up.
type front struct {
	srv   *http.Server
	ln    net.Listener
	chaos http.Handler // nil without Config.Chaos
	plane atomic.Pointer[http.Handler]
	// down is why there is no plane to hand requests to.
	down atomic.Pointer[string]
	done chan struct{}
	log  *slog.Logger

	closeOnce sync.Once
	closeErr  error
}

func (f *front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if f.chaos != nil && (r.URL.Path == "/v1/chaos" || len(r.URL.Path) > len("/v1/chaos/") && r.URL.Path[:len("/v1/chaos/")] == "/v1/chaos/") {
		f.chaos.ServeHTTP(w, r)
		return
	}
	if h := f.plane.Load(); h != nil {
		(*h).ServeHTTP(w, r)
		return
	}
	why := "the control plane is not serving"
	if s := f.down.Load(); s != nil {
		why = *s
	}
	w.Header().Set("Retry-After", "1")
	httpapi.WriteJSON(w, http.StatusServiceUnavailable, api.ErrorBody{Error: why})
}

// set hands requests to h from now on (nil: a 503 saying why).
func (f *front) set(h http.Handler, why string) {
	if h == nil {
		f.down.Store(&why)
		f.plane.Store(nil)
		return
	}
	f.plane.Store(&h)
}

// close stops serving, waiting up to 5 s for the requests in flight, then
// cuts what is left, as the plane's and the hosts' own servers do: a
// connection a client opened and never used (Go's transport keeps the
// loser of a dial race) counts as busy for its first 5 s, so running out
// of time is not a failure to close. Closing twice is harmless.
func (f *front) close() error {
	f.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := f.srv.Shutdown(ctx); err != nil {
			f.log.Warn("closing connections to the control plane's address still busy after 5 s", "err", err)
			f.closeErr = f.srv.Close()
		}
		<-f.done
	})
	return f.closeErr
}

// serveFront starts serving the control plane's address.
func (c *Cluster) serveFront(ln net.Listener) {
	f := &front{ln: ln, done: make(chan struct{}), log: c.cfg.Logger}
	if c.cfg.Chaos {
		f.chaos = c.chaosHandler()
	}
	f.srv = httpserve.New(f, httpserve.Limits{})
	c.front = f
	go func() {
		defer close(f.done)
		if err := f.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			c.cfg.Logger.Error("control plane address stopped", "err", err)
		}
	}()
}

// planeHandler is what a control plane serves: its API, and the registry
// when the cluster has one.
func (c *Cluster) planeHandler(p *server.Plane) http.Handler {
	if c.cfg.Registry == nil {
		return p.Server.Handler()
	}
	mux := http.NewServeMux()
	mux.Handle("/", p.Server.Handler())
	mux.Handle("/v2/", c.cfg.Registry)
	return mux
}

// parked is the listener the control plane's own HTTP server is given: it
// has the front's address (the plane advertises it) and never accepts.
type parked struct {
	addr net.Addr
	once sync.Once
	done chan struct{}
}

func newParked(addr net.Addr) *parked { return &parked{addr: addr, done: make(chan struct{})} }

func (l *parked) Accept() (net.Conn, error) { <-l.done; return nil, net.ErrClosed }
func (l *parked) Close() error              { l.once.Do(func() { close(l.done) }); return nil }
func (l *parked) Addr() net.Addr            { return l.addr }

// LivePlane returns the control plane while it is up (nil while it is
// killed, or in a cluster without one); safe to call at any time.
func (c *Cluster) LivePlane() *server.Plane { return c.bus.p.Load() }

// PlaneDown reports whether the control plane was killed and not
// restarted.
func (c *Cluster) PlaneDown() bool { return c.planeDown.Load() }

// planeDownReason is the 503's message while the plane is killed.
const planeDownReason = "the control plane is down (killed: flame chaos kill-control-plane); hosts and edges serve on from cluster state; flame chaos restart-control-plane starts it again"

// KillControlPlane kills the control plane as a crash would (see above).
// Plane keeps the killed plane, closed, until RestartControlPlane.
func (c *Cluster) KillControlPlane(ctx context.Context) error {
	c.planeMu.Lock()
	defer c.planeMu.Unlock()
	switch {
	case c.Plane == nil || c.front == nil:
		return errors.New("devcluster: no control plane")
	case c.planeDown.Load():
		return ErrPlaneKilled
	}
	c.planeDown.Store(true)
	c.Net.Kill(controlID)
	c.front.set(nil, planeDownReason)
	c.bus.p.Store(nil)
	// Its connections die with it, as a crashed process's sockets do:
	// closing the plane must not wait on a call to a host (a create is
	// given minutes) whose answer the silenced network holds back.
	c.planeConns.cut()
	err := c.Plane.Close()
	if c.toHosts != nil {
		c.toHosts.CloseIdleConnections()
	}
	if err != nil {
		return fmt.Errorf("devcluster: kill control plane: %w", err)
	}
	return nil
}

// RestartControlPlane starts a killed control plane again from its data
// dir, at the same address, joining the cluster through a live host.
// It replaces Plane: nothing may use the old one meanwhile.
func (c *Cluster) RestartControlPlane(ctx context.Context) error {
	c.planeMu.Lock()
	defer c.planeMu.Unlock()
	if c.Plane == nil || c.front == nil {
		return errors.New("devcluster: no control plane")
	}
	if !c.planeDown.Load() {
		return ErrPlaneNotKilled
	}
	var seed string
	for _, h := range c.Hosts {
		if !c.Killed(h.ID) {
			seed = h.Cluster.GossipAddr()
			break
		}
	}
	c.Net.Revive(controlID)
	c.planeConns.reopen()
	// The plane lives as long as the cluster, not as the call that
	// restarted it.
	p, err := c.startPlane(context.WithoutCancel(ctx), newParked(c.front.ln.Addr()), seed)
	if err != nil {
		c.Net.Kill(controlID)
		return fmt.Errorf("devcluster: restart control plane from %s: %w", filepath.Join(c.cfg.Dir, controlID), err)
	}
	c.Plane = p
	c.enroller.Store(p.Server)
	c.bus.p.Store(p)
	c.front.set(c.planeHandler(p), "")
	c.planeDown.Store(false)
	return nil
}

// admins remembers the admin tokens the control plane verified, by hash,
// so the chaos API still knows them while the plane is down (to restart
// it). A token the plane refuses or revokes is forgotten. Keys are the
// tokens' ids: the SHA-256 of the bearer token.
type admins struct {
	mu sync.Mutex
	ok map[[32]byte]bool
}

// forget drops the token whose id (hex SHA-256) is given: the plane
// revoked it, so it must not open the chaos API while the plane is down.
func (a *admins) forget(id string) {
	var key [32]byte
	if n, err := hex.Decode(key[:], []byte(id)); err != nil || n != len(key) {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.ok, key)
}

// requireAdmin lets only the admin token through: the control plane
// decides while it is up, the tokens it accepted before while it is down.
func (c *Cluster) requireAdmin(r *http.Request) error {
	auth, _ := httpapi.BearerToken(r)
	key := sha256.Sum256([]byte(auth))
	p := c.bus.p.Load()
	if p == nil {
		c.admins.mu.Lock()
		ok := auth != "" && c.admins.ok[key]
		c.admins.mu.Unlock()
		switch {
		case ok:
			return nil
		case auth == "":
			return api.Errorf(http.StatusUnauthorized, "missing token: the chaos API needs the admin token")
		}
		return api.Errorf(http.StatusServiceUnavailable, "the control plane is down and this token was not verified as the admin token before it went down")
	}
	err := p.RequireAdmin(r)
	c.admins.mu.Lock()
	defer c.admins.mu.Unlock()
	if err != nil {
		delete(c.admins.ok, key)
		return err
	}
	if c.admins.ok == nil {
		c.admins.ok = map[[32]byte]bool{}
	}
	if len(c.admins.ok) < maxRememberedAdmins {
		c.admins.ok[key] = true
	}
	return nil
}

// maxRememberedAdmins bounds the tokens requireAdmin remembers.
const maxRememberedAdmins = 64

// connSet keeps the connections a dialer opened until they close, so that
// they can all be cut at once.
type connSet struct {
	mu    sync.Mutex
	conns map[*setConn]struct{}
	cutAt bool // cut, and not reopened: no new connection
}

type setConn struct {
	net.Conn
	set  *connSet
	once sync.Once
}

func (c *setConn) Close() error {
	c.once.Do(func() {
		c.set.mu.Lock()
		delete(c.set.conns, c)
		c.set.mu.Unlock()
	})
	return c.Conn.Close()
}

// dialer is dial, its connections kept in the set.
func (s *connSet) dialer(dial func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		conn, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		sc := &setConn{Conn: conn, set: s}
		s.mu.Lock()
		if s.cutAt {
			s.mu.Unlock()
			conn.Close()
			return nil, fmt.Errorf("dial %s: %w", addr, net.ErrClosed)
		}
		if s.conns == nil {
			s.conns = map[*setConn]struct{}{}
		}
		s.conns[sc] = struct{}{}
		s.mu.Unlock()
		return sc, nil
	}
}

// cut closes every connection of the set, and fails every dial until
// reopen.
func (s *connSet) cut() {
	s.mu.Lock()
	s.cutAt = true
	conns := make([]*setConn, 0, len(s.conns))
	for sc := range s.conns {
		conns = append(conns, sc)
	}
	s.mu.Unlock()
	for _, sc := range conns {
		sc.Close()
	}
}

// reopen lets the dialer dial again.
func (s *connSet) reopen() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cutAt = false
}
