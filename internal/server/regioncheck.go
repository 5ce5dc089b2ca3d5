package server

import (
	"net/http"
	"slices"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
)

// hostRegions lists, sorted, the regions where the cluster has hosts that
// run machines (up or not: a host that is down may return).
func hostRegions(snap *cluster.Snapshot) []string {
	var out []string
	for _, h := range snap.Hosts() {
		if h.Capacity.IsZero() || h.Status == cluster.StatusLeft || slices.Contains(out, h.Region) {
			continue
		}
		out = append(out, h.Region)
	}
	slices.Sort(out)
	return out
}

// regionsHaveHosts refuses at once (422, naming the regions that have
// hosts) a create whose regions have none: waiting for room there would
// only end in a 503. "any" among them accepts every region. A cluster with
// no hosts at all is not refused here: hosts may be joining.
func (s *Server) regionsHaveHosts(regions []string) error {
	if slices.Contains(regions, "any") {
		return nil
	}
	have := hostRegions(s.cfg.Cluster.Snapshot())
	if len(have) == 0 {
		return nil
	}
	for _, r := range regions {
		if slices.Contains(have, r) {
			return nil
		}
	}
	return api.Errorf(http.StatusUnprocessableEntity, "region %s has no hosts: regions with hosts are %s (or add \",any\" to go elsewhere)",
		strings.Join(regions, ","), strings.Join(have, ", "))
}
