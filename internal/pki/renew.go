package pki

import (
	"crypto/x509"
	"time"
)

// RenewAt is when a host renews its certificate: two thirds into its life,
// so a third of it is left for the control plane to be reached.
func RenewAt(c *x509.Certificate) time.Time {
	life := c.NotAfter.Sub(c.NotBefore)
	return c.NotBefore.Add(life * 2 / 3)
}

// SaveHostCert replaces the certificate in an identity dir with a renewed
// one for the same key (checked by CheckHostCert).
func SaveHostCert(dir string, certPEM []byte) error {
	return writePrivate(dir, certFile, certPEM)
}
