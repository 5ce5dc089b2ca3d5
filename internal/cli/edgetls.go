package cli

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"

	"github.com/spf13/pflag"

	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/certstore"
	"github.com/flamehq/flame/internal/devcluster"
	"github.com/flamehq/flame/internal/edgecert"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/proxy"
)

// edgeTLSFlags are the agent's flags for TLS at the edge.
type edgeTLSFlags struct {
	addr, acmeCA, acmeEmail, acmeRoot string
}

func addEdgeTLSFlags(fs *pflag.FlagSet, f *edgeTLSFlags) {
	fs.StringVar(&f.addr, "edge-tls-addr", "", "address of the edge's HTTPS listener (needs --edge-addr; default: none)")
	fs.StringVar(&f.acmeCA, "acme-ca", "", "ACME directory URL the edge obtains the certificates of apps' hostnames from (needs --nats-url: they are kept in the catalog); default: a local CA in <data-dir>/edge-ca signing <app>.<edge-domain>")
	fs.StringVar(&f.acmeEmail, "acme-email", "", "contact of the ACME account")
	fs.StringVar(&f.acmeRoot, "acme-ca-root", "", "PEM file of the roots the ACME directory's HTTPS certificate is checked against (default: the system's)")
}

// buckets are the catalog buckets the edge's ACME needs (none without).
func (f edgeTLSFlags) buckets() []catalog.BucketSpec {
	if f.addr == "" || f.acmeCA == "" {
		return nil
	}
	return certstore.Buckets()
}

func (f edgeTLSFlags) check(a agentFlags) error {
	switch {
	case f.addr != "" && a.edgeAddr == "":
		return errors.New("--edge-tls-addr needs --edge-addr")
	case f.acmeCA != "" && f.addr == "":
		return errors.New("--acme-ca needs --edge-tls-addr")
	case f.acmeCA != "" && a.natsURL == "":
		return errors.New("--acme-ca needs --nats-url (the certificates are kept in the catalog)")
	}
	return nil
}

// setupEdgeTLS opens the HTTPS listener and its certificate source into
// hc.Proxy; the returned func releases what it made.
func setupEdgeTLS(hc *host.Config, a agentFlags, bus *catalog.NATS, log *slog.Logger) (func(), error) {
	f := a.tls
	if f.addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", f.addr)
	if err != nil {
		return nil, fmt.Errorf("edge tls: listen on %s: %w", f.addr, err)
	}
	if f.acmeCA == "" {
		ca, err := edgecert.LoadOrCreateDevCA(filepath.Join(a.dataDir, "edge-ca"), a.edgeDomain)
		if err != nil {
			ln.Close()
			return nil, err
		}
		hc.Proxy.TLS = &proxy.TLSConfig{Listener: ln, GetCertificate: ca.GetCertificate}
		return func() { ln.Close() }, nil
	}
	var roots *x509.CertPool
	if f.acmeRoot != "" {
		pem, err := os.ReadFile(f.acmeRoot)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("--acme-ca-root: %w", err)
		}
		roots = x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			ln.Close()
			return nil, fmt.Errorf("--acme-ca-root: no certificate in %s", f.acmeRoot)
		}
	}
	hb, err1 := bus.Bucket(certstore.BucketHostnames)
	certs, err2 := bus.Bucket(certstore.BucketCerts)
	locks, err3 := bus.Bucket(certstore.BucketLocks)
	if err := errors.Join(err1, err2, err3); err != nil {
		ln.Close()
		return nil, err
	}
	names := certstore.NewHostnames(hb, log)
	st, err := certstore.NewStorage(certstore.StorageConfig{Certs: certs, Locks: locks, Owner: a.hostID, Logger: log})
	if err != nil {
		ln.Close()
		return nil, err
	}
	edgeHost, edgePort, _ := net.SplitHostPort(hc.Proxy.Edge.Addr().String())
	port := func(s string) int { n, _ := strconv.Atoi(s); return n }
	_, tlsPort, _ := net.SplitHostPort(ln.Addr().String())
	acme, err := edgecert.NewACME(edgecert.ACMEConfig{CA: f.acmeCA, Email: f.acmeEmail, TrustedRoots: roots, Storage: st,
		Claimed: names.App, ListenHost: edgeHost, HTTPPort: port(edgePort), TLSPort: port(tlsPort), Logger: log})
	if err != nil {
		ln.Close()
		return nil, err
	}
	names.Start()
	hc.Proxy.Hostnames = names.App
	hc.Proxy.TLS = &proxy.TLSConfig{Listener: ln, GetCertificate: acme.GetCertificate, ACME: true, HTTPChallenge: acme.HTTPChallenge}
	return func() {
		ln.Close()
		acme.Close()
		names.Close()
		st.Close()
	}, nil
}

// defaultEdgeTLSAddr is flame dev's first HTTPS edge.
const defaultEdgeTLSAddr = "127.0.0.1:4390"

// printHTTPSEdges lists flame dev's HTTPS edges and the CA a client trusts.
func printHTTPSEdges(w io.Writer, dev *devcluster.Cluster) {
	for _, h := range dev.Hosts {
		if h.EdgeTLSAddr != "" {
			fmt.Fprintf(w, "  HTTPS %-7s https://<app>.%s/   (on %s)\n", h.Region, edgeHost(h.EdgeTLSAddr), h.ID)
		}
	}
	if p := dev.CAPath(); p != "" {
		fmt.Fprintf(w, "  CA            %s   (curl --cacert; the HTTPS edges' certificates chain to it)\n", p)
	}
}
