package pki

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"time"
)

// The backhaul between hosts' proxies runs over mutual TLS with the hosts'
// own certificates: each end presents its host certificate and accepts only
// another host certificate of the same CA that the revocation list does not
// name. Nothing else is asked of a peer: any enrolled host may hand any
// other a request for one of its machines.

// BackhaulServerTLS is the TLS of a host's backhaul listener: the host's
// certificate, and only clients presenting a host certificate of its CA
// not listed in rev. Before enrollment every handshake fails.
func (s *Slot) BackhaulServerTLS(rev *Revocations, now func() time.Time) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			id := s.Get()
			if id == nil {
				return nil, ErrNotEnrolled
			}
			roots := id.Roots()
			return &tls.Config{
				MinVersion:   tls.VersionTLS13,
				Certificates: []tls.Certificate{id.Cert},
				ClientAuth:   tls.RequireAnyClientCert,
				// Tickets would resume a session without a certificate:
				// every connection shows one (VerifyConnection checks
				// resumed ones too, but a revoked key could still resume).
				SessionTicketsDisabled: true,
				VerifyConnection: func(cs tls.ConnectionState) error {
					// Host certificates issued before hosts were
					// clients too name server auth only: the role
					// the certificate names is what counts.
					return verifyPeerHost(roots, rev, cs, x509.ExtKeyUsageAny, "", now())
				},
			}, nil
		},
	}
}

// BackhaulClientTLS is the TLS of a dial to another host's backhaul: it
// presents the host's certificate and accepts only a host certificate of
// its CA not listed in rev, naming wantHost when set.
func (s *Slot) BackhaulClientTLS(rev *Revocations, wantHost string, now func() time.Time) (*tls.Config, error) {
	id := s.Get()
	if id == nil {
		return nil, ErrNotEnrolled
	}
	roots := id.Roots()
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		// Verified by VerifyConnection: a host is named by its id, not by
		// the address it is reached at.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if cur := s.Get(); cur != nil {
				return &cur.Cert, nil
			}
			return nil, ErrNotEnrolled
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyPeerHost(roots, rev, cs, x509.ExtKeyUsageServerAuth, wantHost, now())
		},
	}, nil
}

func verifyPeerHost(roots *x509.CertPool, rev *Revocations, cs tls.ConnectionState, usage x509.ExtKeyUsage, want string, now time.Time) error {
	leaf, id, err := Verify(roots, cs.PeerCertificates, RoleHost, usage, now)
	if err != nil {
		return err
	}
	if want != "" && id != want {
		return fmt.Errorf("%w: expected host %s, the certificate names %s", ErrIdentity, want, id)
	}
	return rev.Check(leaf)
}

// PeerSerial is the serial of the certificate a finished handshake's peer
// showed ("" when none).
func PeerSerial(cs tls.ConnectionState) string {
	if len(cs.PeerCertificates) == 0 {
		return ""
	}
	return Serial(cs.PeerCertificates[0])
}
