package server

import (
	"testing"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/reconcile"
)

// TestHostStatusNeedsFacts: the reconciler takes a host for up — what it
// does not show it does not have — only once its facts have arrived. A
// control plane just started knows hosts as members before their facts
// come; taking that for "shows no machine" destroyed every machine of the
// cluster's groups after a control plane restart.
func TestHostStatusNeedsFacts(t *testing.T) {
	for _, tc := range []struct {
		name    string
		h       *cluster.Host
		revoked bool
		want    reconcile.HostStatus
	}{
		{"never seen", nil, false, reconcile.HostUnknown},
		{"member, no facts yet", &cluster.Host{ID: "h", Status: cluster.StatusAlive}, false, reconcile.HostUnknown},
		{"suspect, no facts yet", &cluster.Host{ID: "h", Status: cluster.StatusSuspect}, false, reconcile.HostUnknown},
		{"alive with facts", &cluster.Host{ID: "h", Status: cluster.StatusAlive, Version: 3}, false, reconcile.HostUp},
		{"suspect with facts", &cluster.Host{ID: "h", Status: cluster.StatusSuspect, Version: 3}, false, reconcile.HostUp},
		{"dead", &cluster.Host{ID: "h", Status: cluster.StatusDead, Version: 3}, false, reconcile.HostDown},
		{"dead, no facts", &cluster.Host{ID: "h", Status: cluster.StatusDead}, false, reconcile.HostDown},
		{"left", &cluster.Host{ID: "h", Status: cluster.StatusLeft, Version: 1}, false, reconcile.HostDown},
		// Revoked: its facts are refused for good, its machines lost.
		{"revoked, member", &cluster.Host{ID: "h", Status: cluster.StatusAlive}, true, reconcile.HostDown},
		{"revoked, facts kept", &cluster.Host{ID: "h", Status: cluster.StatusAlive, Version: 3}, true, reconcile.HostDown},
		{"revoked, never seen", nil, true, reconcile.HostDown},
	} {
		if got := hostStatus(tc.h, tc.revoked); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
