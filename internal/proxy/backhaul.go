package proxy

import (
	"context"
	"net"
	"net/http"
	"sync"
	"time"
)

// The backhaul between hosts' proxies is multiplexed: requests go as
// HTTP/2 streams (unencrypted, prior knowledge: the hop is between the
// cluster's own hosts; the private mesh will encrypt it) over a few pooled
// connections per host, so hundreds of concurrent requests to one host share
// them instead of opening hundreds. A request that switches protocols (a
// WebSocket upgrade) needs HTTP/1.1's upgrade, which HTTP/2 does not have:
// it goes over a separate pool of HTTP/1.1 connections, and each raw TCP
// hop dials its own connection (tcp.go). The backhaul listener speaks both.

// backhaulProtocols are what the backhaul listener accepts.
func backhaulProtocols() *http.Protocols {
	var ps http.Protocols
	ps.SetHTTP1(true)
	ps.SetUnencryptedHTTP2(true)
	return &ps
}

// hostTransports builds the two pools to other hosts' backhaul listeners:
// multiplexed HTTP/2 for requests, HTTP/1.1 for upgrades.
func (p *Proxy) hostTransports() (mux, upgrade *http.Transport) {
	// The far proxy times its machine out first and says so.
	timeout := p.cfg.ResponseHeaderTimeout + time.Second
	mux = p.transport(p.dialHost, 256, timeout)
	mux.Protocols = new(http.Protocols)
	mux.Protocols.SetUnencryptedHTTP2(true)
	// A request finding every pooled connection's streams taken (250 on
	// each, the far server's limit) dials another; so does each request
	// that comes before the first connection to a host is up. No cap on
	// connections: requests waiting for a slot would wait on each other's
	// connect timeouts when the host went silent.
	mux.HTTP2 = &http.HTTP2Config{
		// A connection gone silent is found by pings and closed, so the
		// requests after it dial afresh.
		SendPingTimeout: 15 * time.Second,
		PingTimeout:     5 * time.Second,
	}
	upgrade = p.transport(p.dialHost, 256, timeout)
	return mux, upgrade
}

// hostTransport is the pool a request to another host goes over.
func (p *Proxy) hostTransport(h http.Header) *http.Transport {
	if upgradeOf(h) != "" {
		return p.toHostsUpgrade
	}
	return p.toHosts
}

// connStates follows the backhaul listener's connections: HTTP/2 ones are
// active while a stream is open and idle between, HTTP/1.1 ones while a
// request is.
type connStates struct {
	mu sync.Mutex
	m  map[net.Conn]http.ConnState
}

func (c *connStates) hook(conn net.Conn, s http.ConnState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = map[net.Conn]http.ConnState{}
	}
	if s == http.StateClosed || s == http.StateHijacked {
		delete(c.m, conn)
		return
	}
	c.m[conn] = s
}

// busy reports whether a request is in flight on any connection.
func (c *connStates) busy() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.m {
		if s == http.StateActive {
			return true
		}
	}
	return false
}

// shutdownBackhaul stops the backhaul server: no new connection or stream,
// the requests in flight finish (until ctx ends), then every connection
// closes at once — HTTP/2's graceful shutdown would hold each idle
// connection a second more for its peer to hang up, and the peers' pools
// only redial elsewhere.
func (p *Proxy) shutdownBackhaul(ctx context.Context, srv *http.Server) {
	done := make(chan error, 1)
	go func() { done <- srv.Shutdown(ctx) }()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			if p.backhaulConns.busy() {
				continue
			}
		case <-ctx.Done():
		}
		srv.Close()
		<-done
		return
	}
}
