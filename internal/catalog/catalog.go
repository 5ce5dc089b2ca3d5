package catalog

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Conditions callers match with errors.Is.
var (
	// ErrUnavailable means the store could not answer now (no leader yet,
	// a timeout): the call may be retried.
	ErrUnavailable = errors.New("catalog: unavailable")
	ErrNotFound    = errors.New("catalog: not found")
	ErrExists      = errors.New("catalog: key exists")        // Create on an existing key
	ErrConflict    = errors.New("catalog: revision conflict") // Update, Refresh or Delete with a stale revision
	ErrInvalid     = errors.New("catalog: invalid key")       // a key or prefix outside the allowed alphabet
	ErrNoTTL       = errors.New("catalog: bucket has no per-key ttl")
	ErrClosed      = errors.New("catalog: closed")
)

// Entry is the current value of a key.
type Entry struct {
	Key      string
	Value    []byte
	Revision uint64
	Created  time.Time // when this revision was written
}

// Change is one event of a Watch. A deletion (explicit, or a TTL that ran
// out) has Deleted set, no Value, and the revision of the deletion.
type Change struct {
	Entry
	Deleted bool
}

// Bucket is one named set of keys.
type Bucket interface {
	// Get returns the key's current value, or ErrNotFound.
	Get(ctx context.Context, key string) (Entry, error)
	// Create writes the key only if it is absent or deleted, else fails
	// with ErrExists. A ttl above zero makes the key expire (the bucket
	// must allow per-key TTLs); 0 means never.
	Create(ctx context.Context, key string, value []byte, ttl time.Duration) (uint64, error)
	// Update writes the key only if its current revision is rev: a stale
	// rev gives ErrConflict, an absent key ErrNotFound. The new value has
	// no TTL. (The revision of a deletion, as Watch reports it, is a
	// key's current revision too: Update on it recreates the key.)
	Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error)
	// Refresh is Update that gives the new value a TTL (whole seconds, at
	// least one): how a lease is renewed.
	Refresh(ctx context.Context, key string, value []byte, rev uint64, ttl time.Duration) (uint64, error)
	// Put writes the key whatever its state.
	Put(ctx context.Context, key string, value []byte) (uint64, error)
	// Delete removes the key; with rev above zero only if that is still
	// its revision (else ErrConflict). Deleting an absent key is not an
	// error.
	Delete(ctx context.Context, key string, rev uint64) error
	// List returns the current entries whose keys start with prefix ("" =
	// all), sorted by key.
	List(ctx context.Context, prefix string) ([]Entry, error)
	// Watch sends the current entries under prefix, then every change to
	// them, in revision order. The channel is closed when ctx ends or the
	// catalog closes; a consumer must keep reading until then.
	Watch(ctx context.Context, prefix string) (<-chan Change, error)
}

// Catalog is the store and the event bus.
type Catalog interface {
	// Bucket returns one of the buckets declared in Config.Buckets.
	Bucket(name string) (Bucket, error)
	// Publish sends data on a subject, at most once, to the subscribers of
	// that moment. Subjects are dot-separated tokens and may not start with
	// "$" (the store's own subjects).
	Publish(ctx context.Context, subject string, data []byte) error
	// Subscribe calls fn, one message at a time, for every message on
	// subjects matching subject ("*" matches one token, a final ">" the
	// rest). It returns once the subscription is in place: what is
	// published after it returns reaches fn.
	Subscribe(subject string, fn func(subject string, data []byte)) (unsubscribe func(), err error)
	// Close releases everything the catalog started.
	Close() error
}

// maxKeyLen keeps a key well inside a NATS control line.
const maxKeyLen = 1024

// ValidKey reports whether key can name an entry: 1–1024 characters from
// [-/_=.a-zA-Z0-9], not starting or ending with a dot, no two dots in a row.
func ValidKey(key string) bool {
	if key == "" || len(key) > maxKeyLen {
		return false
	}
	return validKeyChars(key) && key[0] != '.' && key[len(key)-1] != '.' && !strings.Contains(key, "..")
}

// validPrefix accepts "" and any start of a valid key, which may end with
// a dot.
func validPrefix(prefix string) bool {
	if prefix == "" {
		return true
	}
	return len(prefix) <= maxKeyLen && validKeyChars(prefix) && prefix[0] != '.' && !strings.Contains(prefix, "..")
}

func validKeyChars(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case c == '-', c == '/', c == '_', c == '=', c == '.':
		default:
			return false
		}
	}
	return true
}

func checkKey(key string) error {
	if !ValidKey(key) {
		return fmt.Errorf("key %q: %w", key, ErrInvalid)
	}
	return nil
}

// filterFor returns the key filter the server applies for a prefix
// (everything up to and including its last dot, then ">") and whether
// keys it lets through still need the prefix check.
func filterFor(prefix string) (filter string, exact bool) {
	i := strings.LastIndexByte(prefix, '.')
	if i < 0 {
		return ">", prefix == ""
	}
	return prefix[:i+1] + ">", i == len(prefix)-1
}
