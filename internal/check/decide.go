package check

import (
	"time"

	"github.com/flamehq/flame/api"
)

// OutputWaiting is the output of a check that has not run yet.
const OutputWaiting = "waiting for the first check"

// Result is the outcome of one probe.
type Result struct {
	At     time.Time
	OK     bool
	Output string
}

// History is what a check's status depends on: when checking began, how
// often it ran, whether it ever passed, and its last result.
type History struct {
	Started    time.Time
	Runs       int
	EverPassed bool
	Last       Result
}

// Add returns the history with one more result.
func (h History) Add(r Result) History {
	h.Runs++
	h.EverPassed = h.EverPassed || r.OK
	h.Last = r
	return h
}

// Decide returns a check's status and output at now. It is pure: the
// package doc gives the rules.
func Decide(h History, grace time.Duration, now time.Time) (status, output string) {
	switch {
	case h.Runs == 0:
		return api.CheckWarning, OutputWaiting
	case h.Last.OK:
		return api.CheckPassing, h.Last.Output
	case !h.EverPassed && now.Before(h.Started.Add(grace)):
		return api.CheckWarning, h.Last.Output
	default:
		return api.CheckCritical, h.Last.Output
	}
}
