package devcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/proxy"
)

// The client's own address behind the global entry. Each region's edge
// listens on the simulated network too (edgeSimPort of its host), where
// only the cluster's members — the global entry's client points among
// them — can connect: nothing outside the process reaches it. That
// listener is the edge's entry listener (proxy.EntryListener): every
// connection opens with a PROXY protocol v2 header naming the client, which
// the global entry writes as it dials, and the edge takes the client's
// address from it (Fly-Client-IP, X-Forwarded-For). A client cannot forge
// it: the entry writes the header, and the edge's public listener reads
// none. The entry keeps its connections to the edges apart per client
// address (its IP), so a kept-alive connection never carries one
// client's request under another's name.

// entryHeaderTimeout bounds how long an edge waits for the entry's PROXY
// header on a new connection.
const entryHeaderTimeout = 10 * time.Second

// maxEntryClients bounds the client addresses the global entry keeps
// connections for; past it, one is forgotten (its idle connections closed).
const maxEntryClients = 1024

// withEntry adds to a host's public edge listener its entry listener on
// the simulated network; the edge serves both. On error, public is closed.
func (c *Cluster) withEntry(id string, public net.Listener) (net.Listener, error) {
	sim, err := c.Net.Listen(id, edgeSimPort)
	if err != nil {
		public.Close()
		return nil, fmt.Errorf("edge: listen on the simulated network: %w", err)
	}
	return mergeListeners(public, proxy.EntryListener(sim, entryHeaderTimeout)), nil
}

// mergedListener accepts from several listeners; its address is the
// first's. Close closes them all and waits for its accept loops.
type mergedListener struct {
	lns   []net.Listener
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	wg    sync.WaitGroup
}

func mergeListeners(lns ...net.Listener) net.Listener {
	m := &mergedListener{lns: lns, conns: make(chan net.Conn), done: make(chan struct{})}
	for _, ln := range lns {
		m.wg.Go(func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					var te interface{ Temporary() bool }
					if errors.As(err, &te) && te.Temporary() {
						select {
						case <-time.After(5 * time.Millisecond):
							continue
						case <-m.done:
							return
						}
					}
					return // closed: the others go on until Close
				}
				select {
				case m.conns <- c:
				case <-m.done:
					c.Close()
					return
				}
			}
		})
	}
	return m
}

func (m *mergedListener) Accept() (net.Conn, error) {
	select {
	case c := <-m.conns:
		return c, nil
	case <-m.done:
		return nil, net.ErrClosed
	}
}

func (m *mergedListener) Close() error {
	var err error
	m.once.Do(func() {
		close(m.done)
		for _, ln := range m.lns {
			err = errors.Join(err, ln.Close())
		}
	})
	return err
}

func (m *mergedListener) Addr() net.Addr { return m.lns[0].Addr() }

// clientKey carries, in a request's context, the address of the global
// entry's client.
type clientKey struct{}

// entryClients are the global entry's transports to the edges, one per
// client region and client IP: each connection names its client to the
// edge once, in its PROXY header.
type entryClients struct {
	c  *Cluster
	mu sync.Mutex
	m  map[entryClient]*http.Transport
}

type entryClient struct{ from, ip string }

// transport is the RoundTripper of the entry's clients in region from.
func (e *entryClients) transport(from string) http.RoundTripper {
	return roundTripFunc(func(r *http.Request) (*http.Response, error) {
		client, _ := r.Context().Value(clientKey{}).(net.Addr)
		if client == nil {
			return nil, errors.New("global entry: no client address")
		}
		return e.forClient(from, client).RoundTrip(r)
	})
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func (e *entryClients) forClient(from string, client net.Addr) *http.Transport {
	ip := client.String()
	if h, _, err := net.SplitHostPort(ip); err == nil {
		ip = h
	}
	k := entryClient{from, ip}
	e.mu.Lock()
	defer e.mu.Unlock()
	if tr := e.m[k]; tr != nil {
		return tr
	}
	if e.m == nil {
		e.m = map[entryClient]*http.Transport{}
	}
	if len(e.m) >= maxEntryClients {
		for old, tr := range e.m {
			tr.CloseIdleConnections()
			delete(e.m, old)
			break
		}
	}
	dial := e.c.sim.dialerFrom(clientMember(from))
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := dial(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			if _, err := conn.Write(proxy.EntryHeader(client, conn.LocalAddr())); err != nil {
				conn.Close()
				return nil, fmt.Errorf("global entry: PROXY header to %s: %w", addr, err)
			}
			return conn, nil
		},
		MaxIdleConnsPerHost: 32, IdleConnTimeout: 90 * time.Second,
		ResponseHeaderTimeout: 5 * time.Minute,
	}
	e.m[k] = tr
	return tr
}

// closeIdle closes every idle connection to the edges.
func (e *entryClients) closeIdle() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, tr := range e.m {
		tr.CloseIdleConnections()
	}
}
