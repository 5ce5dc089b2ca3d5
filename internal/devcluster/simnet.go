package devcluster

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
)

// The hosts' and the control plane's APIs listen on real loopback
// addresses (users and the CLI reach them there, and the cluster
// advertises them), but the calls between the cluster's own parts — the
// control plane asking a host to place, start or read a machine, a host
// pulling an image from the registry — cross the simulated network, so
// they pay the distance between their regions: each such API also
// listens on the simulated network (simPort of its member), relaying to
// the real listener, and the parts dial through a dialer that sends the
// real addresses of those APIs over the simulated network.

// simPort is where a member's API listens on the simulated network.
const simPort = 80

// simNet maps the real addresses of the cluster's APIs to the simulated
// network, relays what arrives there, and can close its doors.
type simNet struct {
	c *Cluster

	mu     sync.Mutex
	routes map[string]string // real address → member:port on the simulated network
	lns    []net.Listener
	conns  map[*relayConn]struct{}
	calls  int           // open relayed connections to hosts
	shut   bool          // no new relayed connection
	idle   chan struct{} // closed once shut and no relayed connection to a host is open
	wg     sync.WaitGroup
}

func newSimNet(c *Cluster) *simNet {
	return &simNet{c: c, routes: map[string]string{}, conns: map[*relayConn]struct{}{}, idle: make(chan struct{})}
}

// expose makes the API at realAddr reachable on the simulated network as
// member's, and sends dials of realAddr there. A host's API is one the
// control plane calls: shutAndWait waits for the calls to it.
func (s *simNet) expose(member, realAddr string, host bool) error {
	return s.exposeAt(member, simPort, realAddr, host)
}

// exposeOnce is expose, unless realAddr is exposed already (a revived
// host listens where it did before).
func (s *simNet) exposeOnce(member, realAddr string, host bool) error {
	s.mu.Lock()
	_, ok := s.routes[realAddr]
	s.mu.Unlock()
	if ok {
		return nil
	}
	return s.expose(member, realAddr, host)
}

// exposeAt is expose on another port of member's.
func (s *simNet) exposeAt(member string, port int, realAddr string, host bool) error {
	ln, err := s.c.Net.Listen(member, port)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.routes[realAddr] = net.JoinHostPort(member, strconv.Itoa(port))
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			s.relay(conn, realAddr, host)
		}
	}()
	return nil
}

// route sends dials of realAddr to member's port on the simulated
// network, where member listens itself (no relay).
func (s *simNet) route(member string, port int, realAddr string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.routes[realAddr] = net.JoinHostPort(member, strconv.Itoa(port))
}

// dialerFrom is the dial function of a member: addresses of the cluster's
// APIs over the simulated network, from the member's place in it; others
// (a registry outside the cluster) directly.
func (s *simNet) dialerFrom(member string) func(ctx context.Context, network, addr string) (net.Conn, error) {
	sim := s.c.Net.DialerFrom(member)
	var direct net.Dialer
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		s.mu.Lock()
		to, ok := s.routes[addr]
		s.mu.Unlock()
		if ok && (network == "tcp" || network == "tcp4") {
			return sim(ctx, "tcp", to)
		}
		return direct.DialContext(ctx, network, addr)
	}
}

// relayConn is one relayed connection: the simulated end and the real one.
type relayConn struct {
	sim, real net.Conn
	host      bool // to a host's API
}

func (s *simNet) relay(sim net.Conn, realAddr string, host bool) {
	s.mu.Lock()
	if s.shut {
		s.mu.Unlock()
		sim.Close()
		return
	}
	rc := &relayConn{sim: sim, host: host}
	s.conns[rc] = struct{}{}
	if host {
		s.calls++
	}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer s.done(rc)
		real, err := net.Dial("tcp", realAddr)
		if err != nil {
			sim.Close()
			return
		}
		s.mu.Lock()
		rc.real = real
		s.mu.Unlock()
		// Requests flow until the caller is done (it half-closes or
		// closes); the server's answers until the server closes, which an
		// HTTP server does once its handler has returned: so a relayed
		// connection ends only when the call it carried is over.
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			io.Copy(real, sim)
			if tc, ok := real.(*net.TCPConn); ok {
				tc.CloseWrite()
			}
		}()
		io.Copy(sim, real)
		sim.Close()
		real.Close()
	}()
}

func (s *simNet) done(rc *relayConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, rc)
	if rc.host {
		s.calls--
	}
	if s.shut && s.calls == 0 {
		select {
		case <-s.idle:
		default:
			close(s.idle)
		}
	}
}

// shutAndWait refuses new relayed connections and waits until those open
// are over (or ctx ends): every call the cluster's parts made to one
// another has then been answered.
func (s *simNet) shutAndWait(ctx context.Context) error {
	s.mu.Lock()
	if !s.shut {
		s.shut = true
		if s.calls == 0 {
			close(s.idle)
		}
	}
	s.mu.Unlock()
	select {
	case <-s.idle:
		return nil
	case <-ctx.Done():
		return errors.New("devcluster: calls between the cluster's parts still running")
	}
}

// close stops listening and cuts every relayed connection.
func (s *simNet) close() {
	s.mu.Lock()
	s.shut = true
	for _, ln := range s.lns {
		ln.Close()
	}
	for rc := range s.conns {
		rc.sim.Close()
		if rc.real != nil {
			rc.real.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
}
