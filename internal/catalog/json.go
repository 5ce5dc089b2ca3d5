package catalog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// ErrDelete, returned by UpdateJSON's fn, deletes the key (by revision).
var ErrDelete = errors.New("catalog: delete")

// updateTries bounds UpdateJSON's compare-and-swap loop.
const updateTries = 20

// GetJSON reads key and decodes its JSON value into a T.
func GetJSON[T any](ctx context.Context, b Bucket, key string) (T, uint64, error) {
	var v T
	e, err := b.Get(ctx, key)
	if err != nil {
		return v, 0, err
	}
	if err := json.Unmarshal(e.Value, &v); err != nil {
		return v, 0, fmt.Errorf("decode %s: %w", key, err)
	}
	return v, e.Revision, nil
}

// CreateJSON encodes v and creates key with it (see Bucket.Create).
func CreateJSON[T any](ctx context.Context, b Bucket, key string, v T, ttl time.Duration) (uint64, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return 0, fmt.Errorf("encode %s: %w", key, err)
	}
	return b.Create(ctx, key, data, ttl)
}

// UpdateJSON changes key by read, modify, compare-and-swap. It reads key
// (absent: the zero T and exists false), lets fn change it, and writes it
// back by Create or Update on the revision it read. When another writer
// came first, it starts over — fn may run several times and must only
// change v — up to 20 times, then gives up with ErrConflict. An error from
// fn aborts and is returned, except ErrDelete, which deletes the key by
// revision (and returns the zero T and revision 0). The value written has
// no TTL.
func UpdateJSON[T any](ctx context.Context, b Bucket, key string, fn func(v *T, exists bool) error) (T, uint64, error) {
	var zero T
	for try := range updateTries {
		if try > 0 {
			if err := backoff(ctx, try); err != nil {
				return zero, 0, fmt.Errorf("update %s: %w", key, err)
			}
		}
		var v T
		var rev uint64
		e, err := b.Get(ctx, key)
		switch {
		case err == nil:
			if err := json.Unmarshal(e.Value, &v); err != nil {
				return zero, 0, fmt.Errorf("decode %s: %w", key, err)
			}
			rev = e.Revision
		case !errors.Is(err, ErrNotFound):
			return zero, 0, err
		}
		exists := rev != 0
		if err := fn(&v, exists); errors.Is(err, ErrDelete) {
			if !exists {
				return zero, 0, nil
			}
			err := b.Delete(ctx, key, rev)
			if errors.Is(err, ErrConflict) {
				continue
			}
			return zero, 0, err
		} else if err != nil {
			return zero, 0, err
		}
		data, err := json.Marshal(v)
		if err != nil {
			return zero, 0, fmt.Errorf("encode %s: %w", key, err)
		}
		var nrev uint64
		if exists {
			nrev, err = b.Update(ctx, key, data, rev)
		} else {
			nrev, err = b.Create(ctx, key, data, 0)
		}
		switch {
		case err == nil:
			return v, nrev, nil
		case errors.Is(err, ErrConflict), errors.Is(err, ErrExists), errors.Is(err, ErrNotFound):
			continue
		default:
			return zero, 0, err
		}
	}
	return zero, 0, fmt.Errorf("update %s: %d tries lost to other writers: %w", key, updateTries, ErrConflict)
}

// backoff sleeps a random while, growing with try, so that writers racing
// for one key stop colliding.
func backoff(ctx context.Context, try int) error {
	ceiling := min(time.Millisecond<<min(try, 7), 100*time.Millisecond)
	t := time.NewTimer(rand.N(ceiling) + 100*time.Microsecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
