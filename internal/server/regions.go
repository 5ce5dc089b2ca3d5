package server

import (
	"net/http"
	"slices"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/httpapi"
)

// regions is GET /v1/platform/regions: every region with hosts, and how many
// machines of the default guest its live hosts have room for, where its edge
// listens, and where the global entry in front of every edge does.
func (s *Server) regions(w http.ResponseWriter, r *http.Request) error {
	snap := s.cfg.Cluster.Snapshot()
	byCode := map[string]*api.Region{}
	for _, h := range snap.Hosts() {
		if h.Capacity.CPUs == 0 && h.Capacity.MemoryMB == 0 {
			continue
		}
		reg, ok := byCode[h.Region]
		if !ok {
			reg = &api.Region{Code: h.Region, Name: h.Region, GatewayAvailable: true, Edge: s.cfg.Edges[h.Region]}
			if g, ok := geo.Lookup(h.Region); ok {
				reg.Name, reg.Latitude, reg.Longitude = g.City, float32(g.Lat), float32(g.Lon)
			}
			byCode[h.Region] = reg
		}
		reg.Hosts++
		if h.Up() {
			reg.Capacity += int64(max(min(h.Free.CPUs/api.DefaultGuestCPUs, h.Free.MemoryMB/api.DefaultGuestMemoryMB), 0))
		}
	}
	out := api.RegionsResponse{Regions: []api.Region{}, Global: s.cfg.GlobalEntry}
	for _, reg := range byCode {
		out.Regions = append(out.Regions, *reg)
	}
	slices.SortFunc(out.Regions, func(a, b api.Region) int { return strings.Compare(a.Code, b.Code) })
	if self := snap.Host(snap.Self); self != nil {
		out.Nearest = self.Region
	}
	httpapi.WriteJSON(w, http.StatusOK, out)
	return nil
}
