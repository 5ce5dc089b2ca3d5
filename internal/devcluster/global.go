package devcluster

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"time"

	"github.com/flamehq/flame/internal/geo"
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
	client  string                            // the default client region
	proxies map[string]*httputil.ReverseProxy // by client region
	edgeOf  map[string]string                 // client region → region of the nearest edge
	known   string                            // the client regions, for errors
	trs     []*http.Transport
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
	g := &global{client: client, proxies: map[string]*httputil.ReverseProxy{}, edgeOf: map[string]string{}}
	var known []string
	for _, from := range geo.All() {
		known = append(known, from.Code)
		near := geo.Nearest(from, codes)[0]
		g.edgeOf[from.Code] = near
		target := &url.URL{Scheme: "http", Host: edges[near]}
		tr := &http.Transport{
			DialContext:         c.sim.dialerFrom(clientMember(from.Code)),
			MaxIdleConnsPerHost: 32, IdleConnTimeout: 90 * time.Second,
			ResponseHeaderTimeout: 5 * time.Minute,
		}
		g.trs = append(g.trs, tr)
		g.proxies[from.Code] = &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(target)
				pr.Out.Host = pr.In.Host // the edge routes by the app's name
				pr.Out.Header.Del(ClientRegionHeader)
			},
			Transport: tr,
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				http.Error(w, fmt.Sprintf("global entry: the %s edge: %v", near, err), http.StatusBadGateway)
			},
		}
	}
	g.known = strings.Join(known, ", ")
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		g.close()
		return nil, fmt.Errorf("listen on %s: %w", addr, err)
	}
	g.ln = ln
	g.srv = &http.Server{
		Handler:           g,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
	go g.srv.Serve(ln)
	return g, nil
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
	g.proxies[from].ServeHTTP(w, r)
}

// close stops listening and cuts what is in flight.
func (g *global) close() error {
	var err error
	if g.srv != nil {
		err = g.srv.Close()
	}
	for _, tr := range g.trs {
		tr.CloseIdleConnections()
	}
	return err
}
