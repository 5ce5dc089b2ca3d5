package devcluster

import (
	"fmt"
	"net"
	"path/filepath"
	"slices"

	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/proxy"
)

// HTTPS at the edges. With Config.EdgeTLSAddr every region's edge has an
// HTTPS listener too (the first region's at that address, the next regions'
// at the following ports), serving <app>.<EdgeDomain> with certificates of
// a local CA made in the cluster's directory (ca/ca.pem: what a client
// trusts, `curl --cacert`), without ACME. A port with force_https
// redirects to the region's HTTPS listener.

// CAPath is the file of the CA the HTTPS edges' certificates chain to (""
// without HTTPS edges).
func (c *Cluster) CAPath() string {
	if c.devCA == nil {
		return ""
	}
	return c.devCA.Path()
}

// CA is the CA of the HTTPS edges (nil without).
func (c *Cluster) CA() *edgecert.DevCA { return c.devCA }

// edgeTLS opens the HTTPS listener of region's edge.
func (c *Cluster) edgeTLS(region string) (*proxy.TLSConfig, error) {
	if c.devCA == nil {
		domain := c.cfg.EdgeDomain
		if domain == "" {
			domain = proxy.DefaultDomain
		}
		ca, err := edgecert.LoadOrCreateDevCA(filepath.Join(c.cfg.Dir, "ca"), domain)
		if err != nil {
			return nil, err
		}
		c.devCA = ca
	}
	h, port, err := splitPort(c.cfg.EdgeTLSAddr)
	if err != nil {
		return nil, fmt.Errorf("edge tls address: %w", err)
	}
	addr := nextAddr(h, port, slices.Index(c.cfg.Regions, region))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("edge tls: listen on %s: %w", addr, err)
	}
	return &proxy.TLSConfig{Listener: ln, RedirectPort: ln.Addr().(*net.TCPAddr).Port, GetCertificate: c.devCA.GetCertificate}, nil
}
