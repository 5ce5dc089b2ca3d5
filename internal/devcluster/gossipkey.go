package devcluster

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
)

// gossipKeyFile keeps a dev cluster's gossip key in its dir, so a cluster
// started again over the same dir (and its catalog) keeps its key.
const gossipKeyFile = "gossip.key"

// gossipKey gives the hosts of a dev cluster with identities (a control
// plane, or one started apart) the cluster's gossip key before they start:
// they start before their control plane and enroll later, and gossip
// encrypted from the first packet, so the plane — which starts its catalog
// with the same key (server.Config.GossipKey) — never splits them.
// Hosts-only dev clusters gossip in clear, and their hosts say so.
func (cfg *Config) gossipKey() error {
	if !cfg.ControlPlane && !cfg.Identities || len(cfg.Cluster.GossipKeys) > 0 {
		return nil
	}
	path := filepath.Join(cfg.Dir, gossipKeyFile)
	key, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		key = make([]byte, 32)
		rand.Read(key)
		if err = os.MkdirAll(cfg.Dir, 0o755); err == nil {
			err = os.WriteFile(path, key, 0o600)
		}
	}
	if err != nil {
		return fmt.Errorf("devcluster: gossip key: %w", err)
	}
	if len(key) != 32 {
		return fmt.Errorf("devcluster: gossip key %s: %d bytes, want 32", path, len(key))
	}
	cfg.Cluster.GossipKeys = [][]byte{key}
	if len(cfg.Server.GossipKey) == 0 {
		cfg.Server.GossipKey = key
	}
	return nil
}

// GossipKey is the key the cluster's gossip started with (nil for a
// hosts-only cluster): a control plane started apart (Identities) starts
// its catalog with it (server.Config.GossipKey).
func (c *Cluster) GossipKey() []byte {
	if len(c.cfg.Cluster.GossipKeys) == 0 {
		return nil
	}
	return slices.Clone(c.cfg.Cluster.GossipKeys[0])
}
