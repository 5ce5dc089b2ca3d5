package server

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/httpapi"
)

// The cluster's gossip keyring lives in the catalog's authority bucket,
// sealed under the secrets key like the CA's key: the first key encrypts,
// every one decrypts. A host gets it at enrollment and again, over mutual
// TLS, when it changes; revoked hosts' serials travel with it.
const (
	gossipKeysKey  = "gossip-keys"
	sealGossipKeys = "gossip-keys"
	gossipKeyLen   = 32
	// rotationPause separates a rotation's rounds, so that packets sealed
	// before a round (in flight, or queued) arrive before the next one
	// drops what they need.
	rotationPause = time.Second
)

// sealedKeyring is the catalog's record of the keyring, sealed.
type sealedKeyring struct {
	Sealed []byte `json:"sealed"`
}

// gossipMember is what the control plane's own member of the cluster does
// with the gossip's trust (a *cluster.Cluster; tests may pass a view
// without).
type gossipMember interface {
	SetTrust(cluster.Trust) error
	SetGossipKeys([][]byte) error
	Revoke(serials ...string)
}

// gossipState serializes changes of the keyring made by this plane.
type gossipState struct{ rotate sync.Mutex }

// gossipKeys reads the keyring from the catalog, making it on first use
// (from Config.GossipKey when set).
func (s *Server) gossipKeys(ctx context.Context) ([][]byte, error) {
	auth, err := s.cfg.Catalog.Bucket(bucketAuthority)
	if err != nil {
		return nil, err
	}
	rec, err := loadOrCreate(ctx, auth, gossipKeysKey, func() (sealedKeyring, error) {
		k := bytes.Clone(s.cfg.GossipKey)
		if len(k) == 0 {
			k = newGossipKey()
		}
		return s.sealGossipKeys([][]byte{k})
	})
	if err != nil {
		return nil, fmt.Errorf("gossip keys: %w", err)
	}
	return s.openGossipKeys(rec)
}

func newGossipKey() []byte {
	k := make([]byte, gossipKeyLen)
	rand.Read(k)
	return k
}

func (s *Server) sealGossipKeys(keys [][]byte) (sealedKeyring, error) {
	b, err := json.Marshal(keys)
	if err != nil {
		return sealedKeyring{}, err
	}
	return sealedKeyring{Sealed: s.aead.seal(sealGossipKeys, "keys", string(b))}, nil
}

func (s *Server) openGossipKeys(rec sealedKeyring) ([][]byte, error) {
	plain, err := s.aead.open(sealGossipKeys, "keys", rec.Sealed)
	if err != nil {
		return nil, errors.New("gossip keys: the secret key does not open them: give every control plane the same key")
	}
	var keys [][]byte
	if err := json.Unmarshal([]byte(plain), &keys); err != nil || len(keys) == 0 {
		return nil, errors.New("gossip keys: the catalog's record is damaged")
	}
	return keys, nil
}

// putGossipKeys replaces the catalog's keyring.
func (s *Server) putGossipKeys(ctx context.Context, keys [][]byte) error {
	auth, err := s.cfg.Catalog.Bucket(bucketAuthority)
	if err != nil {
		return err
	}
	sealed, err := s.sealGossipKeys(keys)
	if err != nil {
		return err
	}
	_, _, err = catalog.UpdateJSON(ctx, auth, gossipKeysKey, func(v *sealedKeyring, _ bool) error {
		*v = sealed
		return nil
	})
	return err
}

// revokedSerials lists the serials of every revoked host's certificate.
func (s *Server) revokedSerials(ctx context.Context) ([]string, error) {
	es, err := s.ident.hosts.List(ctx, "")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range es {
		var h hostRecord
		if decodeJSON(e.Value, &h) == nil && h.Revoked && h.Serial != "" {
			out = append(out, h.Serial)
		}
	}
	slices.Sort(out)
	return out, nil
}

// GossipTrust is what a host is given at enrollment: the keyring and the
// revoked serials.
func (s *Server) GossipTrust(ctx context.Context) (*api.GossipTrust, error) {
	keys, err := s.gossipKeys(ctx)
	if err != nil {
		return nil, err
	}
	revoked, err := s.revokedSerials(ctx)
	if err != nil {
		return nil, err
	}
	return &api.GossipTrust{Keys: keys, Revoked: revoked}, nil
}

// useGossipKeys has the plane's own member gossip with the catalog's
// keyring.
func (s *Server) useGossipKeys(ctx context.Context) error {
	m, ok := s.cfg.Cluster.(gossipMember)
	if !ok {
		return nil
	}
	keys, err := s.gossipKeys(ctx)
	if err != nil {
		return err
	}
	return m.SetGossipKeys(keys)
}

// startGossipTrust gives the plane's own member the trust: it checks
// hosts' records against the CA and gossips with the keyring.
func (s *Server) startGossipTrust(ctx context.Context) error {
	m, ok := s.cfg.Cluster.(gossipMember)
	if !ok {
		return nil
	}
	gt, err := s.GossipTrust(ctx)
	if err != nil {
		return err
	}
	if err := m.SetTrust(cluster.Trust{CA: s.ident.ca.Cert, Revoked: gt.Revoked}); err != nil {
		return err
	}
	return m.SetGossipKeys(gt.Keys)
}

// pushGossipTrust sends every host the plane calls (enrolled, not revoked,
// up in its view) the keyring and revoked serials, and applies them to the
// plane's own member; it returns the hosts that took them and those that
// could not be reached.
func (s *Server) pushGossipTrust(ctx context.Context, gt api.GossipTrust) (done, failed []string) {
	if m, ok := s.cfg.Cluster.(gossipMember); ok {
		m.Revoke(gt.Revoked...)
		if err := m.SetGossipKeys(gt.Keys); err != nil {
			s.log.Error("gossip keys on the plane's member", "err", err)
		}
	}
	snap := s.cfg.Cluster.Snapshot()
	var targets []string
	for _, h := range snap.Hosts() {
		if h.ID != snap.Self && h.Up() && s.hostCallable(h.ID) {
			targets = append(targets, h.ID)
		}
	}
	slices.Sort(targets)
	errs := make([]error, len(targets))
	var wg sync.WaitGroup
	for i, id := range targets {
		wg.Go(func() {
			c, err := s.enrolledClient(id)
			if err == nil {
				cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				err = c.SetGossipTrust(cctx, gt)
				cancel()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	for i, id := range targets {
		if errs[i] != nil {
			s.log.Warn("gossip trust not delivered", "host", id, "err", errs[i])
			failed = append(failed, id)
		} else {
			done = append(done, id)
		}
	}
	return done, failed
}

// rotateGossipKey is POST /v1/hosts/gossip-key/rotate (admin only): a new
// key, installed on every host the plane calls in three rounds — added,
// then used, then the old one dropped — so no two hosts ever lack a key in
// common and the cluster never splits. A host that cannot be reached in a
// round is left out of the next ones (it comes back with a new join
// token); the catalog holds each round's keyring, so a host enrolling
// meanwhile gets the right one.
func (s *Server) rotateGossipKey(w http.ResponseWriter, r *http.Request) error {
	if !caller(r.Context()).Admin {
		return api.Errorf(http.StatusForbidden, "only an admin token can rotate the gossip key")
	}
	s.gossip.rotate.Lock()
	defer s.gossip.rotate.Unlock()
	ctx := r.Context()
	cur, err := s.gossipKeys(ctx)
	if err != nil {
		return err
	}
	revoked, err := s.revokedSerials(ctx)
	if err != nil {
		return err
	}
	old, next := cur[0], newGossipKey()
	var out api.GossipKeyRotation
	skipped := map[string]bool{}
	for i, ring := range [][][]byte{{old, next}, {next, old}, {next}} {
		if i > 0 {
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(rotationPause):
			}
		}
		if err := s.putGossipKeys(ctx, ring); err != nil {
			return err
		}
		done, failed := s.pushGossipTrust(ctx, api.GossipTrust{Keys: ring, Revoked: revoked})
		for _, id := range failed {
			skipped[id] = true
		}
		out.Hosts = done
	}
	out.Hosts = slices.DeleteFunc(out.Hosts, func(id string) bool { return skipped[id] })
	for id := range skipped {
		out.Skipped = append(out.Skipped, id)
	}
	slices.Sort(out.Skipped)
	s.log.Warn("gossip key rotated", "hosts", len(out.Hosts), "skipped", out.Skipped, "by", caller(ctx).Name)
	httpapi.WriteJSON(w, http.StatusOK, out)
	return nil
}

// revokeInGossip tells every host, and the plane's own member, that a
// revoked host's certificate is refused.
func (s *Server) revokeInGossip(ctx context.Context, hostID string) {
	gt, err := s.GossipTrust(ctx)
	if err != nil {
		s.log.Error("revocation not sent to hosts", "host", hostID, "err", err)
		return
	}
	_, failed := s.pushGossipTrust(ctx, *gt)
	if len(failed) > 0 {
		s.log.Warn("revocation not delivered to every host", "host", hostID, "failed", failed)
	}
}
