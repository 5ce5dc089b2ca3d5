package route

import "time"

// Shedder is implemented by a Load whose edge sheds an app's traffic from
// the regions where it fails: a shed region's machines are still
// candidates, but after every machine of a region that is not shed (as a
// demoted machine comes after every other). rand is the query's: a region
// recovering lets through the requests it picks (a trickle of probes), the
// same for every machine of the region within one selection.
type Shedder interface {
	Shed(app, region string, rand uint64) bool
}

// The region breaker: a region whose recent attempts mostly failed is shed.
//
// Attempts are counted over RegionWindow, in RegionBuckets slices of it, so
// the oldest slice drops out as time moves on. A closed breaker opens when at
// least RegionMinAttempts attempts were made in the window (so one failure,
// or a few, trip nothing) and at least half of them failed (Hystrix's
// defaults: 20 requests in 10 s, 50 % errors). Failures here are failures
// to deliver — a refused connect, a reset before the answer, a machine that
// did not answer in time — which the proxy retries elsewhere: half of them
// failing means the region, or the way to it, is sick, not one machine (a
// machine's own breaker takes care of that). It stays open for
// RegionOpenBase, doubling with each opening in a row up to RegionOpenMax;
// then it is half-open: one request in RegionProbeEvery routes as if the
// region were healthy, the others keep away. RegionProbeSuccesses
// successful attempts in a row close it; a failed one opens it again.
const (
	RegionWindow         = 10 * time.Second
	RegionBuckets        = 10
	RegionMinAttempts    = 20
	RegionOpenBase       = time.Second
	RegionOpenMax        = 30 * time.Second
	RegionProbeEvery     = 8
	RegionProbeSuccesses = 5
)

// Window counts attempts and failures over the last RegionWindow. Its zero
// value is empty.
type Window struct {
	slot      [RegionBuckets]int64 // which slice of time each bucket counts
	attempts  [RegionBuckets]int32
	failures  [RegionBuckets]int32
	populated bool
}

const bucketWidth = int64(RegionWindow / RegionBuckets)

func slotOf(now time.Time) int64 {
	ns := now.UnixNano()
	s := ns / bucketWidth
	if ns < 0 && ns%bucketWidth != 0 {
		s-- // floor, before the epoch too
	}
	return s
}

func bucketOf(slot int64) int {
	return int((slot%RegionBuckets + RegionBuckets) % RegionBuckets)
}

// Add counts one attempt at now.
func (w *Window) Add(now time.Time, failed bool) {
	s := slotOf(now)
	i := bucketOf(s)
	if !w.populated || w.slot[i] != s {
		if w.populated && w.slot[i] > s {
			return // older than what the bucket counts: out of the window
		}
		w.slot[i], w.attempts[i], w.failures[i] = s, 0, 0
		if !w.populated {
			for j := range w.slot {
				if j != i {
					w.slot[j] = s - RegionBuckets // stale
				}
			}
			w.populated = true
		}
	}
	w.attempts[i]++
	if failed {
		w.failures[i]++
	}
}

// Counts returns the attempts and failures within the window ending at now.
func (w *Window) Counts(now time.Time) (attempts, failures int) {
	if !w.populated {
		return 0, 0
	}
	s := slotOf(now)
	for i := range w.slot {
		if w.slot[i] > s-RegionBuckets && w.slot[i] <= s {
			attempts += int(w.attempts[i])
			failures += int(w.failures[i])
		}
	}
	return attempts, failures
}

// Reset empties the window.
func (w *Window) Reset() { *w = Window{} }

// RegionState is where a region's breaker is.
type RegionState uint8

// Region breaker states.
const (
	RegionClosed RegionState = iota
	RegionOpen
	RegionHalfOpen
)

func (s RegionState) String() string {
	return [...]string{"closed", "open", "half-open"}[s]
}

// RegionBreaker is one region's breaker, as the edge sees it. Its zero value
// is closed. It is not safe for concurrent use.
type RegionBreaker struct {
	w       Window
	trips   int       // openings in a row; zero while closed
	until   time.Time // open until
	probeOK int       // successful attempts in a row while half-open
}

// State is the breaker's state at now.
func (b *RegionBreaker) State(now time.Time) RegionState {
	switch {
	case b.trips == 0:
		return RegionClosed
	case now.Before(b.until):
		return RegionOpen
	}
	return RegionHalfOpen
}

// Record counts an attempt on a machine of the region, made at now.
func (b *RegionBreaker) Record(now time.Time, failed bool) {
	switch b.State(now) {
	case RegionClosed:
		b.w.Add(now, failed)
		if a, f := b.w.Counts(now); a >= RegionMinAttempts && 2*f >= a {
			b.trip(now)
		}
	case RegionOpen:
		// Attempts that reach a shed region anyway (forced there, or
		// nothing else left) do not decide: the probes after it do.
	case RegionHalfOpen:
		if failed {
			b.trip(now)
			return
		}
		b.probeOK++
		if b.probeOK >= RegionProbeSuccesses {
			*b = RegionBreaker{}
		}
	}
}

func (b *RegionBreaker) trip(now time.Time) {
	b.trips++
	b.until = now.Add(min(RegionOpenBase<<min(b.trips-1, 16), RegionOpenMax))
	b.probeOK = 0
	b.w.Reset()
}

// Shed reports whether a request drawn rand keeps away from the region at
// now: always while open, all but one in RegionProbeEvery while half-open.
func (b *RegionBreaker) Shed(now time.Time, rand uint64) bool {
	switch b.State(now) {
	case RegionOpen:
		return true
	case RegionHalfOpen:
		return mix(rand^0x5bd1e995)%RegionProbeEvery != 0
	}
	return false
}
