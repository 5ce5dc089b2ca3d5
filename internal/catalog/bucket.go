package catalog

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// markerTTL is how long the marker a TTL expiry leaves behind stays in a
// bucket: a watcher that reconnects within it still sees the deletion.
const markerTTL = 15 * time.Minute

// bucket is a JetStream key/value bucket: stream KV_<name> on subjects
// $KV.<name>.<key>, one subject per key.
type bucket struct {
	n    *NATS
	spec BucketSpec
	kv   jetstream.KeyValue
	pre  string // subject prefix of keys: "$KV.<name>."
}

var _ Bucket = (*bucket)(nil)

// createBucket creates the bucket's stream, or brings an existing one to
// spec. It is the stream nats.go's CreateKeyValue makes, except that direct
// get is off: reads go to the stream leader and so see every acknowledged
// write. While a cluster forms there may not yet be enough peers for the
// replicas; that is retried until ctx ends.
func (n *NATS) createBucket(ctx context.Context, spec BucketSpec) (*bucket, error) {
	sc := jetstream.StreamConfig{
		Name:              "KV_" + spec.Name,
		Subjects:          []string{"$KV." + spec.Name + ".>"},
		MaxMsgsPerSubject: int64(spec.History),
		MaxMsgs:           -1,
		MaxBytes:          -1,
		MaxMsgSize:        -1,
		MaxConsumers:      -1,
		Storage:           jetstream.FileStorage,
		Replicas:          n.cfg.Replicas,
		AllowRollup:       true,
		DenyDelete:        true,
		Duplicates:        2 * time.Minute,
		Discard:           jetstream.DiscardNew,
		AllowDirect:       false,
	}
	if spec.MaxBytes > 0 {
		sc.MaxBytes = spec.MaxBytes
	}
	if spec.TTL {
		sc.AllowMsgTTL = true
		sc.SubjectDeleteMarkerTTL = markerTTL
	}
	if n.cfg.Bind {
		return n.bindBucket(ctx, spec)
	}
	delay := 50 * time.Millisecond
	for {
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		// Create first: servers of a cluster starting together all get
		// here, and JetStream answers concurrent creates of one stream
		// (identical ones succeed), while an update racing a create can
		// go unanswered.
		_, err := n.js.CreateStream(qctx, sc)
		if errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
			n.log.Debug("updating bucket settings", "bucket", spec.Name)
			_, err = n.js.UpdateStream(qctx, sc)
		}
		var kv jetstream.KeyValue
		if err == nil {
			kv, err = n.js.KeyValue(qctx, spec.Name)
		}
		if err == nil {
			err = n.probe(qctx, sc.Name, "$KV."+spec.Name+".probe")
		}
		cancel()
		if err == nil {
			return &bucket{n: n, spec: spec, kv: kv, pre: "$KV." + spec.Name + "."}, nil
		}
		// Right after a create, the server answering the bind may not know
		// the stream yet.
		created := errors.Is(err, jetstream.ErrBucketNotFound)
		if !(transient(err) || created) || ctx.Err() != nil {
			return nil, fmt.Errorf("create bucket %s: %w", spec.Name, err)
		}
		n.log.Debug("bucket not created yet", "bucket", spec.Name, "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("create bucket %s: %w (last: %w)", spec.Name, ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
}

// bindBucket opens a bucket the control plane made, retrying while
// JetStream is not up yet.
func (n *NATS) bindBucket(ctx context.Context, spec BucketSpec) (*bucket, error) {
	delay := 50 * time.Millisecond
	for {
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		kv, err := n.js.KeyValue(qctx, spec.Name)
		cancel()
		if err == nil {
			return &bucket{n: n, spec: spec, kv: kv, pre: "$KV." + spec.Name + "."}, nil
		}
		if !transient(err) || ctx.Err() != nil {
			return nil, fmt.Errorf("bind bucket %s: %w", spec.Name, err)
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("bind bucket %s: %w (last: %w)", spec.Name, ctx.Err(), err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Second)
	}
}

// probe checks that a write to subject reaches the stream from this
// server, which in a fresh cluster takes a moment after the stream exists.
// The message names another stream, so the stream refuses it unstored.
func (n *NATS) probe(ctx context.Context, stream, subject string) error {
	_, err := n.js.PublishMsg(ctx, &nats.Msg{Subject: subject},
		jetstream.WithExpectStream(stream+"-probe"), jetstream.WithRetryAttempts(0))
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) && apiErr.ErrorCode == 10060 { // expected stream does not match
		return nil
	}
	if err == nil {
		return fmt.Errorf("probe of stream %s stored a message", stream)
	}
	return err
}

// transient reports errors a forming or electing cluster gives.
func transient(err error) bool {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		// 503: no metadata leader yet, insufficient resources, …;
		// 10005: no suitable peers for placement (yet).
		return apiErr.Code == 503 || apiErr.ErrorCode == 10005
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse)
}

func (b *bucket) Get(ctx context.Context, key string) (Entry, error) {
	if err := checkKey(key); err != nil {
		return Entry{}, fmt.Errorf("get %s: %w", b.spec.Name, err)
	}
	e, err := b.kv.Get(ctx, key)
	if err != nil {
		return Entry{}, b.fail("get", key, err)
	}
	return entryOf(e), nil
}

func (b *bucket) Create(ctx context.Context, key string, value []byte, ttl time.Duration) (uint64, error) {
	if err := b.checkWrite(key, ttl); err != nil {
		return 0, fmt.Errorf("create %s: %w", b.spec.Name, err)
	}
	var opts []jetstream.KVCreateOpt
	if ttl > 0 {
		opts = append(opts, jetstream.KeyTTL(ttl))
	}
	rev, err := b.kv.Create(ctx, key, value, opts...)
	if err != nil {
		if errors.Is(err, jetstream.ErrKeyExists) {
			return 0, fmt.Errorf("create %s/%s: %w", b.spec.Name, key, ErrExists)
		}
		return 0, b.fail("create", key, err)
	}
	return rev, nil
}

func (b *bucket) Update(ctx context.Context, key string, value []byte, rev uint64) (uint64, error) {
	return b.swap(ctx, "update", key, value, rev, 0)
}

func (b *bucket) Refresh(ctx context.Context, key string, value []byte, rev uint64, ttl time.Duration) (uint64, error) {
	if ttl <= 0 {
		return 0, fmt.Errorf("refresh %s/%s: ttl %s must be positive", b.spec.Name, key, ttl)
	}
	return b.swap(ctx, "refresh", key, value, rev, ttl)
}

// swap writes value if key's last revision is rev, with a TTL if ttl > 0.
func (b *bucket) swap(ctx context.Context, op, key string, value []byte, rev uint64, ttl time.Duration) (uint64, error) {
	if err := b.checkWrite(key, ttl); err != nil {
		return 0, fmt.Errorf("%s %s: %w", op, b.spec.Name, err)
	}
	if rev == 0 {
		// Revision 0 expects an empty key: that is Create, not Update.
		if _, err := b.Get(ctx, key); err != nil {
			return 0, err
		}
		return 0, fmt.Errorf("%s %s/%s at revision 0: %w", op, b.spec.Name, key, ErrConflict)
	}
	opts := []jetstream.PublishOpt{jetstream.WithExpectLastSequencePerSubject(rev)}
	if ttl > 0 {
		opts = append(opts, jetstream.WithMsgTTL(ttl))
	}
	ack, err := b.n.js.PublishMsg(ctx, &nats.Msg{Subject: b.pre + key, Data: value}, opts...)
	if err == nil {
		return ack.Sequence, nil
	}
	if wrongLastSequence(err) {
		// Stale revision, or no key at all?
		if _, gerr := b.Get(ctx, key); errors.Is(gerr, ErrNotFound) {
			return 0, fmt.Errorf("%s %s/%s: %w", op, b.spec.Name, key, ErrNotFound)
		}
		return 0, fmt.Errorf("%s %s/%s at revision %d: %w", op, b.spec.Name, key, rev, ErrConflict)
	}
	return 0, b.fail(op, key, err)
}

func (b *bucket) Put(ctx context.Context, key string, value []byte) (uint64, error) {
	if err := checkKey(key); err != nil {
		return 0, fmt.Errorf("put %s: %w", b.spec.Name, err)
	}
	rev, err := b.kv.Put(ctx, key, value)
	if err != nil {
		return 0, b.fail("put", key, err)
	}
	return rev, nil
}

func (b *bucket) Delete(ctx context.Context, key string, rev uint64) error {
	if err := checkKey(key); err != nil {
		return fmt.Errorf("delete %s: %w", b.spec.Name, err)
	}
	var opts []jetstream.KVDeleteOpt
	if rev > 0 {
		opts = append(opts, jetstream.LastRevision(rev))
	}
	err := b.kv.Delete(ctx, key, opts...)
	if err == nil {
		return nil
	}
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || wrongLastSequence(err) {
		if _, gerr := b.Get(ctx, key); errors.Is(gerr, ErrNotFound) {
			return nil // already gone
		}
		return fmt.Errorf("delete %s/%s at revision %d: %w", b.spec.Name, key, rev, ErrConflict)
	}
	return b.fail("delete", key, err)
}

func (b *bucket) List(ctx context.Context, prefix string) ([]Entry, error) {
	if !validPrefix(prefix) {
		return nil, fmt.Errorf("list %s: prefix %q: %w", b.spec.Name, prefix, ErrInvalid)
	}
	filter, exact := filterFor(prefix)
	w, err := b.kv.Watch(ctx, filter)
	if err != nil {
		return nil, b.fail("list", prefix, err)
	}
	defer stopWatcher(w)
	// The watcher sends the last revision of every key, then nil; a key
	// written meanwhile may come twice, and the later one wins.
	latest := map[string]Change{}
	for {
		var e jetstream.KeyValueEntry
		var ok bool
		select {
		case e, ok = <-w.Updates():
		case <-ctx.Done():
			return nil, fmt.Errorf("list %s %q: %w", b.spec.Name, prefix, ctx.Err())
		}
		if !ok {
			return nil, fmt.Errorf("list %s %q: %w", b.spec.Name, prefix, ErrClosed)
		}
		if e == nil {
			break
		}
		if !exact && !strings.HasPrefix(e.Key(), prefix) {
			continue
		}
		c := changeOf(e)
		if old, ok := latest[c.Key]; !ok || old.Revision < c.Revision {
			latest[c.Key] = c
		}
	}
	out := make([]Entry, 0, len(latest))
	for _, c := range latest {
		if !c.Deleted {
			out = append(out, c.Entry)
		}
	}
	slices.SortFunc(out, func(a, b Entry) int { return cmp.Compare(a.Key, b.Key) })
	return out, nil
}

func (b *bucket) Watch(ctx context.Context, prefix string) (<-chan Change, error) {
	if !validPrefix(prefix) {
		return nil, fmt.Errorf("watch %s: prefix %q: %w", b.spec.Name, prefix, ErrInvalid)
	}
	if !b.n.track() {
		return nil, fmt.Errorf("watch %s: %w", b.spec.Name, ErrClosed)
	}
	filter, exact := filterFor(prefix)
	w, err := b.kv.Watch(ctx, filter)
	if err != nil {
		b.n.wg.Done()
		return nil, b.fail("watch", prefix, err)
	}
	out := make(chan Change, 64)
	go func() {
		defer b.n.wg.Done()
		defer close(out)
		defer stopWatcher(w)
		initial := true
		for {
			var e jetstream.KeyValueEntry
			var ok bool
			select {
			case e, ok = <-w.Updates():
			case <-ctx.Done():
				return
			case <-b.n.closing:
				return
			}
			switch {
			case !ok:
				return
			case e == nil:
				initial = false
				continue
			case !exact && !strings.HasPrefix(e.Key(), prefix):
				continue
			}
			c := changeOf(e)
			if initial && c.Deleted {
				continue // current values only: a deleted key has none
			}
			select {
			case out <- c:
			case <-ctx.Done():
				return
			case <-b.n.closing:
				return
			}
		}
	}()
	return out, nil
}

// stopWatcher stops w and drains its channel: nats.go's watcher blocks
// delivering into a full channel, and closes it only once delivery ends.
func stopWatcher(w jetstream.KeyWatcher) {
	_ = w.Stop()
	timeout := time.NewTimer(10 * time.Second)
	defer timeout.Stop()
	for {
		select {
		case _, ok := <-w.Updates():
			if !ok {
				return
			}
		case <-timeout.C:
			return
		}
	}
}

func (b *bucket) checkWrite(key string, ttl time.Duration) error {
	if err := checkKey(key); err != nil {
		return err
	}
	switch {
	case ttl < 0:
		return fmt.Errorf("key %s: negative ttl %s", key, ttl)
	case ttl > 0 && !b.spec.TTL:
		return fmt.Errorf("key %s: %w", key, ErrNoTTL)
	case ttl > 0 && (ttl < time.Second || ttl%time.Second != 0):
		return fmt.Errorf("key %s: ttl %s is not a whole number of seconds", key, ttl)
	}
	return nil
}

// fail wraps an error of op on key, mapping NATS's conditions onto ours.
func (b *bucket) fail(op, key string, err error) error {
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		err = ErrNotFound
	case errors.Is(err, jetstream.ErrInvalidKey):
		err = fmt.Errorf("%w: %w", ErrInvalid, err)
	case transient(err):
		err = fmt.Errorf("%w: %w", ErrUnavailable, err)
	default:
		err = mapConnErr(err)
	}
	return fmt.Errorf("%s %s/%s: %w", op, b.spec.Name, key, err)
}

// wrongLastSequence reports JetStream's answer to a compare-and-swap on a
// stale revision (10071 on one server, 10164 on replicated streams).
func wrongLastSequence(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) &&
		(apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
			apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

func entryOf(e jetstream.KeyValueEntry) Entry {
	return Entry{Key: e.Key(), Value: e.Value(), Revision: e.Revision(), Created: e.Created()}
}

func changeOf(e jetstream.KeyValueEntry) Change {
	c := Change{Entry: entryOf(e)}
	if op := e.Operation(); op == jetstream.KeyValueDelete || op == jetstream.KeyValuePurge {
		c.Deleted, c.Value = true, nil
	}
	return c
}
