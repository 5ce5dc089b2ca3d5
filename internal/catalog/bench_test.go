package catalog

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"testing"
	"time"
)

// BenchmarkWrite measures one writer's latency per acknowledged write on an
// embedded server: Update by revision and Put with sync_always (every write
// on disk before its ack), against Update with the file store's default
// interval sync, and Update on a three-server cluster (R3, quorum 2), open
// and locked (routes over TLS).
//
//	go test ./internal/catalog -run '^$' -bench Write -benchtime 2000x
func BenchmarkWrite(b *testing.B) {
	value := []byte(`{"name":"myapp","org":"personal","machines":3,"status":"deployed","version":17}`)
	single := func(b *testing.B, relaxed bool) Bucket {
		cfg := testConfig(b)
		cfg.relaxedSync = relaxed
		return bucketOf(b, open(b, cfg), "data")
	}
	update := func(b *testing.B, bk Bucket) {
		ctx := context.Background()
		rev, err := bk.Create(ctx, "apps.myapp", value, 0)
		if err != nil {
			b.Fatal(err)
		}
		measure(b, func() {
			if rev, err = bk.Update(ctx, "apps.myapp", value, rev); err != nil {
				b.Fatal(err)
			}
		})
	}
	b.Run("update/sync=always", func(b *testing.B) { update(b, single(b, false)) })
	b.Run("put/sync=always", func(b *testing.B) {
		bk := single(b, false)
		ctx := context.Background()
		i := 0
		measure(b, func() {
			i++
			if _, err := bk.Put(ctx, fmt.Sprintf("machines.%06d", i%1000), value); err != nil {
				b.Fatal(err)
			}
		})
	})
	b.Run("update/sync=interval", func(b *testing.B) { update(b, single(b, true)) })
	b.Run("update/r3-cluster", func(b *testing.B) {
		nodes := openCluster(b)
		update(b, bucketOf(b, nodes[1], "data"))
	})
	// Routes over TLS 1.3 with the catalog's certificates, clients signing
	// in with nkeys (a locked catalog).
	b.Run("update/r3-cluster-locked", func(b *testing.B) {
		nodes := openClusterWith(b, newSecret(b))
		update(b, bucketOf(b, nodes[1], "data"))
	})
}

// measure runs op b.N times and reports its latency percentiles.
func measure(b *testing.B, op func()) {
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for b.Loop() {
		start := time.Now()
		op()
		lat = append(lat, time.Since(start))
	}
	b.StopTimer()
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[int(p*float64(len(lat)-1))]) / float64(time.Microsecond)
	}
	b.ReportMetric(pct(0.50), "p50-µs")
	b.ReportMetric(pct(0.99), "p99-µs")
}

// BenchmarkList lists 3,000 keys of a bucket holding 3,001.
func BenchmarkList(b *testing.B) {
	cfg := testConfig(b)
	cfg.relaxedSync = true
	bk := bucketOf(b, open(b, cfg), "data")
	ctx := context.Background()
	for i := range 3000 {
		if _, err := bk.Put(ctx, fmt.Sprintf("machines.%06d", i), []byte(`{"state":"started"}`)); err != nil {
			b.Fatal(err)
		}
	}
	bk.Put(ctx, "apps.one", nil)
	for b.Loop() {
		es, err := bk.List(ctx, "machines.")
		if err != nil || len(es) != 3000 {
			b.Fatalf("%d entries, %v", len(es), err)
		}
	}
}

// BenchmarkOpen opens and closes an embedded catalog with three buckets in
// a fresh directory.
func BenchmarkOpen(b *testing.B) {
	log := slog.New(slog.DiscardHandler)
	for b.Loop() {
		n, err := Open(context.Background(), Config{DataDir: b.TempDir(), Buckets: testBuckets, Logger: log})
		if err != nil {
			b.Fatal(err)
		}
		if err := n.Close(); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLocked compares a client reaching the embedded server over TCP
// in clear without credentials against one over TLS signing in with the
// control role's nkey (a locked catalog), for a write (Update, interval
// sync so the disk does not hide the link) and a read (Get); and the
// in-process connection the control plane uses, open against locked.
//
//	go test ./internal/catalog -run '^$' -bench Locked -benchtime 3000x
func BenchmarkLocked(b *testing.B) {
	value := []byte(`{"name":"myapp","org":"personal","machines":3,"status":"deployed","version":17}`)
	client := func(b *testing.B, locked, tcp bool) Bucket {
		cfg := testConfig(b)
		cfg.Logger = slog.New(slog.DiscardHandler)
		cfg.relaxedSync = true
		cfg.ClientListen = "127.0.0.1:0"
		if locked {
			cfg.Secret = newSecret(b)
		}
		srv := open(b, cfg)
		if !tcp {
			return bucketOf(b, srv, "data")
		}
		cc := Config{URL: srv.ClientURL(), Secret: cfg.Secret, Bind: true, Buckets: testBuckets, Logger: cfg.Logger}
		return bucketOf(b, open(b, cc), "data")
	}
	for _, link := range []struct {
		name string
		tcp  bool
	}{{"tcp", true}, {"inproc", false}} {
		for _, lock := range []struct {
			name   string
			locked bool
		}{{"open", false}, {"tls+nkey", true}} {
			if !link.tcp && lock.locked {
				lock.name = "nkey"
			}
			b.Run(link.name+"/"+lock.name+"/update", func(b *testing.B) {
				bk := client(b, lock.locked, link.tcp)
				ctx := context.Background()
				rev, err := bk.Create(ctx, "apps.myapp", value, 0)
				if err != nil {
					b.Fatal(err)
				}
				measure(b, func() {
					if rev, err = bk.Update(ctx, "apps.myapp", value, rev); err != nil {
						b.Fatal(err)
					}
				})
			})
			b.Run(link.name+"/"+lock.name+"/get", func(b *testing.B) {
				bk := client(b, lock.locked, link.tcp)
				ctx := context.Background()
				if _, err := bk.Put(ctx, "apps.myapp", value); err != nil {
					b.Fatal(err)
				}
				measure(b, func() {
					if _, err := bk.Get(ctx, "apps.myapp"); err != nil {
						b.Fatal(err)
					}
				})
			})
		}
	}
}
