package certstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/flamehq/flame/internal/catalog"
)

// Storage is a certmagic.Storage over the catalog: keys in BucketCerts,
// locks in BucketLocks. A certmagic key ("certificates/<ca>/<host>/<host>.crt")
// is kept under a catalog key with its path separators as dots (so a
// directory is a catalog prefix ending in a dot, listed by one subject
// filter) and every other byte outside [A-Za-z0-9_-] escaped as =XX.
//
// A lock is a key created with a time to live and refreshed by its holder
// while held: an edge that dies holding one frees it within LockTTL, and a
// holder that finds its lock taken over (its refresh lost) stops refreshing.
type Storage struct {
	certs, locks catalog.Bucket
	owner        string
	ttl          time.Duration
	poll         time.Duration
	log          *slog.Logger

	mu   sync.Mutex
	held map[string]*heldLock
	wg   sync.WaitGroup
}

// DefaultLockTTL is how long a lock outlives a holder that stopped
// refreshing it.
const DefaultLockTTL = 30 * time.Second

// StorageConfig configures a Storage.
type StorageConfig struct {
	Certs, Locks catalog.Bucket
	// Owner names the holder in the locks it takes (a host id).
	Owner string
	// LockTTL (whole seconds, default DefaultLockTTL); a waiter polls the
	// lock every LockTTL/10 (at least 100 ms, at most a second).
	LockTTL time.Duration
	Logger  *slog.Logger
}

// NewStorage builds a Storage.
func NewStorage(cfg StorageConfig) (*Storage, error) {
	if cfg.Certs == nil || cfg.Locks == nil {
		return nil, errors.New("certstore: the certs and locks buckets are required")
	}
	if cfg.LockTTL == 0 {
		cfg.LockTTL = DefaultLockTTL
	}
	if cfg.LockTTL < time.Second || cfg.LockTTL%time.Second != 0 {
		return nil, fmt.Errorf("certstore: lock ttl %v is not a whole number of seconds", cfg.LockTTL)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Storage{certs: cfg.Certs, locks: cfg.Locks, owner: cfg.Owner, ttl: cfg.LockTTL,
		poll: min(max(cfg.LockTTL/10, 100*time.Millisecond), time.Second),
		log:  cfg.Logger.With("component", "certstore"), held: map[string]*heldLock{}}, nil
}

var _ certmagic.Storage = (*Storage)(nil)

// encodeKey maps a certmagic key to a catalog key.
func encodeKey(key string) (string, error) {
	if key == "" || strings.HasPrefix(key, "/") || strings.HasSuffix(key, "/") || strings.Contains(key, "//") {
		return "", fmt.Errorf("certstore: key %q has an empty path element", key)
	}
	var b strings.Builder
	b.Grow(len(key) + 8)
	for i := 0; i < len(key); i++ {
		c := key[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '_':
			b.WriteByte(c)
		case c == '/':
			b.WriteByte('.')
		default:
			fmt.Fprintf(&b, "=%02X", c)
		}
	}
	if b.Len() > 1000 {
		return "", fmt.Errorf("certstore: key %q is too long", key[:min(len(key), 64)])
	}
	return b.String(), nil
}

// decodeKey is encodeKey's inverse.
func decodeKey(k string) (string, error) {
	var b strings.Builder
	for i := 0; i < len(k); i++ {
		switch c := k[i]; c {
		case '.':
			b.WriteByte('/')
		case '=':
			if i+2 >= len(k) {
				return "", fmt.Errorf("certstore: bad escape in %q", k)
			}
			v, err := strconv.ParseUint(k[i+1:i+3], 16, 8)
			if err != nil {
				return "", fmt.Errorf("certstore: bad escape in %q", k)
			}
			b.WriteByte(byte(v))
			i += 2
		default:
			b.WriteByte(c)
		}
	}
	return b.String(), nil
}

// Store puts value at key.
func (s *Storage) Store(ctx context.Context, key string, value []byte) error {
	k, err := encodeKey(key)
	if err != nil {
		return err
	}
	if _, err := s.certs.Put(ctx, k, value); err != nil {
		return fmt.Errorf("store %s: %w", key, err)
	}
	return nil
}

// Load returns the value at key, or an error wrapping fs.ErrNotExist.
func (s *Storage) Load(ctx context.Context, key string) ([]byte, error) {
	k, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	e, err := s.certs.Get(ctx, k)
	if errors.Is(err, catalog.ErrNotFound) {
		return nil, fmt.Errorf("load %s: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("load %s: %w", key, err)
	}
	return e.Value, nil
}

// Delete removes key and everything under it as a directory.
func (s *Storage) Delete(ctx context.Context, key string) error {
	k, err := encodeKey(key)
	if err != nil {
		return err
	}
	if err := s.certs.Delete(ctx, k, 0); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	es, err := s.certs.List(ctx, k+".")
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	for _, e := range es {
		if err := s.certs.Delete(ctx, e.Key, 0); err != nil {
			return fmt.Errorf("delete %s: %w", key, err)
		}
	}
	return nil
}

// Exists reports whether key is a value or a directory.
func (s *Storage) Exists(ctx context.Context, key string) bool {
	_, err := s.Stat(ctx, key)
	return err == nil
}

// List returns the keys under path: every one when recursive, else its
// direct children (values and directories).
func (s *Storage) List(ctx context.Context, path string, recursive bool) ([]string, error) {
	prefix := ""
	path = strings.TrimSuffix(path, "/")
	if path != "" {
		k, err := encodeKey(path)
		if err != nil {
			return nil, err
		}
		prefix = k + "."
	}
	es, err := s.certs.List(ctx, prefix)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", path, err)
	}
	if len(es) == 0 {
		return nil, fmt.Errorf("list %s: %w", path, fs.ErrNotExist)
	}
	var out []string
	seen := map[string]bool{}
	for _, e := range es {
		rest := e.Key[len(prefix):]
		if !recursive {
			if i := strings.IndexByte(rest, '.'); i >= 0 {
				rest = rest[:i]
			}
		}
		name, err := decodeKey(prefix + rest)
		if err != nil || seen[name] {
			continue
		}
		seen[name] = true
		out = append(out, name)
	}
	return out, nil
}

// Stat describes key.
func (s *Storage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	k, err := encodeKey(key)
	if err != nil {
		return certmagic.KeyInfo{}, err
	}
	e, err := s.certs.Get(ctx, k)
	switch {
	case err == nil:
		return certmagic.KeyInfo{Key: key, Modified: e.Created, Size: int64(len(e.Value)), IsTerminal: true}, nil
	case !errors.Is(err, catalog.ErrNotFound):
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	es, err := s.certs.List(ctx, k+".")
	if err != nil {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, err)
	}
	if len(es) == 0 {
		return certmagic.KeyInfo{}, fmt.Errorf("stat %s: %w", key, fs.ErrNotExist)
	}
	return certmagic.KeyInfo{Key: key, IsTerminal: false}, nil
}

// heldLock is a lock this Storage holds, refreshed until unlocked.
type heldLock struct {
	key  string
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	rev  uint64
}

// Lock takes the named lock, waiting (polling) while another holds it,
// until ctx ends.
func (s *Storage) Lock(ctx context.Context, name string) error {
	for {
		ok, err := s.TryLock(ctx, name)
		if err != nil || ok {
			return err
		}
		t := time.NewTimer(s.poll)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("lock %s: %w", name, ctx.Err())
		case <-t.C:
		}
	}
}

// TryLock takes the named lock if it is free.
func (s *Storage) TryLock(ctx context.Context, name string) (bool, error) {
	k, err := encodeKey(name)
	if err != nil {
		return false, err
	}
	rev, err := s.locks.Create(ctx, k, []byte(s.owner), s.ttl)
	if errors.Is(err, catalog.ErrExists) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("lock %s: %w", name, err)
	}
	h := &heldLock{key: k, rev: rev, stop: make(chan struct{}), done: make(chan struct{})}
	s.mu.Lock()
	if old := s.held[name]; old != nil {
		// Ours already (expired and taken again): stop the old refresher.
		close(old.stop)
	}
	s.held[name] = h
	s.mu.Unlock()
	s.wg.Go(func() { s.refresh(name, h) })
	return true, nil
}

// refresh renews a held lock every third of its TTL until it is unlocked
// or lost.
func (s *Storage) refresh(name string, h *heldLock) {
	defer close(h.done)
	t := time.NewTicker(s.ttl / 3)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
		}
		h.mu.Lock()
		ctx, cancel := context.WithTimeout(context.Background(), s.ttl/3)
		rev, err := s.locks.Refresh(ctx, h.key, []byte(s.owner), h.rev, s.ttl)
		cancel()
		if err == nil {
			h.rev = rev
		}
		h.mu.Unlock()
		if errors.Is(err, catalog.ErrConflict) || errors.Is(err, catalog.ErrNotFound) {
			s.log.Warn("lock lost", "lock", name)
			return
		}
		if err != nil {
			s.log.Debug("lock refresh", "lock", name, "err", err)
		}
	}
}

// Unlock releases the named lock (if this Storage still holds it).
func (s *Storage) Unlock(ctx context.Context, name string) error {
	s.mu.Lock()
	h := s.held[name]
	delete(s.held, name)
	s.mu.Unlock()
	if h == nil {
		return fmt.Errorf("unlock %s: not held", name)
	}
	close(h.stop)
	<-h.done
	if err := s.locks.Delete(ctx, h.key, h.rev); err != nil && !errors.Is(err, catalog.ErrConflict) {
		return fmt.Errorf("unlock %s: %w", name, err)
	}
	return nil
}

// Close releases every lock still held and waits for the refreshers.
func (s *Storage) Close() {
	s.mu.Lock()
	names := make([]string, 0, len(s.held))
	for n := range s.held {
		names = append(names, n)
	}
	s.mu.Unlock()
	for _, n := range names {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		s.Unlock(ctx, n)
		cancel()
	}
	s.wg.Wait()
}

// String names the storage for certmagic's logs.
func (s *Storage) String() string { return "catalog:" + BucketCerts }
