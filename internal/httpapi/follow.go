package httpapi

import (
	"context"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/flamehq/flame/api"
)

// FollowLimits bound followed streams (logs and events with ?follow=true),
// each of which holds a connection, a goroutine and a subscription for as
// long as the client stays: zero fields take the defaults.
type FollowLimits struct {
	// PerKey bounds the streams followed at once under one key (the
	// control plane keys them by org); default 16.
	PerKey int
	// Total bounds the streams followed at once in all; default 1024.
	Total int
	// MaxDuration ends a stream after this long (the client may follow
	// again); default 1 h.
	MaxDuration time.Duration
}

// Default follow limits.
const (
	DefaultFollowsPerKey     = 16
	DefaultFollowsTotal      = 1024
	DefaultFollowMaxDuration = time.Hour
)

// Follows counts the streams being followed, against its limits. One
// Follows may serve several handlers, so a key's cap spans them all.
type Follows struct {
	lim   FollowLimits
	mu    sync.Mutex
	by    map[string]int
	total int
}

// NewFollows returns an empty count with lim's limits.
func NewFollows(lim FollowLimits) *Follows {
	if lim.PerKey <= 0 {
		lim.PerKey = DefaultFollowsPerKey
	}
	if lim.Total <= 0 {
		lim.Total = DefaultFollowsTotal
	}
	if lim.MaxDuration <= 0 {
		lim.MaxDuration = DefaultFollowMaxDuration
	}
	return &Follows{lim: lim, by: map[string]int{}}
}

// Limits returns the limits in force.
func (f *Follows) Limits() FollowLimits { return f.lim }

// Begin admits one more stream under key ("" counts only against the
// total), or answers a 429 *api.Error. The stream runs under the returned
// context, which ends after MaxDuration, and calls done when it ends.
func (f *Follows) Begin(ctx context.Context, key string) (context.Context, func(), error) {
	f.mu.Lock()
	switch {
	case f.total >= f.lim.Total:
		f.mu.Unlock()
		return nil, nil, api.Errorf(http.StatusTooManyRequests, "too many followed streams on this server (at most %d at once); try again later", f.lim.Total)
	case key != "" && f.by[key] >= f.lim.PerKey:
		f.mu.Unlock()
		return nil, nil, api.Errorf(http.StatusTooManyRequests, "too many followed streams at once (at most %d); end one first", f.lim.PerKey)
	}
	f.total++
	if key != "" {
		f.by[key]++
	}
	f.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, f.lim.MaxDuration)
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			cancel()
			f.mu.Lock()
			defer f.mu.Unlock()
			f.total--
			if key != "" {
				if f.by[key]--; f.by[key] <= 0 {
					delete(f.by, key)
				}
			}
		})
	}, nil
}

// Active returns the streams followed at once under key, and in all.
func (f *Follows) Active(key string) (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.by[key], f.total
}

// Admit is Begin for a handler: the stream runs under r's context, and a
// refusal also tells the client when to try again (Retry-After).
func (f *Follows) Admit(w http.ResponseWriter, r *http.Request, key string) (context.Context, func(), error) {
	ctx, done, err := f.Begin(r.Context(), key)
	if err != nil {
		w.Header().Set("Retry-After", strconv.Itoa(followRetrySeconds))
	}
	return ctx, done, err
}

// followRetrySeconds is what a refused follow is told to wait.
const followRetrySeconds = 5
