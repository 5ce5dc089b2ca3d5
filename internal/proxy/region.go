package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// regionBreakers are this edge's breakers of the regions it delivers to
// (route.RegionBreaker decides; this keeps one per region, with the clock).
// Regions come from the cluster's facts, so they are few.
type regionBreakers struct {
	now     func() time.Time
	tripped atomic.Int32 // regions whose breaker is not closed: zero is the fast path
	mu      sync.RWMutex
	m       map[string]*regionBreaker
}

type regionBreaker struct {
	mu sync.Mutex
	b  route.RegionBreaker
}

func (r *regionBreakers) get(region string) *regionBreaker {
	r.mu.RLock()
	rb := r.m[region]
	r.mu.RUnlock()
	if rb != nil {
		return rb
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[string]*regionBreaker{}
	}
	if rb = r.m[region]; rb == nil {
		rb = &regionBreaker{}
		r.m[region] = rb
	}
	return rb
}

// record counts an attempt on a machine of the region.
func (r *regionBreakers) record(region string, failed bool) {
	if region == "" {
		return
	}
	rb := r.get(region)
	now := r.now()
	rb.mu.Lock()
	was := rb.b.State(now) != route.RegionClosed
	rb.b.Record(now, failed)
	is := rb.b.State(now) != route.RegionClosed
	rb.mu.Unlock()
	switch {
	case is && !was:
		r.tripped.Add(1)
	case was && !is:
		r.tripped.Add(-1)
	}
}

// shed reports whether a request drawn rand keeps away from the region.
func (r *regionBreakers) shed(region string, rand uint64) bool {
	if r.tripped.Load() == 0 {
		return false
	}
	r.mu.RLock()
	rb := r.m[region]
	r.mu.RUnlock()
	if rb == nil {
		return false
	}
	now := r.now()
	rb.mu.Lock()
	defer rb.mu.Unlock()
	return rb.b.Shed(now, rand)
}

// state is the region's breaker state now.
func (r *regionBreakers) state(region string) route.RegionState {
	r.mu.RLock()
	rb := r.m[region]
	r.mu.RUnlock()
	if rb == nil {
		return route.RegionClosed
	}
	rb.mu.Lock()
	defer rb.mu.Unlock()
	return rb.b.State(r.now())
}
