package proxy

import (
	"context"
	"crypto/subtle"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/pki"
)

// The backhaul's credential. With Config.Identity (a host enrolled with a
// control plane) the hop is mutual TLS with the hosts' own certificates:
// the backhaul listener accepts only a host certificate of the cluster's CA
// that Config.Revoked does not name, and a dial to another host accepts
// only that host's certificate (the id the cluster's facts give for the
// address; any host's of the CA when none does). The HTTP/2 and HTTP/1.1
// pools above it are unchanged: they speak over the TLS connection as over
// a plain one. Without an identity (hosts with no control plane: a dev
// cluster of hosts only, a lone agent) every backhaul request carries the
// hosts' shared token instead.

// mtls reports whether the backhaul runs over mutual TLS.
func (p *Proxy) mtls() bool { return p.cfg.Identity != nil }

// backhaulAuthorized reports whether a backhaul request may be served: over
// mutual TLS the handshake checked the peer; else the token must match.
func (p *Proxy) backhaulAuthorized(r *http.Request) bool {
	if p.mtls() {
		return true
	}
	tok := r.Header.Get(hdrToken)
	return tok != "" && subtle.ConstantTimeCompare([]byte(tok), []byte(p.cfg.Token)) == 1
}

// tlsConn is a backhaul connection over TLS. It is not a *tls.Conn, so
// net/http serves and dials it as a plain connection (HTTP/2 by prior
// knowledge, HTTP/1.1 upgrades) while TLS runs below.
type tlsConn struct {
	net.Conn
	tc  *tls.Conn
	raw net.Conn // below TLS: closed at once, without a close alert
}

// CloseWrite ends the sending side (a raw TCP hop's half close).
func (c *tlsConn) CloseWrite() error { return c.tc.CloseWrite() }

// hostDialer is how the proxy dials other hosts' backhaul listeners: the
// configured dialer, and over mutual TLS a handshake before the connection
// is handed on, so a refused certificate is a failed connect (nothing was
// sent; the next candidate is tried).
func (p *Proxy) hostDialer() DialFunc {
	if !p.mtls() {
		return p.cfg.Dial
	}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := p.cfg.Dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return p.secureHop(ctx, c, p.hostAt(addr))
	}
}

// secureHop runs the client's handshake on a connection dialed to host's
// backhaul ("" when the address names no known host). The host answered the
// connect: the handshake is bounded by ConnectTimeout, not by the
// attempt's connect budget (a few round trips), which a burst of
// handshakes' CPU on a busy host would overrun and take for silence.
func (p *Proxy) secureHop(_ context.Context, c net.Conn, host string) (net.Conn, error) {
	if !p.mtls() {
		return c, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	cfg, err := p.cfg.Identity.BackhaulClientTLS(p.cfg.Revoked, host, time.Now)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("backhaul: %w", err)
	}
	tc := tls.Client(c, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("backhaul handshake: %w", err)
	}
	return &tlsConn{Conn: tc, tc: tc, raw: c}, nil
}

// hostAt is the host whose backhaul the cluster's facts put at addr ("" for
// none, or for more than one).
func (p *Proxy) hostAt(addr string) string {
	st := p.state.Load()
	if st == nil {
		return ""
	}
	found := ""
	for id, a := range st.backhaul {
		if a == addr {
			if found != "" {
				return ""
			}
			found = id
		}
	}
	return found
}

// backhaulListener serves the backhaul over mutual TLS: each accepted
// connection does its handshake on its first read (under the server's
// read deadlines), and connections whose peer's certificate is revoked
// later are closed.
type backhaulListener struct {
	net.Listener
	cfg *tls.Config

	mu    sync.Mutex
	conns map[*tlsConn]struct{}
}

func (p *Proxy) newBackhaulListener(ln net.Listener) net.Listener {
	if !p.mtls() || ln == nil {
		return ln
	}
	bl := &backhaulListener{Listener: ln, cfg: p.cfg.Identity.BackhaulServerTLS(p.cfg.Revoked, time.Now), conns: map[*tlsConn]struct{}{}}
	if p.cfg.Revoked != nil {
		p.cfg.Revoked.OnChange(func() { bl.cutRevoked(p.cfg.Revoked) })
	}
	return bl
}

func (l *backhaulListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := tls.Server(c, l.cfg)
	bc := &trackedConn{tlsConn: tlsConn{Conn: tc, tc: tc, raw: c}, l: l}
	l.mu.Lock()
	l.conns[&bc.tlsConn] = struct{}{}
	l.mu.Unlock()
	return bc, nil
}

// cutRevoked closes the connections of peers whose certificate the list
// now revokes (a certificate its host replaced by renewing keeps the
// connections it has: only new ones are refused).
func (l *backhaulListener) cutRevoked(rev *pki.Revocations) {
	var cut []net.Conn
	l.mu.Lock()
	for c := range l.conns {
		cs := c.tc.ConnectionState()
		if !cs.HandshakeComplete {
			continue
		}
		if e, ok := rev.Lookup(pki.PeerSerial(cs)); ok && !e.Superseded {
			cut = append(cut, c.raw)
		}
	}
	l.mu.Unlock()
	for _, c := range cut {
		c.Close()
	}
}

// trackedConn leaves its listener's set when closed.
type trackedConn struct {
	tlsConn
	l    *backhaulListener
	once sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		delete(c.l.conns, &c.tlsConn)
		c.l.mu.Unlock()
	})
	return c.tlsConn.Close()
}
