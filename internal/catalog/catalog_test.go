package catalog

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestValidKey(t *testing.T) {
	for key, want := range map[string]bool{
		"apps.myapp":                         true,
		"machines.0123456789abcd":            true,
		"tokens." + strings.Repeat("ab", 32): true,
		"a-b_c=d/e.F9":                       true,
		"":                                   false,
		".apps":                              false,
		"apps.":                              false,
		"apps..x":                            false,
		"apps.*":                             false,
		"apps.>":                             false,
		"apps my":                            false,
		"apps.é":                             false,
		strings.Repeat("a", 1025):            false,
	} {
		if got := ValidKey(key); got != want {
			t.Errorf("ValidKey(%q) = %v, want %v", key, got, want)
		}
	}
}

func TestFilterFor(t *testing.T) {
	for _, tc := range []struct {
		prefix, filter string
		exact          bool
	}{
		{"", ">", true},
		{"apps.", "apps.>", true},
		{"apps.my", "apps.>", false},
		{"apps", ">", false},
		{"a.b.", "a.b.>", true},
		{"a.b.c", "a.b.>", false},
	} {
		filter, exact := filterFor(tc.prefix)
		if filter != tc.filter || exact != tc.exact {
			t.Errorf("filterFor(%q) = %q, %v; want %q, %v", tc.prefix, filter, exact, tc.filter, tc.exact)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string // substring of the error, "" = valid
	}{
		{"embedded", Config{DataDir: "/d"}, ""},
		{"no data dir", Config{}, "data dir"},
		{"url", Config{URL: "nats://127.0.0.1:4222", Replicas: 3}, ""},
		{"url and data dir", Config{URL: "nats://x:1", DataDir: "/d"}, "excludes"},
		{"replicas without cluster", Config{DataDir: "/d", Replicas: 3}, "need a cluster"},
		{"cluster without name", Config{DataDir: "/d", ClusterListen: "127.0.0.1:0"}, "server name"},
		{"cluster", Config{DataDir: "/d", ServerName: "a", ClusterListen: "127.0.0.1:0",
			Routes: []string{"nats-route://127.0.0.1:6222"}, Replicas: 3}, ""},
		{"routes without listener", Config{DataDir: "/d", Routes: []string{"nats-route://h:1"}}, "cluster listen"},
		{"bad route", Config{DataDir: "/d", ServerName: "a", ClusterListen: "127.0.0.1:0", Routes: []string{"http://h:1"}}, "scheme"},
		{"bad listen", Config{DataDir: "/d", ClientListen: "localhost"}, "client listen"},
		{"bad bucket", Config{DataDir: "/d", Buckets: []BucketSpec{{Name: "a.b"}}}, "bucket name"},
		{"twice", Config{DataDir: "/d", Buckets: []BucketSpec{{Name: "a"}, {Name: "a"}}}, "twice"},
		{"ttl history", Config{DataDir: "/d", Buckets: []BucketSpec{{Name: "a", TTL: true, History: 2}}}, "history 1"},
		{"history", Config{DataDir: "/d", Buckets: []BucketSpec{{Name: "a", History: 65}}}, "history"},
	} {
		err := tc.cfg.Validate()
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

func TestKeyLifecycle(t *testing.T) {
	n := open(t, testConfig(t))
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 30*time.Second)

	if _, err := b.Get(ctx, "apps.a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get absent: %v, want ErrNotFound", err)
	}
	if _, err := b.Update(ctx, "apps.a", []byte("x"), 1); !errors.Is(err, ErrNotFound) {
		t.Fatalf("update absent: %v, want ErrNotFound", err)
	}
	r1, err := b.Create(ctx, "apps.a", []byte("one"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Create(ctx, "apps.a", []byte("again"), 0); !errors.Is(err, ErrExists) {
		t.Fatalf("create existing: %v, want ErrExists", err)
	}
	e, err := b.Get(ctx, "apps.a")
	if err != nil || string(e.Value) != "one" || e.Revision != r1 || e.Key != "apps.a" || e.Created.IsZero() {
		t.Fatalf("get = %+v, %v", e, err)
	}
	r2, err := b.Update(ctx, "apps.a", []byte("two"), r1)
	if err != nil || r2 <= r1 {
		t.Fatalf("update = %d, %v", r2, err)
	}
	if _, err := b.Update(ctx, "apps.a", []byte("stale"), r1); !errors.Is(err, ErrConflict) {
		t.Fatalf("update stale: %v, want ErrConflict", err)
	}
	if _, err := b.Update(ctx, "apps.a", []byte("zero"), 0); !errors.Is(err, ErrConflict) {
		t.Fatalf("update at 0: %v, want ErrConflict", err)
	}
	r3, err := b.Put(ctx, "apps.a", []byte("three"))
	if err != nil || r3 <= r2 {
		t.Fatalf("put = %d, %v", r3, err)
	}
	if err := b.Delete(ctx, "apps.a", r2); !errors.Is(err, ErrConflict) {
		t.Fatalf("delete stale: %v, want ErrConflict", err)
	}
	if e, _ := b.Get(ctx, "apps.a"); string(e.Value) != "three" {
		t.Fatalf("after stale delete: %q", e.Value)
	}
	if err := b.Delete(ctx, "apps.a", r3); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Get(ctx, "apps.a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get deleted: %v", err)
	}
	if err := b.Delete(ctx, "apps.a", r3); err != nil {
		t.Fatalf("delete deleted by revision: %v", err)
	}
	if err := b.Delete(ctx, "apps.never", 0); err != nil {
		t.Fatalf("delete absent: %v", err)
	}
	if err := b.Delete(ctx, "apps.never2", 7); err != nil {
		t.Fatalf("delete absent by revision: %v", err)
	}
	if _, err := b.Update(ctx, "apps.a", []byte("x"), r3); !errors.Is(err, ErrNotFound) {
		t.Fatalf("update deleted with its last value's revision: %v, want ErrNotFound", err)
	}
	r4, err := b.Create(ctx, "apps.a", []byte("reborn"), 0)
	if err != nil || r4 <= r3 {
		t.Fatalf("create on deleted key = %d, %v", r4, err)
	}

	for _, key := range []string{"", "apps.", "a b", "apps.*", "apps.>", "x..y"} {
		if _, err := b.Put(ctx, key, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("put %q: %v, want ErrInvalid", key, err)
		}
		if _, err := b.Get(ctx, key); !errors.Is(err, ErrInvalid) {
			t.Errorf("get %q: %v, want ErrInvalid", key, err)
		}
	}
	if _, err := b.List(ctx, "a>"); !errors.Is(err, ErrInvalid) {
		t.Errorf("list bad prefix: %v", err)
	}
	if _, err := n.Bucket("nope"); !errors.Is(err, ErrNotFound) {
		t.Errorf("undeclared bucket: %v", err)
	}
}

type counter struct {
	N       int      `json:"n"`
	Writers []string `json:"writers,omitempty"`
}

// TestUpdateJSONConcurrent: writers racing on one key lose nothing.
func TestUpdateJSONConcurrent(t *testing.T) {
	n := open(t, testConfig(t))
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 60*time.Second)

	const writers, each = 20, 5
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for w := range writers {
		wg.Go(func() {
			for range each {
				_, _, err := UpdateJSON(ctx, b, "counters.c", func(c *counter, exists bool) error {
					c.N++
					return nil
				})
				if err != nil {
					errs <- fmt.Errorf("writer %d: %w", w, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	c, _, err := GetJSON[counter](ctx, b, "counters.c")
	if err != nil {
		t.Fatal(err)
	}
	if c.N != writers*each {
		t.Fatalf("counter = %d, want %d", c.N, writers*each)
	}
}

func TestUpdateJSON(t *testing.T) {
	n := open(t, testConfig(t))
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 30*time.Second)

	v, rev, err := UpdateJSON(ctx, b, "apps.x", func(c *counter, exists bool) error {
		if exists {
			t.Error("absent key reported as existing")
		}
		c.N = 41
		return nil
	})
	if err != nil || v.N != 41 || rev == 0 {
		t.Fatalf("create through UpdateJSON: %+v %d %v", v, rev, err)
	}
	v, rev2, err := UpdateJSON(ctx, b, "apps.x", func(c *counter, exists bool) error {
		if !exists || c.N != 41 {
			t.Errorf("saw %+v, exists %v", c, exists)
		}
		c.N++
		return nil
	})
	if err != nil || v.N != 42 || rev2 <= rev {
		t.Fatalf("update: %+v %d %v", v, rev2, err)
	}
	boom := errors.New("boom")
	if _, _, err := UpdateJSON(ctx, b, "apps.x", func(*counter, bool) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("fn error: %v", err)
	}
	if got, r, _ := GetJSON[counter](ctx, b, "apps.x"); got.N != 42 || r != rev2 {
		t.Fatalf("aborted update wrote: %+v %d", got, r)
	}
	if _, _, err := UpdateJSON(ctx, b, "apps.x", func(*counter, bool) error { return ErrDelete }); err != nil {
		t.Fatal(err)
	}
	if _, _, err := GetJSON[counter](ctx, b, "apps.x"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after ErrDelete: %v", err)
	}
	if _, _, err := UpdateJSON(ctx, b, "apps.x", func(*counter, bool) error { return ErrDelete }); err != nil {
		t.Fatalf("ErrDelete on absent key: %v", err)
	}
	if _, err := b.Put(ctx, "apps.bad", []byte("{")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := GetJSON[counter](ctx, b, "apps.bad"); err == nil {
		t.Fatal("decoded bad JSON")
	}
	if _, err := CreateJSON(ctx, b, "apps.y", counter{N: 1}, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := CreateJSON(ctx, b, "apps.y", counter{N: 2}, 0); !errors.Is(err, ErrExists) {
		t.Fatalf("CreateJSON on existing: %v", err)
	}
}

func keysOf(es []Entry) []string {
	var keys []string
	for _, e := range es {
		keys = append(keys, e.Key)
	}
	return keys
}

func TestList(t *testing.T) {
	n := open(t, testConfig(t))
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 30*time.Second)

	for _, k := range []string{"apps.zeta", "apps.my", "apps.myapp", "apps.my.sub", "apps.other", "machines.1", "apps", "appsx.1"} {
		if _, err := b.Put(ctx, k, []byte("v:"+k)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := b.Put(ctx, "apps.gone", nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, "apps.gone", 0); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Put(ctx, "apps.zeta", []byte("v2")); err != nil { // two revisions, listed once
		t.Fatal(err)
	}
	for prefix, want := range map[string][]string{
		"":         {"apps", "apps.my", "apps.my.sub", "apps.myapp", "apps.other", "apps.zeta", "appsx.1", "machines.1"},
		"apps.":    {"apps.my", "apps.my.sub", "apps.myapp", "apps.other", "apps.zeta"},
		"apps.my":  {"apps.my", "apps.my.sub", "apps.myapp"},
		"apps":     {"apps", "apps.my", "apps.my.sub", "apps.myapp", "apps.other", "apps.zeta", "appsx.1"},
		"machines": {"machines.1"},
		"nothing.": nil,
	} {
		es, err := b.List(ctx, prefix)
		if err != nil {
			t.Fatalf("list %q: %v", prefix, err)
		}
		if got := keysOf(es); !slices.Equal(got, want) {
			t.Errorf("list %q = %q, want %q", prefix, got, want)
		}
	}
	es, _ := b.List(ctx, "apps.zeta")
	if len(es) != 1 || string(es[0].Value) != "v2" || es[0].Revision == 0 {
		t.Errorf("list apps.zeta = %+v", es)
	}
}

// TestListMany lists thousands of keys (written without per-write sync to
// keep the test short; listing does not depend on it).
func TestListMany(t *testing.T) {
	cfg := testConfig(t)
	cfg.relaxedSync = true
	n := open(t, cfg)
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 60*time.Second)

	const count = 3000
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := w; i < count; i += 4 {
				if _, err := b.Put(ctx, fmt.Sprintf("machines.%06d", i), []byte("{}")); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	if _, err := b.Put(ctx, "apps.one", nil); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	start := time.Now()
	es, err := b.List(ctx, "machines.")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("listed %d keys in %s", len(es), time.Since(start).Round(time.Millisecond))
	if len(es) != count {
		t.Fatalf("listed %d keys, want %d", len(es), count)
	}
	for i, e := range es {
		if want := fmt.Sprintf("machines.%06d", i); e.Key != want {
			t.Fatalf("entry %d is %s, want %s", i, e.Key, want)
		}
	}
}

func TestWatch(t *testing.T) {
	n := open(t, testConfig(t))
	b := bucketOf(t, n, "data")
	ctx := ctxFor(t, 30*time.Second)

	rA, _ := b.Put(ctx, "apps.a", []byte("a1"))
	rB, _ := b.Put(ctx, "apps.b", []byte("b1"))
	b.Put(ctx, "apps.gone", []byte("x"))
	b.Delete(ctx, "apps.gone", 0)
	b.Put(ctx, "machines.m", []byte("m"))

	wctx, stop := context.WithCancel(ctx)
	ch, err := b.Watch(wctx, "apps.")
	if err != nil {
		t.Fatal(err)
	}
	first := []Change{recv(t, ch), recv(t, ch)}
	slices.SortFunc(first, func(x, y Change) int { return strings.Compare(x.Key, y.Key) })
	if first[0].Key != "apps.a" || first[0].Revision != rA || string(first[0].Value) != "a1" || first[0].Deleted ||
		first[1].Key != "apps.b" || first[1].Revision != rB {
		t.Fatalf("initial values = %+v", first)
	}

	rA2, _ := b.Update(ctx, "apps.a", []byte("a2"), rA)
	b.Put(ctx, "machines.m", []byte("not watched"))
	if err := b.Delete(ctx, "apps.b", rB); err != nil {
		t.Fatal(err)
	}
	rC, _ := b.Create(ctx, "apps.c", []byte("c1"), 0)

	if c := recv(t, ch); c.Key != "apps.a" || string(c.Value) != "a2" || c.Revision != rA2 || c.Deleted {
		t.Fatalf("update seen as %+v", c)
	}
	if c := recv(t, ch); c.Key != "apps.b" || !c.Deleted || c.Value != nil || c.Revision <= rB {
		t.Fatalf("delete seen as %+v", c)
	}
	if c := recv(t, ch); c.Key != "apps.c" || c.Revision != rC {
		t.Fatalf("create seen as %+v", c)
	}

	// A prefix that is not a whole token.
	ch2, err := b.Watch(ctx, "apps.c")
	if err != nil {
		t.Fatal(err)
	}
	if c := recv(t, ch2); c.Key != "apps.c" {
		t.Fatalf("watch apps.c: %+v", c)
	}

	stop()
	for range ch {
	}
	// Close ends the other watch.
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	for range ch2 {
	}
	if _, err := b.Watch(ctx, ""); !errors.Is(err, ErrClosed) {
		t.Fatalf("watch after close: %v", err)
	}
	if _, err := b.Get(ctx, "apps.a"); !errors.Is(err, ErrClosed) {
		t.Fatalf("get after close: %v", err)
	}
}

func TestTTL(t *testing.T) {
	t.Parallel() // waits for TTLs to run out
	n := open(t, testConfig(t))
	leases := bucketOf(t, n, "leases")
	ctx := ctxFor(t, 30*time.Second)

	if _, err := bucketOf(t, n, "data").Create(ctx, "x", nil, time.Second); !errors.Is(err, ErrNoTTL) {
		t.Fatalf("ttl in a bucket without: %v", err)
	}
	if _, err := leases.Create(ctx, "x", nil, 1500*time.Millisecond); err == nil {
		t.Fatal("accepted a ttl of 1.5s")
	}

	watch, err := leases.Watch(ctx, "leases.")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	rev, err := leases.Create(ctx, "leases.short", []byte("holder-1"), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leases.Create(ctx, "leases.short", []byte("holder-2"), time.Second); !errors.Is(err, ErrExists) {
		t.Fatalf("second holder: %v", err)
	}
	if c := recv(t, watch); c.Key != "leases.short" || c.Revision != rev || c.Deleted {
		t.Fatalf("watch saw %+v", c)
	}
	c := recv(t, watch)
	if c.Key != "leases.short" || !c.Deleted {
		t.Fatalf("watch saw %+v, want the expiry", c)
	}
	t.Logf("1s ttl: expiry seen after %s", time.Since(start).Round(time.Millisecond))
	if _, err := leases.Get(ctx, "leases.short"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired key: %v", err)
	}
	if _, err := leases.Create(ctx, "leases.short", []byte("holder-2"), time.Second); err != nil {
		t.Fatalf("create after expiry: %v", err)
	}
}

// TestTTLRenewal pins down what renewing a TTL key does: Refresh keeps it
// alive with a new TTL; Update keeps it for good.
func TestTTLRenewal(t *testing.T) {
	t.Parallel() // waits for TTLs to run out
	n := open(t, testConfig(t))
	leases := bucketOf(t, n, "leases")
	ctx := ctxFor(t, 30*time.Second)

	rr, err := leases.Create(ctx, "refreshed", []byte("1"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	ru, err := leases.Create(ctx, "updated", []byte("1"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rg, err := leases.Create(ctx, "left", []byte("1"), 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := leases.Refresh(ctx, "refreshed", []byte("x"), rg, 2*time.Second); !errors.Is(err, ErrConflict) {
		t.Fatalf("refresh by a stale revision: %v", err)
	}
	if _, err := leases.Refresh(ctx, "absent", []byte("x"), rg, 2*time.Second); !errors.Is(err, ErrNotFound) {
		t.Fatalf("refresh absent: %v", err)
	}
	// Renew every second for 4 s: twice the TTL.
	for range 4 {
		time.Sleep(time.Second)
		if rr, err = leases.Refresh(ctx, "refreshed", []byte("2"), rr, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if ru, err = leases.Update(ctx, "updated", []byte("2"), ru); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := leases.Get(ctx, "left"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unrenewed key after 4s of a 2s ttl: %v", err)
	}
	if _, err := leases.Get(ctx, "refreshed"); err != nil {
		t.Fatalf("refreshed key: %v", err)
	}
	if _, err := leases.Get(ctx, "updated"); err != nil {
		t.Fatalf("updated key: %v", err)
	}
	// Without renewal the refreshed key goes; the updated one has no TTL
	// any more.
	eventually(t, 10*time.Second, "refreshed key expires", func() bool {
		_, err := leases.Get(ctx, "refreshed")
		return errors.Is(err, ErrNotFound)
	})
	if _, err := leases.Get(ctx, "updated"); err != nil {
		t.Fatalf("updated key expired: %v", err)
	}
}

func TestRestart(t *testing.T) {
	cfg := testConfig(t)
	ctx := ctxFor(t, 30*time.Second)
	n, err := Open(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	b := bucketOf(t, n, "data")
	want := map[string]uint64{}
	for i := range 20 {
		key := fmt.Sprintf("apps.a%02d", i)
		rev, err := b.Put(ctx, key, []byte(key))
		if err != nil {
			t.Fatal(err)
		}
		want[key] = rev
	}
	b.Delete(ctx, "apps.a00", 0)
	delete(want, "apps.a00")
	last, _ := b.Put(ctx, "apps.a01", []byte("again"))
	want["apps.a01"] = last
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	n = open(t, cfg)
	b = bucketOf(t, n, "data")
	es, err := b.List(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != len(want) {
		t.Fatalf("after restart %d keys, want %d", len(es), len(want))
	}
	for _, e := range es {
		if want[e.Key] != e.Revision {
			t.Errorf("%s at revision %d, want %d", e.Key, e.Revision, want[e.Key])
		}
	}
	if e, _ := b.Get(ctx, "apps.a01"); string(e.Value) != "again" {
		t.Errorf("apps.a01 = %q", e.Value)
	}
	rev, err := b.Put(ctx, "apps.new", nil)
	if err != nil || rev <= last {
		t.Fatalf("revision after restart %d (last before %d), %v", rev, last, err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}

	// Reopening with other settings changes the bucket, keeping its keys.
	cfg.Buckets = []BucketSpec{{Name: "data", History: 3}}
	n = open(t, cfg)
	st, err := n.js.Stream(ctx, "KV_data")
	if err != nil {
		t.Fatal(err)
	}
	if h := st.CachedInfo().Config.MaxMsgsPerSubject; h != 3 {
		t.Fatalf("history after reopening with 3: %d", h)
	}
	if e, err := bucketOf(t, n, "data").Get(ctx, "apps.new"); err != nil || e.Revision != rev {
		t.Fatalf("apps.new after the settings change: %+v %v", e, err)
	}
}

// TestURL: a second catalog reaches the first one's server over TCP.
func TestURL(t *testing.T) {
	cfg := testConfig(t)
	cfg.ClientListen = "127.0.0.1:0"
	srv := open(t, cfg)
	url := srv.ClientURL()
	if !strings.HasPrefix(url, "nats://127.0.0.1:") {
		t.Fatalf("client url %q", url)
	}
	if u := open(t, testConfig(t)).ClientURL(); u != "" {
		t.Fatalf("server without a listener reports %q", u)
	}
	cli := open(t, Config{URL: url, Buckets: testBuckets, Logger: testLogger(t)})
	if cli.ClientURL() != url {
		t.Fatalf("client reports %q", cli.ClientURL())
	}
	ctx := ctxFor(t, 30*time.Second)
	rev, err := bucketOf(t, cli, "data").Create(ctx, "apps.remote", []byte("r"), 0)
	if err != nil {
		t.Fatal(err)
	}
	e, err := bucketOf(t, srv, "data").Get(ctx, "apps.remote")
	if err != nil || e.Revision != rev {
		t.Fatalf("read on the server: %+v %v", e, err)
	}
	if _, err := bucketOf(t, srv, "data").Update(ctx, "apps.remote", nil, rev); err != nil {
		t.Fatal(err)
	}
	if _, err := bucketOf(t, cli, "data").Update(ctx, "apps.remote", nil, rev); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale update over the network: %v", err)
	}
}

func TestPubSub(t *testing.T) {
	n := open(t, testConfig(t))
	ctx := ctxFor(t, 10*time.Second)

	got := make(chan string, 10)
	unsub, err := n.Subscribe("events.*.machine", func(subject string, data []byte) {
		got <- subject + " " + string(data)
	})
	if err != nil {
		t.Fatal(err)
	}
	// Subscriptions reach the server before later publishes on the same
	// connection, so nothing is missed.
	for _, s := range []string{"events.ams.machine", "events.ams.other", "events.syd.machine"} {
		if err := n.Publish(ctx, s, []byte("started")); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"events.ams.machine started", "events.syd.machine started"} {
		select {
		case g := <-got:
			if g != want {
				t.Fatalf("got %q, want %q", g, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no %q", want)
		}
	}
	unsub()
	n.Publish(ctx, "events.ams.machine", []byte("late"))
	n.nc.Flush()
	select {
	case g := <-got:
		t.Fatalf("after unsubscribe: %q", g)
	case <-time.After(100 * time.Millisecond):
	}
	for _, s := range []string{"$KV.data.x", "", "a..b", "a.>"} {
		if err := n.Publish(ctx, s, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("publish %q: %v", s, err)
		}
	}
	if _, err := n.Subscribe("$JS.API.>", func(string, []byte) {}); !errors.Is(err, ErrInvalid) {
		t.Errorf("subscribe to the store's subjects: %v", err)
	}
}

// TestCloseLeavesNothing: open, use and close catalogs; the goroutines go
// with them.
func TestCloseLeavesNothing(t *testing.T) {
	cfg := testConfig(t)
	ctx := ctxFor(t, 30*time.Second)
	base := runtime.NumGoroutine()
	for range 3 {
		n, err := Open(ctx, cfg)
		if err != nil {
			t.Fatal(err)
		}
		b := bucketOf(t, n, "data")
		b.Put(ctx, "apps.a", []byte("x"))
		if _, err := b.Watch(ctx, "apps."); err != nil {
			t.Fatal(err)
		}
		if _, err := n.Subscribe("events.>", func(string, []byte) {}); err != nil {
			t.Fatal(err)
		}
		b.List(ctx, "")
		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		if err := n.Close(); err != nil {
			t.Fatalf("second close: %v", err)
		}
	}
	settleGoroutines(t, base, 2)
}
