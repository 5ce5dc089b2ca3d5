package host

import (
	"crypto/ecdsa"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/atomicfile"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/httpapi"
	"github.com/flamehq/flame/internal/pki"
)

// gossipFile holds, in the identity dir (owner only), the gossip keyring
// and revoked serials the control plane last gave this host.
const gossipFile = "gossip.json"

// maxGossipTrustBody bounds PUT /v1/cluster/trust.
const maxGossipTrustBody = 4 << 20

// LoadGossipTrust reads the gossip trust kept in the data dir, or nil when
// there is none (a host without a control plane).
func LoadGossipTrust(dataDir string) (*api.GossipTrust, error) {
	b, err := os.ReadFile(filepath.Join(IdentityDir(dataDir), gossipFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var gt api.GossipTrust
	if err := json.Unmarshal(b, &gt); err != nil {
		return nil, fmt.Errorf("%s: %w", gossipFile, err)
	}
	if err := checkGossipTrust(&gt); err != nil {
		return nil, fmt.Errorf("%s: %w", gossipFile, err)
	}
	return &gt, nil
}

// saveGossipTrust keeps gt in the data dir, readable by the owner only.
func saveGossipTrust(dataDir string, gt *api.GossipTrust) error {
	b, err := json.Marshal(gt)
	if err != nil {
		return err
	}
	dir := IdentityDir(dataDir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// atomicfile's temporary file is made owner-only and renamed in place.
	return atomicfile.Write(filepath.Join(dir, gossipFile), b, "")
}

// checkGossipTrust bounds what a host takes: 1 to api.MaxGossipKeys keys
// of 32 bytes, at most api.MaxRevokedSerials serials.
func checkGossipTrust(gt *api.GossipTrust) error {
	if len(gt.Keys) == 0 || len(gt.Keys) > api.MaxGossipKeys {
		return fmt.Errorf("keys: want 1 to %d", api.MaxGossipKeys)
	}
	for _, k := range gt.Keys {
		if len(k) != 32 {
			return fmt.Errorf("keys: a key of %d bytes, want 32", len(k))
		}
	}
	if len(gt.Revoked) > api.MaxRevokedSerials {
		return fmt.Errorf("revoked: over %d serials", api.MaxRevokedSerials)
	}
	for _, s := range gt.Revoked {
		if len(s) == 0 || len(s) > 64 {
			return errors.New("revoked: a serial of bad length")
		}
	}
	return nil
}

// ClusterTrust is the cluster member's trust for an enrolled host: its key
// and certificate, its CA, and the revoked serials it knows of.
func ClusterTrust(id *pki.HostIdentity, gt *api.GossipTrust) (*cluster.Trust, error) {
	if id == nil {
		return nil, nil
	}
	key, ok := id.Cert.PrivateKey.(*ecdsa.PrivateKey)
	if !ok || id.Cert.Leaf == nil {
		return nil, errors.New("host identity: no ECDSA key and certificate")
	}
	t := &cluster.Trust{Key: key, Cert: id.Cert.Leaf.Raw, CA: id.CA}
	if gt != nil {
		t.Revoked = gt.Revoked
	}
	return t, nil
}

// Enrolled gives a running host the identity it enrolled with: its API
// takes the control plane's certificate, and its cluster member signs its
// records and checks others' against the CA (the dev cluster's hosts start
// before their control plane, and enroll after).
func (h *Host) Enrolled(id *pki.HostIdentity) error {
	if h.cfg.Identity == nil {
		return errors.New("host: built without an identity slot")
	}
	h.cfg.Identity.Set(id)
	if h.Cluster == nil {
		return nil
	}
	gt, err := LoadGossipTrust(h.cfg.DataDir)
	if err != nil {
		return err
	}
	t, err := ClusterTrust(id, gt)
	if err != nil {
		return err
	}
	return h.Cluster.SetTrust(*t)
}

// setGossipTrust is PUT /v1/cluster/trust: the control plane's new keyring
// (a rotation's round) and revoked serials, kept in the data dir and put to
// use at once. Only an enrolled host takes it, and only from the control
// plane (its API takes no other client).
func (h *Host) setGossipTrust(w http.ResponseWriter, r *http.Request) {
	if h.cfg.Identity == nil || h.cfg.Identity.Get() == nil {
		httpapi.WriteJSON(w, http.StatusConflict, api.ErrorBody{Error: "this host is not enrolled: it takes no gossip trust"})
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxGossipTrustBody)
	var gt api.GossipTrust
	if err := httpapi.DecodeBody(r, &gt, true); err != nil {
		httpapi.WriteJSON(w, http.StatusBadRequest, api.ErrorBody{Error: err.Error()})
		return
	}
	if err := checkGossipTrust(&gt); err != nil {
		httpapi.WriteJSON(w, http.StatusUnprocessableEntity, api.ErrorBody{Error: err.Error()})
		return
	}
	if err := saveGossipTrust(h.cfg.DataDir, &gt); err != nil {
		h.log.Error("keep gossip trust", "err", err)
		httpapi.WriteJSON(w, http.StatusInternalServerError, api.ErrorBody{Error: "the host could not keep the gossip trust"})
		return
	}
	h.Cluster.Revoke(gt.Revoked...)
	if err := h.Cluster.SetGossipKeys(gt.Keys); err != nil {
		httpapi.WriteJSON(w, http.StatusUnprocessableEntity, api.ErrorBody{Error: err.Error()})
		return
	}
	h.log.Info("gossip trust updated", "keys", len(gt.Keys), "revoked", len(gt.Revoked))
	httpapi.WriteJSON(w, http.StatusOK, api.OK{OK: true})
}

// gossipTrustConfig fills in the cluster member's keyring and trust from
// the data dir: the keyring the control plane gave (else the config's),
// and, once enrolled, the host's key and certificate. A host
// with no keyring gossips in clear, and says so.
func gossipTrustConfig(cc *cluster.Config, cfg Config) error {
	gt, err := LoadGossipTrust(cfg.DataDir)
	if err != nil {
		return err
	}
	if gt != nil {
		// What the control plane gave last (a rotation's) wins over
		// what the host was started with.
		cc.GossipKeys = gt.Keys
	}
	if len(cc.GossipKeys) == 0 {
		cfg.Logger.Warn("gossip is not encrypted: no control plane gave this host a key (hosts without a control plane gossip in clear)")
	}
	if cfg.Identity != nil && cfg.Identity.Get() != nil && cc.Trust == nil {
		if cc.Trust, err = ClusterTrust(cfg.Identity.Get(), gt); err != nil {
			return err
		}
	}
	return nil
}
