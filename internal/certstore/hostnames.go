package certstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flamehq/flame/internal/catalog"
)

// Buckets of the catalog this package uses.
const (
	// BucketHostnames: <hostname> → Claim, written by the control plane.
	BucketHostnames = "hostnames"
	// BucketCerts holds what certmagic stores (Storage).
	BucketCerts = "certs"
	// BucketLocks holds certmagic's locks, each with a time to live.
	BucketLocks = "certlocks"
)

// Bounds of the buckets every edge writes: room for the certificates of
// tens of thousands of hostnames, and no more, so an edge cannot fill the
// catalog's disk.
const (
	maxCertsBytes = 1 << 30
	maxLocksBytes = 16 << 20
)

// Buckets declares the buckets, for whoever opens the catalog.
func Buckets() []catalog.BucketSpec {
	return []catalog.BucketSpec{{Name: BucketHostnames}, {Name: BucketCerts, MaxBytes: maxCertsBytes},
		{Name: BucketLocks, TTL: true, MaxBytes: maxLocksBytes}}
}

// Claim says which app a hostname belongs to.
type Claim struct {
	Hostname  string    `json:"hostname"`
	App       string    `json:"app"`
	AppID     string    `json:"app_id"`
	CreatedAt time.Time `json:"created_at"`
}

// MaxHostnameLen bounds a hostname (a DNS name).
const MaxHostnameLen = 253

// ValidHostname reports whether h can be claimed: a lower-case DNS name of
// at least two labels of letters, digits and hyphens, no wildcard (a
// wildcard needs the DNS-01 challenge, which the edge does not solve), not
// an IP address (its last label is not all digits).
func ValidHostname(h string) error {
	if h == "" || len(h) > MaxHostnameLen {
		return fmt.Errorf("hostname must be 1-%d characters", MaxHostnameLen)
	}
	if strings.HasPrefix(h, "*.") {
		return errors.New("wildcard hostnames need the DNS-01 challenge, which is not offered")
	}
	labels := strings.Split(h, ".")
	if len(labels) < 2 {
		return fmt.Errorf("hostname %q needs at least two labels", h)
	}
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return fmt.Errorf("hostname %q has an empty, long or hyphen-edged label", h)
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return fmt.Errorf("hostname %q: use lower-case letters, digits, hyphens and dots", h)
			}
		}
	}
	last := labels[len(labels)-1]
	if strings.Trim(last, "0123456789") == "" {
		return fmt.Errorf("hostname %q looks like an IP address", h)
	}
	return nil
}

// Hostnames follows the claims in the catalog and answers, from memory,
// which app a hostname belongs to: the edge asks it on every TLS
// handshake and request, so it never waits on the catalog, and keeps
// answering from the last claims it saw while the catalog is down.
type Hostnames struct {
	b     catalog.Bucket
	log   *slog.Logger
	m     atomic.Pointer[map[string]string] // hostname → app
	ready chan struct{}

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// NewHostnames builds a follower of the claims in b (BucketHostnames).
func NewHostnames(b catalog.Bucket, log *slog.Logger) *Hostnames {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	h := &Hostnames{b: b, log: log.With("component", "hostnames"), ready: make(chan struct{})}
	h.m.Store(&map[string]string{})
	return h
}

// Start follows the bucket until Close, re-watching after the catalog
// drops the watch.
func (h *Hostnames) Start() {
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.wg.Go(func() {
		var once sync.Once
		for ctx.Err() == nil {
			if err := h.follow(ctx, &once); ctx.Err() == nil {
				h.log.Warn("following hostname claims", "err", err)
			}
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	})
}

// follow applies one watch's changes; the first batch of current entries is
// applied whole (the watch sends them before the changes). It returns why
// it stopped (never nil).
func (h *Hostnames) follow(ctx context.Context, once *sync.Once) error {
	es, err := h.b.List(ctx, "")
	if err != nil {
		return err
	}
	m := make(map[string]string, len(es))
	for _, e := range es {
		var c Claim
		if json.Unmarshal(e.Value, &c) == nil {
			m[e.Key] = c.App
		}
	}
	h.m.Store(&m)
	once.Do(func() { close(h.ready) })
	ch, err := h.b.Watch(ctx, "")
	if err != nil {
		return err
	}
	for ch := range ch {
		cur := *h.m.Load()
		var c Claim
		if !ch.Deleted && json.Unmarshal(ch.Value, &c) == nil && cur[ch.Key] == c.App {
			continue
		}
		if ch.Deleted && cur[ch.Key] == "" {
			continue
		}
		next := make(map[string]string, len(cur)+1)
		for k, v := range cur {
			next[k] = v
		}
		if ch.Deleted {
			delete(next, ch.Key)
		} else {
			next[ch.Key] = c.App
		}
		h.m.Store(&next)
	}
	return errors.New("watch ended")
}

// Ready is closed once the claims were read once.
func (h *Hostnames) Ready() <-chan struct{} { return h.ready }

// App returns the app host (lower case, no port) is claimed by.
func (h *Hostnames) App(host string) (string, bool) {
	app, ok := (*h.m.Load())[host]
	return app, ok
}

// Close stops following.
func (h *Hostnames) Close() {
	if h.cancel != nil {
		h.cancel()
	}
	h.wg.Wait()
}
