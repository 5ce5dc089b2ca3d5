package devcluster

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/server"
)

// EnrollWith enrolls every host with the control plane s serving at
// planeURL, as `flame agent` does: a join token minted for the host, then
// the enrollment call over the plane's API (the host's key made in its data
// dir, or the one it has). A host enrolled by an earlier start is enrolled
// again, as its address may have changed. HostClient then holds s's
// certificate.
func (c *Cluster) EnrollWith(ctx context.Context, s *server.Server, planeURL string) error {
	c.enroller.Store(s)
	for _, h := range c.Hosts {
		if h.identity == nil {
			continue
		}
		tok, err := s.MintJoinToken(ctx, h.ID, time.Minute)
		if err != nil {
			return fmt.Errorf("join token for %s: %w", h.ID, err)
		}
		id, err := host.Enroll(ctx, host.Enrollment{DataDir: c.hostDir(h.ID), PlaneURL: planeURL,
			JoinToken: tok.Token, HostID: h.ID, Region: h.Region, APIAddr: h.Addr()})
		if err != nil {
			return fmt.Errorf("host %s: %w", h.ID, err)
		}
		if err := h.Enrolled(id); err != nil {
			return fmt.Errorf("host %s: %w", h.ID, err)
		}
	}
	return nil
}

func (c *Cluster) hostDir(id string) string { return filepath.Join(c.cfg.Dir, id) }

// HostClient is a client of a host's own Machines API: with a control
// plane, over mutual TLS with the control plane's certificate, checking the
// host's (what an operator's tool would hold); without one, with the
// hosts' token.
func (c *Cluster) HostClient(h *Host) *api.Client {
	if h.identity == nil {
		return api.NewClient(h.APIURL, c.cfg.Token)
	}
	cl := api.NewClient(h.APIURL, "")
	s := c.enroller.Load()
	if s == nil { // not enrolled yet: nothing would be accepted
		return cl
	}
	cl.HTTPClient = c.hostClients.get(h.ID, func() *http.Transport {
		return &http.Transport{TLSClientConfig: s.ControlTLS(h.ID), MaxIdleConnsPerHost: 32, IdleConnTimeout: 90 * time.Second}
	})
	return cl
}

// hostClients keeps one transport per host, so clients handed out reuse
// connections; Close closes them.
type hostClients struct {
	mu sync.Mutex
	m  map[string]*http.Transport
}

func (hc *hostClients) get(id string, mk func() *http.Transport) *http.Client {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	if hc.m == nil {
		hc.m = map[string]*http.Transport{}
	}
	tr := hc.m[id]
	if tr == nil {
		tr = mk()
		hc.m[id] = tr
	}
	return &http.Client{Transport: tr}
}

func (hc *hostClients) close() {
	hc.mu.Lock()
	defer hc.mu.Unlock()
	for _, tr := range hc.m {
		tr.CloseIdleConnections()
	}
}

// apiAddr is the host:port of a host's API URL, plain or over TLS.
func apiAddr(url string) string {
	return strings.TrimPrefix(strings.TrimPrefix(url, "http://"), "https://")
}
