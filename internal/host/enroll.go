package host

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/pki"
)

// IdentityDir is where a host keeps its identity: its key (made there, never
// sent anywhere), its certificate, the CA's and the last revocation list
// the control plane pushed, each readable by the owner only.
func IdentityDir(dataDir string) string { return filepath.Join(dataDir, "identity") }

// LoadIdentity reads the identity a host enrolled with before, or nil when
// it has none yet.
func LoadIdentity(dataDir string) (*pki.HostIdentity, error) {
	id, err := pki.LoadHostIdentity(IdentityDir(dataDir))
	if errors.Is(err, pki.ErrNotEnrolled) {
		return nil, nil
	}
	return id, err
}

// Enrollment is what a host enrolls with.
type Enrollment struct {
	DataDir string
	// PlaneURL is the control plane's API (http://host:port).
	PlaneURL string
	// JoinToken is the one-time token an admin minted.
	JoinToken string
	// HostID, Region and APIAddr are what the host enrolls as: APIAddr is
	// the only address the control plane will call it at.
	HostID, Region, APIAddr string
	// HTTPClient reaches the control plane (nil: a default client).
	HTTPClient *http.Client
}

// Enroll gets the host its certificate: a fresh key in the identity dir, a
// request for it sent with a proof of the join token (never the token's
// secret), and the answer kept only if it comes from the CA the token
// names, for this host and this key.
func Enroll(ctx context.Context, e Enrollment) (*pki.HostIdentity, error) {
	tok, err := pki.ParseJoinToken(e.JoinToken)
	if err != nil {
		return nil, err
	}
	dir := IdentityDir(e.DataDir)
	key, err := pki.HostKey(dir)
	if err != nil {
		return nil, fmt.Errorf("enroll: host key: %w", err)
	}
	csr, err := pki.NewCSR(key, pki.RoleHost, e.HostID)
	if err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	claim := pki.EnrollClaim{TokenID: tok.ID, HostID: e.HostID, Region: e.Region, APIAddr: e.APIAddr, CSR: csr}
	c := api.NewClient(e.PlaneURL, "")
	if e.HTTPClient != nil {
		c.HTTPClient = e.HTTPClient
	}
	resp, err := c.EnrollHost(ctx, api.EnrollHostInput{TokenID: tok.ID, HostID: e.HostID, Region: e.Region,
		APIAddr: e.APIAddr, CSR: csr, Proof: pki.Proof(tok.Secret, claim)})
	if err != nil {
		return nil, fmt.Errorf("enroll at %s: %w", e.PlaneURL, err)
	}
	if _, _, err := pki.CheckHostCert([]byte(resp.CA), []byte(resp.Certificate), tok.CAFingerprint, e.HostID, key, time.Now()); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if resp.Gossip != nil {
		if err := checkGossipTrust(resp.Gossip); err != nil {
			return nil, fmt.Errorf("enroll: the control plane's gossip trust: %w", err)
		}
		if err := saveGossipTrust(e.DataDir, resp.Gossip); err != nil {
			return nil, fmt.Errorf("enroll: %w", err)
		}
	}
	if err := pki.SaveHostIdentity(dir, []byte(resp.CA), []byte(resp.Certificate)); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if err := saveNATSCredential(dir, resp.NATSCredential, resp.NATSCA); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	// Where the certificate is renewed, on later starts too.
	if err := atomicfile.Write(filepath.Join(dir, planeURLFile), []byte(e.PlaneURL+"\n"), dir); err != nil {
		return nil, fmt.Errorf("enroll: %w", err)
	}
	if err := savePlace(e.DataDir, resp.Network, resp.HostNumber); err != nil {
		return nil, err
	}
	return pki.LoadHostIdentity(dir)
}

// planeURLFile keeps the control plane's API the host enrolled with.
const planeURLFile = "plane-url"

// EnrolledWith is the control plane's API the host in dataDir enrolled
// with ("" when unknown).
func EnrolledWith(dataDir string) string {
	b, err := os.ReadFile(filepath.Join(IdentityDir(dataDir), planeURLFile))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// DataDir is where the host keeps its state.
func (h *Host) DataDir() string { return h.cfg.DataDir }

// The host's credential on the catalog's NATS, in its identity dir.
const (
	natsSeedFile = "nats.seed"
	natsCAFile   = "nats-ca.pem"
)

// saveNATSCredential keeps what enrollment gave for the catalog's NATS,
// readable by the owner only; an enrollment without (an external NATS)
// removes an older one.
func saveNATSCredential(dir, seed, caPEM string) error {
	if seed == "" || caPEM == "" {
		for _, f := range []string{natsSeedFile, natsCAFile} {
			if err := os.Remove(filepath.Join(dir, f)); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
		}
		return nil
	}
	for _, f := range []struct{ name, data string }{{natsCAFile, caPEM}, {natsSeedFile, seed + "\n"}} {
		path := filepath.Join(dir, f.name)
		if err := atomicfile.Write(path, []byte(f.data), dir); err != nil {
			return fmt.Errorf("write %s: %w", path, err)
		}
		if err := os.Chmod(path, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// NATSCredential is the credential an enrolled host has on the catalog's
// NATS: the file of its nkey seed and the CA (PEM) the server's
// certificate chains to; ok is false when enrollment gave none.
func NATSCredential(dataDir string) (seedFile string, caPEM []byte, ok bool, err error) {
	dir := IdentityDir(dataDir)
	seedFile = filepath.Join(dir, natsSeedFile)
	if _, err := os.Stat(seedFile); errors.Is(err, os.ErrNotExist) {
		return "", nil, false, nil
	} else if err != nil {
		return "", nil, false, err
	}
	if caPEM, err = os.ReadFile(filepath.Join(dir, natsCAFile)); err != nil {
		return "", nil, false, err
	}
	return seedFile, caPEM, true, nil
}
