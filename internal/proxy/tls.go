package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// TLS at the edge. A host given an HTTPS listener (TLSConfig.Listener)
// terminates TLS there with the certificate its GetCertificate returns for
// the client's SNI — an ACME certificate of a hostname an app claimed, or
// in `flame dev` one of the local CA (package edgecert) — and serves what
// is inside exactly as the plain edge serves HTTP: a connection whose ALPN
// chose h2 goes to the net/http server (HTTP/2 over TLS), any other
// (http/1.1, or no ALPN) starts on the fast path, which hands the cases it
// does not serve to net/http as on a plain connection. A request that came
// over TLS routes by the services' TLS port (443: `ports = [{port = 443,
// handlers = ["tls", "http"]}]`), is forwarded with X-Forwarded-Proto:
// https and that port, and is never redirected by force_https. A
// connection that negotiated acme-tls/1 is a CA validating a TLS-ALPN-01
// challenge: the handshake (its certificate) was the answer, and it is
// closed.

// DefaultTLSPort is the public port HTTPS stands for.
const DefaultTLSPort = 443

// acmeTLSProto is the ALPN protocol of the TLS-ALPN-01 challenge.
const acmeTLSProto = "acme-tls/1"

// acmeChallengePath is where HTTP-01 challenges are asked.
const acmeChallengePath = "/.well-known/acme-challenge/"

// TLSConfig configures the edge's HTTPS listener.
type TLSConfig struct {
	// Listener is the HTTPS listener (plain TCP: the edge does the
	// handshake).
	Listener net.Listener
	// Port is the public port it stands for (default 443): the services'
	// port its requests route by, and X-Forwarded-Port.
	Port int
	// RedirectPort is the port force_https redirects to (default Port;
	// 443 is left out of the URL). `flame dev` sets its listener's.
	RedirectPort int
	// GetCertificate returns the certificate for a client's hello (its SNI),
	// or an error when the edge has none for that name. Required.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// ACME adds the acme-tls/1 protocol, for a GetCertificate that answers
	// TLS-ALPN-01 challenges (certmagic's does).
	ACME bool
	// HTTPChallenge answers an ACME HTTP-01 request on the plain edge
	// (reporting whether it did); nil: such requests route as any other.
	HTTPChallenge func(w http.ResponseWriter, r *http.Request) bool
}

func (c *TLSConfig) setDefaults() {
	if c.Port == 0 {
		c.Port = DefaultTLSPort
	}
	if c.RedirectPort == 0 {
		c.RedirectPort = c.Port
	}
}

func (c *TLSConfig) validate() error {
	switch {
	case c.Listener == nil:
		return errors.New("proxy: tls: a listener is required")
	case c.GetCertificate == nil:
		return errors.New("proxy: tls: a certificate source is required")
	case c.Port < 1 || c.Port > 65535 || c.RedirectPort < 1 || c.RedirectPort > 65535:
		return fmt.Errorf("proxy: tls: port %d or redirect port %d is not between 1 and 65535", c.Port, c.RedirectPort)
	}
	return nil
}

// tlsServerConfig is the edge's crypto/tls configuration: TLS 1.2 and
// later, HTTP/2 preferred.
func (c *TLSConfig) tlsServerConfig() *tls.Config {
	protos := []string{"h2", "http/1.1"}
	if c.ACME {
		protos = append(protos, acmeTLSProto)
	}
	return &tls.Config{GetCertificate: c.GetCertificate, NextProtos: protos, MinVersion: tls.VersionTLS12}
}

// secureKey marks, in a request's context, a connection that came over TLS
// and was handed to net/http by the fast path (net/http sees the wrapper,
// not the *tls.Conn, so r.TLS is nil there).
type secureKey struct{}

// secureConn marks ctx when c is (or wraps) a TLS connection.
func secureConn(ctx context.Context, c net.Conn) context.Context {
	if rc, ok := c.(*replayConn); ok {
		c = rc.Conn
	}
	if _, ok := c.(*tls.Conn); ok {
		return context.WithValue(ctx, secureKey{}, true)
	}
	return ctx
}

// secure reports whether r came over TLS.
func secure(r *http.Request) bool {
	return r.TLS != nil || r.Context().Value(secureKey{}) != nil
}

// publicPort is the port a request stands for: the TLS port over TLS.
func (p *Proxy) publicPort(overTLS bool) int {
	if overTLS && p.cfg.TLS != nil {
		return p.cfg.TLS.Port
	}
	return p.cfg.Port
}

// appFor returns the app a Host header names: <app>.<domain>, or a
// hostname an app claimed.
func (p *Proxy) appFor(host string) (string, bool) {
	if app, ok := appOf(host, p.cfg.Domain); ok {
		return app, true
	}
	if p.cfg.Hostnames == nil {
		return "", false
	}
	return p.cfg.Hostnames(hostOnly(host))
}

// hostOnly is host without its port and final dot, in lower case
// (allocating only when it had capitals).
func hostOnly(host string) string {
	if strings.IndexByte(host, ':') >= 0 {
		if h, _, err := net.SplitHostPort(host); err == nil {
			host = h
		}
	}
	host = strings.TrimSuffix(host, ".")
	for i := 0; i < len(host); i++ {
		if c := host[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(host)
		}
	}
	return host
}

// httpsURL is where force_https sends a request for host and uri.
func (p *Proxy) httpsURL(host, uri string) string {
	host = hostOnly(host)
	if p.cfg.TLS != nil && p.cfg.TLS.RedirectPort != DefaultTLSPort {
		host = net.JoinHostPort(host, strconv.Itoa(p.cfg.TLS.RedirectPort))
	}
	return "https://" + host + uri
}

// acmeChallenge answers an HTTP-01 challenge request, if it is one the
// certificate source knows.
func (p *Proxy) acmeChallenge(w http.ResponseWriter, r *http.Request) bool {
	if !p.wantsChallenge(r.Host, r.URL.Path) {
		return false
	}
	return p.cfg.TLS.HTTPChallenge(w, r)
}

// wantsChallenge reports whether a request (its Host and path) may be an
// HTTP-01 challenge: one for a claimed hostname, so that a client asking
// any other name under that path costs no look-up in the shared storage.
func (p *Proxy) wantsChallenge(host, path string) bool {
	if p.cfg.TLS == nil || p.cfg.TLS.HTTPChallenge == nil || p.cfg.Hostnames == nil || !strings.HasPrefix(path, acmeChallengePath) {
		return false
	}
	_, ok := p.cfg.Hostnames(hostOnly(host))
	return ok
}

// handshake runs a TLS connection's handshake under the header timeout
// and reports what comes next: the fast path (false, nil), net/http's
// HTTP/2 (true, nil), or nothing (an error: a failed handshake, or an
// acme-tls/1 validation, which the handshake answered).
func (fc *fastConn) handshake(tc *tls.Conn) (h2 bool, err error) {
	p := fc.e.p
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ReadHeaderTimeout)
	defer cancel()
	tc.SetDeadline(time.Now().Add(p.cfg.ReadHeaderTimeout))
	err = tc.HandshakeContext(ctx)
	tc.SetDeadline(time.Time{})
	if err != nil {
		p.log.Debug("tls handshake", "client", fc.clientIP, "err", err)
		return false, err
	}
	switch tc.ConnectionState().NegotiatedProtocol {
	case "h2":
		return true, nil
	case acmeTLSProto:
		return false, errors.New("acme-tls/1 validation answered")
	}
	return false, nil
}

// listener is the HTTPS listener (nil without TLS).
func (c *TLSConfig) listener() net.Listener {
	if c == nil {
		return nil
	}
	return c.Listener
}

// TLSAddr is the HTTPS listener's address ("" without one).
func (p *Proxy) TLSAddr() string {
	if p.cfg.TLS == nil {
		return ""
	}
	return p.cfg.TLS.Listener.Addr().String()
}

// handOffTLS gives net/http a TLS connection as it is (no bytes read past
// the handshake), so that it serves the HTTP/2 its ALPN chose.
func (e *edgeServer) handOffTLS(c *tls.Conn) {
	select {
	case e.handed.conns <- c:
	case <-e.handed.done:
		c.Close()
	}
}
