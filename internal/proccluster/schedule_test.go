package proccluster

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// A seed gives one schedule, whatever runs it; its faults are of the kinds,
// targets and holds asked for.
func TestScheduleSeeded(t *testing.T) {
	targets := []string{"ams-1", "ams-2", "iad-2"}
	draw := func(seed uint64) []Fault {
		return Schedule(rand.New(rand.NewPCG(seed, seed)), targets, 20, time.Second, 2*time.Second)
	}
	a, b := draw(7), draw(7)
	if !slices.Equal(a, b) {
		t.Fatalf("seed 7 gave two schedules:\n%s\n%s", ScheduleString(a), ScheduleString(b))
	}
	if slices.Equal(a, draw(8)) {
		t.Error("seeds 7 and 8 gave one schedule")
	}
	kinds := map[FaultKind]bool{}
	for _, f := range a {
		kinds[f.Kind] = true
		if !slices.Contains(targets, f.Target) || f.Hold < time.Second || f.Hold > 2*time.Second || f.Hold%(100*time.Millisecond) != 0 {
			t.Errorf("fault %s out of range", f)
		}
	}
	if len(kinds) != 3 {
		t.Errorf("20 faults of kinds %v only", kinds)
	}
}
