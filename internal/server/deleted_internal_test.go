package server

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"
)

// TestDeletedHostsBounded: a list with include_deleted asks only the hosts
// the app's tombstones name, for the newest machines, and at most
// maxHosts of them however many hosts the app has used.
func TestDeletedHostsBounded(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var ts []tombstone
	for i := range 100 {
		ts = append(ts, tombstone{ID: fmt.Sprintf("m%03d", i), AppID: "a", Host: fmt.Sprintf("h%02d", i%40),
			Destroyed: t0.Add(time.Duration(i) * time.Second)})
	}
	count := func(got map[string]map[string]bool) (hosts, ids int) {
		for _, m := range got {
			ids += len(m)
		}
		return len(got), ids
	}
	for _, tc := range []struct {
		name             string
		ts               []tombstone
		shown, maxHosts  int
		wantHosts, wantN int
		newest           string // the newest machine, always asked for
	}{
		{"none", nil, 256, 16, 0, 0, ""},
		{"one host", ts[:1], 256, 16, 1, 1, "m000"},
		// 40 hosts; the newest 16 machines are on h04–h19, which hold 48.
		{"hosts capped", ts, 256, 16, 16, 48, "m099"},
		{"machines capped", ts, 10, 16, 10, 10, "m099"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := tombstoneHosts(tc.ts, tc.shown, tc.maxHosts)
			hosts, n := count(got)
			if hosts != tc.wantHosts || n != tc.wantN {
				t.Fatalf("%d hosts, %d machines, want %d hosts, %d machines: %v", hosts, n, tc.wantHosts, tc.wantN, got)
			}
			if tc.newest != "" {
				found := false
				for _, m := range got {
					found = found || m[tc.newest]
				}
				if !found {
					t.Fatalf("the newest machine %s is not asked for: %v", tc.newest, slices.Sorted(maps.Keys(got)))
				}
			}
			for h, m := range got {
				for id := range m {
					var want string
					for _, x := range tc.ts {
						if x.ID == id {
							want = x.Host
						}
					}
					if want != h {
						t.Fatalf("machine %s asked of %s, its tombstone names %s", id, h, want)
					}
				}
			}
		})
	}
}
