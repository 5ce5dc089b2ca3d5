package server

import (
	"crypto/tls"
	"net"
)

// The public API over TLS: with PlaneConfig.TLS the plane serves HTTPS
// (HTTP/1.1 and HTTP/2) on its listener, and its URL says so. `flame
// server` loads the certificate and key from files (--tls-cert,
// --tls-key) or, in dev, serves plain HTTP (--plain-http).

// apiListener is the listener the API is served on.
func apiListener(cfg PlaneConfig) net.Listener {
	if cfg.TLS == nil {
		return cfg.Listener
	}
	c := cfg.TLS.Clone()
	if len(c.NextProtos) == 0 {
		c.NextProtos = []string{"h2", "http/1.1"}
	}
	if c.MinVersion == 0 {
		c.MinVersion = tls.VersionTLS12
	}
	return tls.NewListener(cfg.Listener, c)
}

func apiScheme(overTLS bool) string {
	if overTLS {
		return "https"
	}
	return "http"
}
