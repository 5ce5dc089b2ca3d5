package devcluster

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
)

// statusOf is what from believes of host id.
func statusOf(c *Cluster, from, id string) *cluster.Host {
	if h := c.host(from).Cluster.Snapshot().Host(id); h != nil {
		return h
	}
	return &cluster.Host{}
}

// TestNetworkFaults shows each fault of the network real to the protocols
// that cross it: a partition makes gossip on each side give the other up
// and a heal brings them together again; loss drops a host's datagrams
// while it keeps sending; a slow link raises the round trip gossip
// measures; a stalled host is silent to calls across the cluster, and
// answers again once the stall ends.
func TestNetworkFaults(t *testing.T) {
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}}, nil)
	converge := func(t *testing.T) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.WaitConverged(ctx); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("bad input", func(t *testing.T) {
		for _, err := range []error{
			c.Partition([]string{"nowhere"}, []string{"ams"}),
			c.Loss([]string{"ams"}, []string{"lhr-1"}, 5),
			c.StallHost("iad-9", time.Second),
			c.StallHost("iad", time.Second), // a region is not a host
		} {
			if !errors.Is(err, ErrUnknownTarget) {
				t.Errorf("got %v, want ErrUnknownTarget", err)
			}
		}
		for _, err := range []error{
			c.Partition([]string{"ams"}, []string{"ams-1", "iad"}),
			c.Partition([]string{"ams"}, nil),
			c.Loss([]string{"ams"}, []string{"iad"}, 101),
			c.SlowLink([]string{"ams"}, []string{"iad"}, -time.Millisecond),
			c.StallHost("iad-1", 0),
		} {
			if !errors.Is(err, ErrBadFault) {
				t.Errorf("got %v, want ErrBadFault", err)
			}
		}
		if st := c.Status(); len(st.Links)+len(st.Stalled)+len(st.Killed) != 0 {
			t.Fatalf("refused faults show: %+v", st)
		}
	})

	t.Run("partition", func(t *testing.T) {
		if err := c.Partition([]string{"ams"}, []string{"iad-1", "iad-2"}); err != nil {
			t.Fatal(err)
		}
		if st := c.Status(); len(st.Links) != 1 || st.Links[0].Kind != "partition" {
			t.Fatalf("status: %+v", st)
		}
		waitUntil(t, "each side to give the other up", func() bool {
			for _, p := range [][2]string{{"ams-1", "iad-1"}, {"ams-2", "iad-2"}, {"iad-1", "ams-2"}, {"iad-2", "ams-1"}} {
				if statusOf(c, p[0], p[1]).Status == cluster.StatusAlive {
					return false
				}
			}
			return true
		})
		c.Heal()
		if st := c.Status(); len(st.Links) != 0 {
			t.Fatalf("status after heal: %+v", st)
		}
		converge(t)
	})

	t.Run("loss", func(t *testing.T) {
		if err := c.Loss([]string{"ams-1"}, []string{"ams-2", "iad"}, 100); err != nil {
			t.Fatal(err)
		}
		// ams-1 keeps gossiping, and hears nothing: once what was in
		// flight has landed, a whole second passes with datagrams sent
		// and none received.
		waitUntil(t, "ams-1 to receive no datagram for a second while it sends", func() bool {
			sent0, recv0 := packets(c, "ams-1")
			time.Sleep(time.Second)
			sent1, recv1 := packets(c, "ams-1")
			return recv1 == recv0 && sent1 > sent0
		})
		if err := c.Loss([]string{"ams-1"}, []string{"ams-2", "iad"}, 0); err != nil {
			t.Fatal(err)
		}
		if st := c.Status(); len(st.Links) != 0 {
			t.Fatalf("status after loss 0: %+v", st)
		}
		_, recv0 := packets(c, "ams-1")
		waitUntil(t, "ams-1 to receive datagrams again", func() bool {
			_, recv := packets(c, "ams-1")
			return recv > recv0
		})
		converge(t)
	})

	t.Run("slow link", func(t *testing.T) {
		const extra = 15 * time.Millisecond
		if err := c.SlowLink([]string{"ams-1"}, []string{"ams-2"}, extra); err != nil {
			t.Fatal(err)
		}
		// The round trip is now at least 2·extra: gossip's smoothed
		// measure passes extra after a few probes.
		waitUntil(t, "ams-1 to measure the slow link to ams-2", func() bool {
			return statusOf(c, "ams-1", "ams-2").RTT >= extra
		})
		c.Heal()
	})

	t.Run("stall", func(t *testing.T) {
		client := &http.Client{Transport: &http.Transport{DialContext: c.sim.dialerFrom("ams-1")}}
		defer client.CloseIdleConnections()
		call := func(timeout time.Duration) error {
			ctx, cancel := context.WithTimeout(context.Background(), timeout)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, "GET", c.host("iad-2").APIURL+"/v1/apps", nil)
			resp, err := client.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			return err
		}
		if err := call(10 * time.Second); err != nil {
			t.Fatalf("call before the stall: %v", err)
		}
		client.CloseIdleConnections()
		if err := c.StallHost("iad-2", time.Minute); err != nil {
			t.Fatal(err)
		}
		if st := c.Status(); len(st.Stalled) != 1 || st.Stalled[0].Host != "iad-2" {
			t.Fatalf("status: %+v", st)
		}
		if err := call(300 * time.Millisecond); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("call to a stalled host: %v, want no answer", err)
		}
		waitUntil(t, "iad-1 to give its stalled neighbour up", func() bool {
			return statusOf(c, "iad-1", "iad-2").Status != cluster.StatusAlive
		})
		// Stalled again, for a moment: it resumes when that ends.
		if err := c.StallHost("iad-2", time.Millisecond); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "the stall to end", func() bool { return len(c.Status().Stalled) == 0 })
		if err := call(10 * time.Second); err != nil {
			t.Fatalf("call after the stall: %v", err)
		}
		converge(t)
	})

	t.Run("kill and revive", func(t *testing.T) {
		ctx := context.Background()
		if _, err := c.Revive(ctx, "iad-2"); !errors.Is(err, ErrNotKilled) {
			t.Fatalf("revive of a live host: %v", err)
		}
		port := freePort(t)
		m, err := c.HostClient(c.host("iad-2")).Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
			Restart: &api.MachineRestart{Policy: api.RestartNo},
		}})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.KillHost(ctx, "iad-2"); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "iad-1 to give iad-2 up", func() bool {
			return statusOf(c, "iad-1", "iad-2").Status != cluster.StatusAlive
		})
		ids, err := c.Revive(ctx, "iad")
		if err != nil || len(ids) != 1 || ids[0] != "iad-2" {
			t.Fatalf("revive iad: %v, %v", ids, err)
		}
		if c.Killed("iad-2") || len(c.Status().Killed) != 0 {
			t.Fatalf("revived, still killed: %+v", c.Status())
		}
		converge(t)
		// It started from its data dir: the machine it ran is there, its
		// process gone with the crash.
		got, err := c.HostClient(c.host("iad-2")).Get(ctx, "demo", m.ID)
		if err != nil {
			t.Fatalf("the machine after revive: %v", err)
		}
		if got.State != api.StateStopped {
			t.Errorf("the machine after revive: %s, want stopped (restart policy no)", got.State)
		}
		if conn, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second); err == nil {
			conn.Close()
			t.Errorf("the machine's process outlived its host's crash")
		}
	})
}

func packets(c *Cluster, id string) (sent, recv uint64) {
	_, _, sent, recv = c.Net.Stats(id)
	return sent, recv
}

// TestShutdownAfterKill: a cluster with a killed region shuts down as
// flame dev does on Ctrl-C, destroying everything: the killed hosts are
// revived to destroy their machines, and nothing hangs.
func TestShutdownAfterKill(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1}, nil)
	cl := c.HostClient(c.host("iad-1"))
	m, err := cl.Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(freePort(t))},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.KillRegion(ctx, "iad"); err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := c.Shutdown(sctx, true); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if sctx.Err() != nil {
		t.Fatal("shutdown ran out of time")
	}
	if ms := c.host("iad-1").Agent.AllMachines(); len(ms) != 0 {
		t.Fatalf("machines left on the killed host: %v (of %s)", ms, m.ID)
	}
}
