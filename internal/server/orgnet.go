package server

import (
	"context"
	"fmt"
	"math"
	"net/http"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/catalog"
)

// Every org has a number in the private network (internal/mesh/layout:
// fdaa:<network>:<org>::/64 is its network), the same on every host: the
// control plane gives it on the org's first machine, from a counter that
// only grows (compare-and-swap in the catalog), keeps it in the org's
// record, and sends it with every create. An org's number never changes,
// and no other org ever gets it: one deleted leaves its number unused.

// bucketOrgNets holds orgNetCounter: the last number given.
const bucketOrgNets = "orgnets"

const orgNetCounter = "last"

type orgNetCount struct {
	Last uint32 `json:"last"`
}

// orgNetwork returns org slug's number, giving it the next one on first use.
func (s *Server) orgNetwork(ctx context.Context, slug string) (uint16, error) {
	o, _, err := catalog.GetJSON[org](ctx, s.orgs, slug)
	if err != nil {
		return 0, fmt.Errorf("org %s: %w", slug, err)
	}
	if o.Net != 0 {
		return o.Net, nil
	}
	c, _, err := catalog.UpdateJSON(ctx, s.orgNets, orgNetCounter, func(v *orgNetCount, _ bool) error {
		if v.Last >= math.MaxUint16 {
			return api.Errorf(http.StatusServiceUnavailable, "every org number of the private network is taken")
		}
		v.Last++
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("number org %s: %w", slug, err)
	}
	o, _, err = catalog.UpdateJSON(ctx, s.orgs, slug, func(v *org, exists bool) error {
		if !exists {
			return fmt.Errorf("org %s: %w", slug, catalog.ErrNotFound)
		}
		if v.Net == 0 { // else another create numbered it first: its number stands
			v.Net = uint16(c.Last)
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("number org %s: %w", slug, err)
	}
	return o.Net, nil
}
