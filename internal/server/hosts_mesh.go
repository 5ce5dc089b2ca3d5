package server

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net/http"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// The private network's numbers for real clusters (internal/mesh): one
// network for the whole cluster, drawn once, and a number for each host,
// given at its first enrollment, kept by its record through re-enrollments
// and never given again (a counter that only grows), so that a host gone
// and a host new never share a prefix.
const (
	keyNetwork     = "network"      // in bucketAuthority → networkRecord
	keyHostNumbers = "host-numbers" // in bucketAuthority → hostNumbers
)

type networkRecord struct {
	Network uint32 `json:"network"`
}

type hostNumbers struct {
	Last uint16 `json:"last"`
}

// meshPlace is the cluster's network and host hostID's number in it: the
// number its record holds, else the next one.
func (s *Server) meshPlace(ctx context.Context, hostID string) (layout.Network, layout.Host, error) {
	auth, err := s.cfg.Catalog.Bucket(bucketAuthority)
	if err != nil {
		return 0, 0, fmt.Errorf("server: bucket %s: %w", bucketAuthority, err)
	}
	nr, err := loadOrCreate(ctx, auth, keyNetwork, func() (networkRecord, error) {
		var b [4]byte
		for binary.BigEndian.Uint32(b[:]) == 0 {
			rand.Read(b[:])
		}
		return networkRecord{Network: binary.BigEndian.Uint32(b[:])}, nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("server: private network: %w", err)
	}
	if nr.Network == 0 {
		return 0, 0, fmt.Errorf("server: private network: the catalog holds network 0")
	}
	if h, ok, err := s.hostRecordOf(ctx, hostID); err != nil {
		return 0, 0, err
	} else if ok && h.Number != 0 {
		return layout.Network(nr.Network), layout.Host(h.Number), nil
	}
	n, _, err := catalog.UpdateJSON(ctx, auth, keyHostNumbers, func(v *hostNumbers, exists bool) error {
		if v.Last == 0xffff {
			return api.Errorf(http.StatusInsufficientStorage, "every host number of the private network (1–65535) was given")
		}
		v.Last++
		return nil
	})
	if err != nil {
		return 0, 0, err
	}
	return layout.Network(nr.Network), layout.Host(n.Last), nil
}
