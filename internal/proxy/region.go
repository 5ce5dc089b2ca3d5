package proxy

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// regionBreakers are this edge's breakers of the regions it delivers to,
// one per app and region (route.RegionBreaker decides; this keeps them,
// with the clock). Per app: a tenant whose machines all fail sheds its own
// traffic from the region, never another app's.
type regionBreakers struct {
	now     func() time.Time
	tripped atomic.Int32 // breakers not closed: zero is the fast path
	mu      sync.RWMutex
	m       map[regionKey]*regionBreaker
}

type regionKey struct{ app, region string }

// maxRegionBreakers bounds the breakers kept: past it, the closed ones are
// forgotten.
const maxRegionBreakers = 1 << 14

type regionBreaker struct {
	mu sync.Mutex
	b  route.RegionBreaker
}

func (r *regionBreakers) get(k regionKey) *regionBreaker {
	r.mu.RLock()
	rb := r.m[k]
	r.mu.RUnlock()
	if rb != nil {
		return rb
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.m == nil {
		r.m = map[regionKey]*regionBreaker{}
	}
	if rb = r.m[k]; rb == nil {
		if len(r.m) >= maxRegionBreakers {
			now := r.now()
			for k, b := range r.m {
				b.mu.Lock()
				if b.b.State(now) == route.RegionClosed {
					delete(r.m, k)
				}
				b.mu.Unlock()
			}
		}
		rb = &regionBreaker{}
		r.m[k] = rb
	}
	return rb
}

// record counts an attempt on a machine of the app in the region.
func (r *regionBreakers) record(app, region string, failed bool) {
	rb := r.get(regionKey{app, region})
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

// shed reports whether a request for the app drawn rand keeps away from
// the region.
func (r *regionBreakers) shed(app, region string, rand uint64) bool {
	if r.tripped.Load() == 0 {
		return false
	}
	r.mu.RLock()
	rb := r.m[regionKey{app, region}]
	r.mu.RUnlock()
	if rb == nil {
		return false
	}
	now := r.now()
	rb.mu.Lock()
	defer rb.mu.Unlock()
	return rb.b.Shed(now, rand)
}

// state is the state of the app's breaker of the region now.
func (r *regionBreakers) state(app, region string) route.RegionState {
	r.mu.RLock()
	rb := r.m[regionKey{app, region}]
	r.mu.RUnlock()
	if rb == nil {
		return route.RegionClosed
	}
	rb.mu.Lock()
	defer rb.mu.Unlock()
	return rb.b.State(r.now())
}
