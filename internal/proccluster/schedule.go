package proccluster

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"time"
)

// FaultKind is a fault the harness injects.
type FaultKind string

const (
	KillHost      FaultKind = "kill"      // SIGKILL, then revive on the same data dir
	PartitionHost FaultKind = "partition" // cut from every other member, then heal
	StallHost     FaultKind = "stall"     // SIGSTOP, then SIGCONT
)

// Fault is one step of a schedule: a fault on a host, held for Hold, then
// undone.
type Fault struct {
	Kind   FaultKind
	Target string
	Hold   time.Duration
}

func (f Fault) String() string {
	if f.Hold == 0 {
		return fmt.Sprintf("%s %s", f.Kind, f.Target)
	}
	return fmt.Sprintf("%s %s for %v", f.Kind, f.Target, f.Hold)
}

// ScheduleString prints a schedule one step a line, to replay it by hand.
func ScheduleString(s []Fault) string {
	var b strings.Builder
	for i, f := range s {
		fmt.Fprintf(&b, "%d. %s\n", i+1, f)
	}
	return b.String()
}

// Schedule draws n faults from r: each a kind, one of targets, and a hold
// between minHold and maxHold (rounded to 100 ms). The same r and
// arguments give the same schedule.
func Schedule(r *rand.Rand, targets []string, n int, minHold, maxHold time.Duration) []Fault {
	kinds := []FaultKind{KillHost, PartitionHost, StallHost}
	out := make([]Fault, 0, n)
	for range n {
		hold := minHold
		if maxHold > minHold {
			hold += time.Duration(r.Int64N(int64(maxHold - minHold + 1)))
		}
		out = append(out, Fault{Kind: kinds[r.IntN(len(kinds))], Target: targets[r.IntN(len(targets))],
			Hold: hold.Round(100 * time.Millisecond)})
	}
	return out
}

// Apply injects f.
func (c *Cluster) Apply(f Fault) error {
	switch f.Kind {
	case KillHost:
		return c.Kill(f.Target)
	case PartitionHost:
		var others []string
		for _, m := range c.members {
			if m.ID != f.Target {
				others = append(others, m.ID)
			}
		}
		return c.Partition([]string{f.Target}, others)
	case StallHost:
		return c.Stall(f.Target)
	}
	return fmt.Errorf("proccluster: unknown fault %q", f.Kind)
}

// Undo ends f: revives, heals or resumes.
func (c *Cluster) Undo(f Fault) error {
	switch f.Kind {
	case KillHost:
		return c.Revive(f.Target)
	case PartitionHost:
		return c.Heal()
	case StallHost:
		return c.Resume(f.Target)
	}
	return fmt.Errorf("proccluster: unknown fault %q", f.Kind)
}
