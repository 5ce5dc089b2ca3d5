package server

import (
	"context"
	"sync"
	"time"

	"github.com/flamehq/flame/internal/catalog"
)

// cache keeps a bucket's current values in memory, fed by a catalog watch,
// so the hot reads of every request (the token, the app) cost no round
// trip. A miss is not an answer: callers read the catalog then, so a key
// written a moment ago on another server is never reported absent. A hit
// may be stale by the watch's delay (milliseconds): a deleted app answers
// for that long.
type cache[T any] struct {
	mu sync.RWMutex
	m  map[string]T
	// gone holds keys deleted by this server whose deletion the watch has
	// not reported yet: a late event cannot bring them back meanwhile.
	gone map[string]struct{}
}

func newCache[T any]() *cache[T] { return &cache[T]{m: map[string]T{}, gone: map[string]struct{}{}} }

// revoke forgets key now, ahead of its deletion from the catalog.
func (c *cache[T]) revoke(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, key)
	c.gone[key] = struct{}{}
}

// unrevoke undoes revoke when the deletion failed.
func (c *cache[T]) unrevoke(key string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.gone, key)
}

// revoked reports whether key was revoked here and its deletion is still
// on its way through the watch.
func (c *cache[T]) revoked(key string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	_, ok := c.gone[key]
	return ok
}

func (c *cache[T]) get(key string) (T, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	v, ok := c.m[key]
	return v, ok
}

// follow applies the bucket's changes until ctx ends, re-watching after an
// interruption (the cache is emptied meanwhile: misses go to the catalog).
func (c *cache[T]) follow(ctx context.Context, s *Server, b catalog.Bucket, name string) {
	for ctx.Err() == nil {
		ch, err := b.Watch(ctx, "")
		if err == nil {
			for ch := range ch {
				c.mu.Lock()
				if ch.Deleted {
					delete(c.m, ch.Key)
					delete(c.gone, ch.Key)
				} else if _, gone := c.gone[ch.Key]; gone {
					// Revoked here; its deletion is on its way.
				} else {
					var v T
					if decodeJSON(ch.Value, &v) == nil {
						c.m[ch.Key] = v
					} else {
						delete(c.m, ch.Key)
					}
				}
				c.mu.Unlock()
			}
		}
		c.mu.Lock()
		clear(c.m)
		clear(c.gone)
		c.mu.Unlock()
		if ctx.Err() != nil {
			return
		}
		s.log.Debug("catalog watch ended; watching again", "bucket", name, "err", err)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
