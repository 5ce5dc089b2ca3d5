package catalog

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// openCluster starts three embedded servers in one JetStream cluster, each
// configured with all three route addresses, as three `flame server`s are.
// Open returns once the R3 buckets exist, which needs all three, so they
// open concurrently.
func openCluster(t testing.TB) []*NATS {
	t.Helper()
	return openClusterWith(t, nil)
}

// openClusterWith is openCluster, locked with secret when it is not nil.
func openClusterWith(t testing.TB, secret []byte) []*NATS {
	t.Helper()
	spec := []BucketSpec{{Name: "data"}, {Name: "leases", TTL: true}}
	ports := routePorts(t, 3)
	var routes []string
	for _, p := range ports {
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", p))
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	nodes := make([]*NATS, 3)
	errs := make([]error, 3)
	var wg sync.WaitGroup
	for i := range nodes {
		name := fmt.Sprintf("s%d", i+1)
		wg.Go(func() {
			nodes[i], errs[i] = Open(ctx, Config{
				DataDir:       t.TempDir(),
				ServerName:    name,
				ClusterListen: fmt.Sprintf("127.0.0.1:%d", ports[i]),
				Routes:        routes,
				Replicas:      3,
				Buckets:       spec,
				Secret:        secret,
				Logger:        testLogger(t).With("server", name),
			})
		})
	}
	wg.Wait()
	for i, n := range nodes {
		if n != nil {
			t.Cleanup(func() { n.Close() })
		}
		if errs[i] != nil {
			t.Errorf("open s%d: %v", i+1, errs[i])
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("three-server cluster up in %s", time.Since(start).Round(time.Millisecond))
	return nodes
}

// routePorts finds free loopback ports below Linux's ephemeral range
// (32768–60999), where the kernel does not hand out ports by itself, so
// another process is unlikely to take one between this check and the
// server's bind.
func routePorts(t testing.TB, count int) []int {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 0))
	var ports []int
	for tries := 0; len(ports) < count; tries++ {
		if tries > 1000 {
			t.Fatal("no free ports in 20000–32767")
		}
		p := 20000 + rng.IntN(12768)
		if slices.Contains(ports, p) {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		ports = append(ports, p)
	}
	return ports
}

func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster elections take seconds")
	}
	t.Parallel()
	nodes := openCluster(t)
	ctx := ctxFor(t, 60*time.Second)
	data := func(i int) Bucket { return bucketOf(t, nodes[i], "data") }

	// Write on one server, read and CAS on the others.
	rev, err := data(0).Create(ctx, "apps.a", []byte("v1"), 0)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i < 3; i++ {
		e, err := data(i).Get(ctx, "apps.a")
		if err != nil || e.Revision != rev || string(e.Value) != "v1" {
			t.Fatalf("s%d reads %+v, %v", i+1, e, err)
		}
	}
	rev2, err := data(1).Update(ctx, "apps.a", []byte("v2"), rev)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := data(2).Update(ctx, "apps.a", []byte("stale"), rev); !errors.Is(err, ErrConflict) {
		t.Fatalf("stale update on a replicated bucket: %v", err)
	}
	if _, err := data(2).Create(ctx, "apps.a", nil, 0); !errors.Is(err, ErrExists) {
		t.Fatalf("create existing on a replicated bucket: %v", err)
	}
	if e, _ := data(2).Get(ctx, "apps.a"); e.Revision != rev2 {
		t.Fatalf("s3 reads revision %d right after s2 wrote %d", e.Revision, rev2)
	}

	// Stop the server leading the bucket's stream: the hardest one to lose.
	victim := 0
	for i, n := range nodes {
		if n.srv.JetStreamIsStreamLeader("$G", "KV_data") {
			victim = i
		}
	}
	t.Logf("stopping s%d, the stream leader", victim+1)
	stopped := time.Now()
	if err := nodes[victim].Close(); err != nil {
		t.Fatal(err)
	}
	live := []int{}
	for i := range nodes {
		if i != victim {
			live = append(live, i)
		}
	}

	// The other two elect a new leader and go on accepting writes.
	var last uint64
	for {
		last, err = data(live[0]).Update(ctx, "apps.a", []byte("v3"), rev2)
		if err == nil {
			break
		}
		if errors.Is(err, ErrConflict) || ctx.Err() != nil {
			t.Fatalf("update after losing a server: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("first write %s after the stop", time.Since(stopped).Round(time.Millisecond))
	for range 10 {
		if _, _, err := UpdateJSON(ctx, data(live[1]), "counters.c", func(c *int, _ bool) error {
			*c++
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	e, err := data(live[1]).Get(ctx, "apps.a")
	if err != nil || e.Revision != last || string(e.Value) != "v3" {
		t.Fatalf("s%d reads %+v, %v", live[1]+1, e, err)
	}
	if v, _, err := GetJSON[int](ctx, data(live[0]), "counters.c"); err != nil || v != 10 {
		t.Fatalf("counter = %d, %v", v, err)
	}
}
