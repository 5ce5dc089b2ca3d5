package devcluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/httpserve"
)

// The global entry stands for anycast: one address in front of every
// region's edge, which hands each request to the edge nearest to its
// client. Where the client is comes from Config.ClientRegion, or per
// request from the ClientRegionHeader header. Every region of the world
// has a client's point on the simulated network ("client-<code>"), and the
// entry reaches the chosen edge from there, so the hop from the client to
// its edge costs what it would across the world; the edge takes it from
// there as for any client.
//
// The choice is made per request, not per connection: the header names
// the client per request, and one client's keep-alive connection may carry
// requests from several places in a test. An upgraded request (WebSocket)
// is relayed as it is by httputil.ReverseProxy, both ways, once the edge
// agrees.

// ClientRegionHeader tells the global entry where the client of a request
// is (a region code); without it, Config.ClientRegion.
const ClientRegionHeader = "flame-client-region"

// edgeSimPort is where a region's edge also listens on the simulated
// network, relaying to its real listener, for the global entry.
const edgeSimPort = 443

// clientMember is the client's point on the simulated network in region.
func clientMember(region string) string { return "client-" + region }

// global is the running global entry.
type global struct {
	srv     *http.Server
	ln      net.Listener
	client  string                                       // the default client region
	order   map[string][]string                          // client region → regions of the edges, nearest first
	proxies map[string]map[string]*httputil.ReverseProxy // client region → edge region → proxy
	known   string                                       // the client regions, for errors
	clients *entryClients                                // the connections to the edges, per client (entry.go)

	// down is closed, per edge region, once that edge's host was killed
	// (faults.go): the entry hands it nothing more, and what is in flight
	// through it is cut.
	mu   sync.Mutex
	down map[string]chan struct{}
}

// attemptKey carries, in a request's context, where the entry's error
// handler leaves a failure the entry may retry elsewhere.
type attemptKey struct{}

type attempt struct {
	edgeDown   <-chan struct{}
	replayable bool // an idempotent request without a body
	retry      bool // it failed because its edge died: send it to the next
}

// startGlobal listens on addr and serves the global entry in front of
// edges (region → real address of its edge).
func (c *Cluster) startGlobal(addr, client string, edges map[string]string) (*global, error) {
	if len(edges) == 0 {
		return nil, errors.New("no edge to hand requests to")
	}
	codes := make([]string, 0, len(edges))
	for r := range edges {
		codes = append(codes, r)
	}
	g := &global{client: client, order: map[string][]string{},
		proxies: map[string]map[string]*httputil.ReverseProxy{}, down: map[string]chan struct{}{},
		clients: &entryClients{c: c}}
	for _, r := range codes {
		g.down[r] = make(chan struct{})
	}
	var known []string
	for _, from := range geo.All() {
		known = append(known, from.Code)
		g.order[from.Code] = geo.Nearest(from, codes)
		tr := g.clients.transport(from.Code)
		g.proxies[from.Code] = map[string]*httputil.ReverseProxy{}
		for _, near := range codes {
			target := &url.URL{Scheme: "http", Host: edges[near]}
			g.proxies[from.Code][near] = &httputil.ReverseProxy{
				Rewrite: func(pr *httputil.ProxyRequest) {
					pr.SetURL(target)
					pr.Out.Host = pr.In.Host // the edge routes by the app's name
					pr.Out.Header.Del(ClientRegionHeader)
				},
				Transport: tr,
				ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
					if a, ok := r.Context().Value(attemptKey{}).(*attempt); ok && a.replayable {
						select {
						case <-a.edgeDown:
							a.retry = true
							return // ServeHTTP sends it to the next edge
						default:
						}
					}
					http.Error(w, fmt.Sprintf("global entry: the %s edge: %v", near, err), http.StatusBadGateway)
				},
			}
		}
	}
	g.known = strings.Join(known, ", ")
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		g.close()
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	g.ln = ln
	g.srv = httpserve.New(g, httpserve.Limits{})
	go g.srv.Serve(ln)
	return g, nil
}

// edgeDown withdraws a region's edge: its host was killed.
func (g *global) edgeDown(region string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if ch, ok := g.down[region]; ok {
		select {
		case <-ch:
		default:
			close(ch)
		}
	}
}

// edgeUp hands a region's edge requests again: its host was revived.
// Idle connections from before are not reused: the dead edge never closed
// them (entry.go).
func (g *global) edgeUp(region string) {
	g.clients.closeIdle()
	g.mu.Lock()
	defer g.mu.Unlock()
	if ch, ok := g.down[region]; ok {
		select {
		case <-ch:
			g.down[region] = make(chan struct{})
		default:
		}
	}
}

// live returns the channel closed when a region's edge goes down, and
// whether it is up now.
func (g *global) live(region string) (<-chan struct{}, bool) {
	g.mu.Lock()
	ch := g.down[region]
	g.mu.Unlock()
	select {
	case <-ch:
		return ch, false
	default:
		return ch, true
	}
}

func (g *global) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	from := g.client
	if v := r.Header.Values(ClientRegionHeader); len(v) > 0 {
		from = strings.ToLower(strings.TrimSpace(v[0]))
		if _, ok := g.proxies[from]; !ok || len(v) > 1 {
			if len(from) > 16 {
				from = from[:16] + "…"
			}
			http.Error(w, fmt.Sprintf("global entry: unknown client region %q in %s: known regions are %s",
				from, ClientRegionHeader, g.known), http.StatusBadRequest)
			return
		}
	}
	// The nearest edge that is up. A request in flight through an edge
	// that dies is cut, as the connection to a dead point of presence is;
	// an idempotent one without a body is sent again to the next nearest
	// edge, as a client retries it.
	replayable := r.Body == nil || r.Body == http.NoBody || r.ContentLength == 0
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
	default:
		replayable = false
	}
	// The edge is told who the client is (entry.go).
	var client net.Addr = &net.TCPAddr{}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		client = net.TCPAddrFromAddrPort(ap)
	}
	for _, near := range g.order[from] {
		down, up := g.live(near)
		if !up {
			continue
		}
		// Cut only while the edge has not started answering: bytes that
		// arrived before it died are on this side of it.
		ctx, cancel := context.WithCancel(r.Context())
		var answering atomic.Bool
		ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotFirstResponseByte: func() { answering.Store(true) }})
		stop := context.AfterFunc(chanContext(down), func() {
			if !answering.Load() {
				cancel()
			}
		})
		a := &attempt{edgeDown: down, replayable: replayable}
		ctx = context.WithValue(ctx, clientKey{}, client)
		rr := r.WithContext(context.WithValue(ctx, attemptKey{}, a))
		g.proxies[from][near].ServeHTTP(w, rr)
		stop()
		cancel()
		if !a.retry {
			return
		}
	}
	http.Error(w, "global entry: no edge is up", http.StatusBadGateway)
}

// chanContext is a context done when its channel is closed.
type chanContext <-chan struct{}

func (c chanContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c chanContext) Done() <-chan struct{}       { return c }
func (c chanContext) Err() error {
	select {
	case <-c:
		return context.Canceled
	default:
		return nil
	}
}
func (c chanContext) Value(any) any { return nil }

// close stops listening and cuts what is in flight.
func (g *global) close() error {
	var err error
	if g.srv != nil {
		err = g.srv.Close()
	}
	g.clients.closeIdle()
	return err
}
