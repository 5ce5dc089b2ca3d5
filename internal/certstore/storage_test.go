package certstore

import (
	"context"
	"errors"
	"io/fs"
	"slices"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/catalog"
)

func openCatalog(t *testing.T) *catalog.NATS {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cat, err := catalog.Open(ctx, catalog.Config{DataDir: t.TempDir(), Buckets: Buckets()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cat.Close() })
	return cat
}

func newStorage(t *testing.T, cat *catalog.NATS, owner string, ttl time.Duration) *Storage {
	t.Helper()
	certs, err := cat.Bucket(BucketCerts)
	if err != nil {
		t.Fatal(err)
	}
	locks, err := cat.Bucket(BucketLocks)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewStorage(StorageConfig{Certs: certs, Locks: locks, Owner: owner, LockTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

func TestKeyEncoding(t *testing.T) {
	for _, k := range []string{
		"certificates/acme-v02.api.letsencrypt.org-directory/shop.example.com/shop.example.com.crt",
		"acme/127.0.0.1:14000-dir/users/a+b@example.com/a+b.json",
		"issue_cert_*.example.com", "locks/x=y", "ü",
	} {
		enc, err := encodeKey(k)
		if err != nil {
			t.Fatalf("%q: %v", k, err)
		}
		if !catalog.ValidKey(enc) {
			t.Errorf("%q encodes to %q, not a catalog key", k, enc)
		}
		dec, err := decodeKey(enc)
		if err != nil || dec != k {
			t.Errorf("%q → %q → %q, %v", k, enc, dec, err)
		}
	}
	for _, k := range []string{"", "/a", "a/", "a//b"} {
		if _, err := encodeKey(k); err == nil {
			t.Errorf("%q encoded", k)
		}
	}
	for _, k := range []string{"a=", "a=4", "a=ZZ"} {
		if _, err := decodeKey(k); err == nil {
			t.Errorf("%q decoded", k)
		}
	}
}

// TestStorage: certmagic's contract — values, directories, listing,
// deleting a directory, fs.ErrNotExist for what is absent.
func TestStorage(t *testing.T) {
	ctx := context.Background()
	s := newStorage(t, openCatalog(t), "h1", 0)
	if _, err := s.Load(ctx, "certificates/ca/a.com/a.com.crt"); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("load of nothing: %v", err)
	}
	files := map[string]string{
		"certificates/ca/a.com/a.com.crt":  "A",
		"certificates/ca/a.com/a.com.key":  "AK",
		"certificates/ca/b.com/b.com.crt":  "B",
		"certificates/ca2/c.com/c.com.crt": "C",
		"acme/ca/users/x@y.z/x.json":       "U",
	}
	for k, v := range files {
		if err := s.Store(ctx, k, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	for k, v := range files {
		got, err := s.Load(ctx, k)
		if err != nil || string(got) != v {
			t.Fatalf("load %s = %q, %v", k, got, err)
		}
	}
	ki, err := s.Stat(ctx, "certificates/ca/a.com/a.com.crt")
	if err != nil || !ki.IsTerminal || ki.Size != 1 || ki.Modified.IsZero() {
		t.Fatalf("stat of a value: %+v, %v", ki, err)
	}
	if ki, err := s.Stat(ctx, "certificates/ca"); err != nil || ki.IsTerminal {
		t.Fatalf("stat of a directory: %+v, %v", ki, err)
	}
	if !s.Exists(ctx, "certificates/ca/b.com") || s.Exists(ctx, "certificates/ca/d.com") || s.Exists(ctx, "certificates/c") {
		t.Fatal("exists is wrong")
	}
	got, err := s.List(ctx, "certificates", false)
	slices.Sort(got)
	if err != nil || !slices.Equal(got, []string{"certificates/ca", "certificates/ca2"}) {
		t.Fatalf("list = %q, %v", got, err)
	}
	got, err = s.List(ctx, "certificates/ca", true)
	slices.Sort(got)
	want := []string{"certificates/ca/a.com/a.com.crt", "certificates/ca/a.com/a.com.key", "certificates/ca/b.com/b.com.crt"}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("recursive list = %q, %v", got, err)
	}
	if err := s.Delete(ctx, "certificates/ca"); err != nil {
		t.Fatal(err)
	}
	if s.Exists(ctx, "certificates/ca/a.com/a.com.crt") || !s.Exists(ctx, "certificates/ca2/c.com/c.com.crt") {
		t.Fatal("deleting a directory deleted the wrong keys")
	}
	if _, err := s.List(ctx, "certificates/ca", true); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("list of a deleted directory: %v", err)
	}
}

// TestLocks: one holder at a time across two edges; the waiter gets the
// lock once it is released; a holder that died frees it within the TTL,
// while a live holder keeps it past the TTL by refreshing.
func TestLocks(t *testing.T) {
	ctx := context.Background()
	cat := openCatalog(t)
	a := newStorage(t, cat, "a", time.Second)
	b := newStorage(t, cat, "b", time.Second)
	if err := a.Lock(ctx, "issue_cert_x.com"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "issue_cert_x.com"); ok || err != nil {
		t.Fatalf("b took a held lock: %v %v", ok, err)
	}
	// Held past three TTLs by its refresher.
	wctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	err := b.Lock(wctx, "issue_cert_x.com")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("b's wait on a held lock: %v", err)
	}
	got := make(chan error, 1)
	go func() { got <- b.Lock(ctx, "issue_cert_x.com") }()
	if err := a.Unlock(ctx, "issue_cert_x.com"); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-got:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("b never got the released lock")
	}
	// b dies holding it (its refresher stops): a gets it after the TTL.
	b.mu.Lock()
	h := b.held["issue_cert_x.com"]
	delete(b.held, "issue_cert_x.com")
	b.mu.Unlock()
	close(h.stop)
	<-h.done
	lctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := a.Lock(lctx, "issue_cert_x.com"); err != nil {
		t.Fatalf("a never got the dead holder's lock: %v", err)
	}
	if err := b.Unlock(ctx, "issue_cert_x.com"); err == nil {
		t.Fatal("b unlocked a lock it no longer holds")
	}
}

func TestValidHostname(t *testing.T) {
	for _, h := range []string{"shop.example.com", "a-b.c0.io", "x.y"} {
		if err := ValidHostname(h); err != nil {
			t.Errorf("%q: %v", h, err)
		}
	}
	for _, h := range []string{"", "localhost", "*.example.com", "Shop.example.com", "a..b", "-a.b", "1.2.3.4", "a_b.com", "a.b:443", string(make([]byte, 300))} {
		if err := ValidHostname(h); err == nil {
			t.Errorf("%q accepted", h)
		}
	}
}

// TestHostnamesFollow: the follower sees claims made and deleted.
func TestHostnamesFollow(t *testing.T) {
	ctx := context.Background()
	cat := openCatalog(t)
	b, err := cat.Bucket(BucketHostnames)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := catalog.CreateJSON(ctx, b, "a.example.com", Claim{Hostname: "a.example.com", App: "a", AppID: "1"}, 0); err != nil {
		t.Fatal(err)
	}
	h := NewHostnames(b, nil)
	h.Start()
	defer h.Close()
	<-h.Ready()
	wait := func(host, app string, ok bool) {
		t.Helper()
		for end := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if got, gok := h.App(host); got == app && gok == ok {
				return
			}
			if time.Now().After(end) {
				t.Fatalf("%s: never (%q, %v)", host, app, ok)
			}
		}
	}
	wait("a.example.com", "a", true)
	if _, err := catalog.CreateJSON(ctx, b, "b.example.com", Claim{Hostname: "b.example.com", App: "b", AppID: "2"}, 0); err != nil {
		t.Fatal(err)
	}
	wait("b.example.com", "b", true)
	if err := b.Delete(ctx, "a.example.com", 0); err != nil {
		t.Fatal(err)
	}
	wait("a.example.com", "", false)
	wait("b.example.com", "b", true)
}
