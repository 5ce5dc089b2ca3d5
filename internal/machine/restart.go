package machine

import (
	"fmt"
	"time"
)

// Restart policies, as the API names them.
const (
	PolicyNo        = "no"
	PolicyOnFailure = "on-failure"
	PolicyAlways    = "always"
)

// DefaultMaxRetries is the on-failure retry budget when the config sets none.
const DefaultMaxRetries = 10

// RestartPolicy says what happens when a workload exits without being asked to.
//
//   - no: it stays stopped.
//   - on-failure: a failed exit (non-zero code, a signal, an OOM kill) is
//     restarted, at most MaxRetries times in a row; then the machine fails.
//     A clean exit leaves it stopped.
//   - always: every exit is restarted, with backoff, without limit.
//
// A run that lasted at least Backoff.Window counts as healthy: the next
// failure starts counting from one again.
type RestartPolicy struct {
	Policy     string
	MaxRetries int
}

// NewRestartPolicy checks a policy from a config; empty means on-failure and
// maxRetries ≤ 0 means DefaultMaxRetries.
func NewRestartPolicy(policy string, maxRetries int) (RestartPolicy, error) {
	switch policy {
	case "":
		policy = PolicyOnFailure
	case PolicyNo, PolicyOnFailure, PolicyAlways:
	default:
		return RestartPolicy{}, fmt.Errorf("unknown restart policy %q: want no, on-failure or always", policy)
	}
	if maxRetries <= 0 {
		maxRetries = DefaultMaxRetries
	}
	return RestartPolicy{Policy: policy, MaxRetries: maxRetries}, nil
}

// Backoff spaces restarts: the n-th consecutive restart waits
// Base·2^(n-1), at most Max.
type Backoff struct {
	Base   time.Duration
	Max    time.Duration
	Window time.Duration // a run this long resets the count
}

// DefaultBackoff is what the agent uses unless configured otherwise.
var DefaultBackoff = Backoff{Base: 200 * time.Millisecond, Max: 30 * time.Second, Window: time.Minute}

// Delay is the wait before the n-th consecutive restart (n ≥ 1).
func (b Backoff) Delay(n int) time.Duration {
	if n < 1 || b.Base <= 0 {
		return 0
	}
	d := b.Base
	for i := 1; i < n; i++ {
		d *= 2
		if b.Max > 0 && d >= b.Max {
			return b.Max
		}
	}
	if b.Max > 0 && d > b.Max {
		return b.Max
	}
	return d
}

// ExitInfo is what the policy needs to know about an exit.
type ExitInfo struct {
	Failed        bool      // non-zero, signalled, OOM-killed or unknown
	RequestedStop bool      // the exit was asked for (stop, restart, destroy)
	StartedAt     time.Time // when the run that ended began
	At            time.Time // when it ended
}

// Decision is the policy's answer to an exit.
type Decision struct {
	// Next is the state to move to: Restarting, Stopped or Failed.
	Next State
	// Delay is the wait before starting again (Next == Restarting).
	Delay time.Duration
	// Count is the consecutive restart count after this decision, to be
	// stored and passed back with the next exit.
	Count int
}

// Decide says what follows an exit, given the consecutive restarts so far.
func (p RestartPolicy) Decide(exit ExitInfo, count int, b Backoff) Decision {
	if exit.RequestedStop {
		return Decision{Next: Stopped, Count: 0}
	}
	if b.Window > 0 && !exit.StartedAt.IsZero() && exit.At.Sub(exit.StartedAt) >= b.Window {
		count = 0
	}
	switch p.Policy {
	case PolicyAlways:
	case PolicyOnFailure, "":
		if !exit.Failed {
			return Decision{Next: Stopped, Count: 0}
		}
		max := p.MaxRetries
		if max <= 0 {
			max = DefaultMaxRetries
		}
		if count >= max {
			return Decision{Next: Failed, Count: count}
		}
	default: // PolicyNo
		return Decision{Next: Stopped, Count: 0}
	}
	count++
	return Decision{Next: Restarting, Delay: b.Delay(count), Count: count}
}
