package agent

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	bolt "go.etcd.io/bbolt"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// An org's number in the private network (layout.Org) comes with every
// create from the control plane, which allocates it once per org for the
// whole platform. A host that runs without one (a lone agent, a dev
// cluster of hosts only) numbers the orgs it sees itself, in its store:
// stable and never reused on this host, but consistent on this host only,
// so a host with peers and no control plane is given the cluster's
// numbering instead (Config.OrgNumbers).

// bucketOrgs holds the orgs this host numbered itself: "o/<slug>" → number
// (2 bytes). Its sequence is the last number given.
var bucketOrgs = []byte("orgs")

// orgNumber returns the number this host gave org slug, giving it the next
// one on first use.
func (s *store) orgNumber(slug string) (layout.Org, error) {
	var n layout.Org
	err := s.db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketOrgs)
		if err != nil {
			return err
		}
		key := []byte("o/" + slug)
		if v := b.Get(key); len(v) == 2 {
			n = layout.Org(binary.BigEndian.Uint16(v))
			return nil
		}
		seq, err := b.NextSequence()
		if err != nil {
			return err
		}
		if seq > math.MaxUint16 {
			return errors.New("every org number of this host is taken")
		}
		n = layout.Org(seq)
		return b.Put(key, binary.BigEndian.AppendUint16(nil, uint16(n)))
	})
	if err != nil {
		return 0, fmt.Errorf("number org %q: %w", slug, err)
	}
	return n, nil
}

// orgOf is the number of a create's org: the control plane's, the
// cluster's numbering (Config.OrgNumbers), or this host's own.
func (a *Agent) orgOf(slug string, given uint16) (layout.Org, error) {
	if given != 0 {
		return layout.Org(given), nil
	}
	if a.cfg.OrgNumbers != nil {
		n, err := a.cfg.OrgNumbers.OrgNumber(slug)
		if err != nil {
			return 0, fmt.Errorf("number org %q: %w", slug, err)
		}
		if n == 0 {
			return 0, fmt.Errorf("number org %q: numbering gave 0", slug)
		}
		return n, nil
	}
	return a.store.orgNumber(slug)
}

// OrgNumbering numbers orgs for every host of a cluster without a control
// plane alike: one org, one number, on all of them; two orgs, two numbers.
// A host numbering by itself could give two orgs one number on two hosts,
// and their machines would then share a network across the mesh.
type OrgNumbering interface {
	OrgNumber(slug string) (layout.Org, error)
}
