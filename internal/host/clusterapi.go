package host

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
)

// SharedCPUOvercommit is how many guest CPUs one CPU of the machine counts
// for: guests' CPUs are shared (Fly's shared-cpu-1x) and mostly idle, so a
// host runs many more of them than it has cores; their CPU weight and quota
// keep them fair when they are busy at once.
const SharedCPUOvercommit = 16

// DefaultCapacity is what this machine can run: its CPUs (times
// SharedCPUOvercommit) and its memory.
func DefaultCapacity() cluster.Resources {
	r := cluster.Resources{CPUs: runtime.NumCPU() * SharedCPUOvercommit, MemoryMB: 1024}
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return r
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fs := strings.Fields(sc.Text()); len(fs) >= 2 && fs[0] == "MemTotal:" {
			if kb, err := strconv.Atoi(fs[1]); err == nil {
				r.MemoryMB = kb / 1024
			}
		}
	}
	return r
}

// ClusterHost is one host in GET /v1/cluster/hosts.
type ClusterHost struct {
	ID       string            `json:"id"`
	Region   string            `json:"region"`
	Status   string            `json:"status"`
	RTTMs    float64           `json:"rtt_ms"`
	Addrs    map[string]string `json:"addrs,omitempty"`
	Capacity cluster.Resources `json:"capacity"`
	Free     cluster.Resources `json:"free"`
	Machines int               `json:"machines"`
}

// ClusterMachine is one machine in GET /v1/cluster/machines.
type ClusterMachine struct {
	cluster.Machine
	// HostStatus is ok while the machine's host is reachable, unreachable
	// once it is dead or gone (as the Machines API's host_status).
	HostStatus string `json:"host_status"`
}

// clusterHandler serves this host's view of the cluster, read-only:
// GET /v1/cluster/hosts and GET /v1/cluster/machines[?app=].
func (h *Host) clusterHandler(auth func(*http.Request) (context.Context, error)) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/cluster/hosts", func(w http.ResponseWriter, r *http.Request) {
		snap := h.Cluster.Snapshot()
		out := []ClusterHost{}
		for _, ho := range snap.Hosts() {
			out = append(out, ClusterHost{ID: ho.ID, Region: ho.Region, Status: string(ho.Status),
				RTTMs: float64(ho.RTT.Microseconds()) / 1000, Addrs: ho.Addrs, Capacity: ho.Capacity, Free: ho.Free,
				Machines: len(ho.Machines)})
		}
		writeJSON(w, out)
	})
	mux.HandleFunc("PUT /v1/cluster/trust", h.setGossipTrust)
	mux.HandleFunc("GET /v1/cluster/machines", func(w http.ResponseWriter, r *http.Request) {
		snap := h.Cluster.Snapshot()
		ms := snap.Machines()
		if app := r.URL.Query().Get("app"); app != "" {
			ms = snap.AppMachines(app)
		}
		out := []ClusterMachine{}
		for _, m := range ms {
			st := api.HostStatusOK
			if ho := snap.HostOf(m); ho == nil || !ho.Up() {
				st = api.HostStatusUnreachable
			}
			out = append(out, ClusterMachine{Machine: *m, HostStatus: st})
		}
		writeJSON(w, out)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, err := auth(r); err != nil {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			json.NewEncoder(w).Encode(api.ErrorBody{Error: err.Error()})
			return
		}
		mux.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}
