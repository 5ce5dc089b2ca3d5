package server_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/server"
)

// TestGossipKeyRotation: an admin rotates the gossip key; every host ends
// with the new key alone, the cluster stays whole through the rounds, a
// member holding the old key can no longer join, and one holding the new
// key can.
func TestGossipKeyRotation(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams", "iad"}, perReg: 2})
	ctx := context.Background()
	old := c.GossipKey()
	if len(old) != 32 {
		t.Fatalf("the dev cluster's gossip key: %d bytes", len(old))
	}
	for _, h := range c.Hosts {
		if !h.Cluster.Encrypted() || !h.Cluster.Trusted() {
			t.Fatalf("%s: encrypted %v, checks records %v", h.ID, h.Cluster.Encrypted(), h.Cluster.Trusted())
		}
	}
	cl, _ := orgWithApp(t, c, "acme", "shop")
	if _, err := cl.RotateGossipKey(ctx); status(err) != 403 {
		t.Fatalf("an org's token rotated the gossip key: %v", err)
	}
	// Watch the plane's view through the rotation: no host may drop out.
	stop := make(chan struct{})
	lost := make(chan string, 1)
	go func() {
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			for _, h := range c.Hosts {
				if ho := c.Plane.Cluster.Snapshot().Host(h.ID); ho == nil || !ho.Up() {
					select {
					case lost <- h.ID:
					default:
					}
				}
			}
		}
	}()
	logged := len(c.Logs())
	out, err := c.admin.RotateGossipKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Long enough for any host cut off by the rotation to be suspected and
	// declared dead (the dev cluster's probe timings, several times over).
	time.Sleep(3 * time.Second)
	close(stop)
	select {
	case id := <-lost:
		t.Errorf("host %s dropped out of the plane's view during the rotation", id)
	default:
	}
	// Not one packet or stream went unread for want of a key.
	for _, line := range strings.Split(c.Logs()[logged:], "\n") {
		if strings.Contains(line, "ecrypt") || strings.Contains(line, "encrypt") {
			t.Errorf("during the rotation: %s", line)
		}
	}
	if len(out.Hosts) != len(c.Hosts) || len(out.Skipped) != 0 {
		t.Fatalf("rotation reached %v, skipped %v", out.Hosts, out.Skipped)
	}
	var next []byte
	for _, h := range c.Hosts {
		gt, err := host.LoadGossipTrust(h.DataDir())
		if err != nil || gt == nil || len(gt.Keys) != 1 {
			t.Fatalf("%s keeps %+v (%v)", h.ID, gt, err)
		}
		if bytes.Equal(gt.Keys[0], old) {
			t.Fatalf("%s still holds the old key", h.ID)
		}
		if next == nil {
			next = gt.Keys[0]
		} else if !bytes.Equal(next, gt.Keys[0]) {
			t.Fatalf("%s holds another key than the others", h.ID)
		}
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitConverged(wctx); err != nil {
		t.Fatalf("after rotation: %v", err)
	}
	member := func(name string, key []byte) (int, error) {
		if _, err := c.Net.AddHost(name); err != nil {
			t.Fatal(err)
		}
		tr, err := c.Net.Transport(name, 7946)
		if err != nil {
			t.Fatal(err)
		}
		m, err := cluster.New(cluster.Config{HostID: name, Region: "ams", Transport: tr, GossipKeys: [][]byte{key},
			Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Start(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		return m.Join([]string{c.Hosts[0].Cluster.GossipAddr()})
	}
	if n, err := member("stale-1", old); err == nil || n != 0 {
		t.Errorf("a member with the old key joined (%d, %v)", n, err)
	}
	if n, err := member("fresh-1", next); err != nil || n != 1 {
		t.Errorf("a member with the new key could not join (%d, %v)", n, err)
	}
}

// TestRevokedHostLeavesGossip: once revoked, a host's facts are dropped by
// every other host and by the plane before the revocation returns, and
// what it publishes next is refused.
func TestRevokedHostLeavesGossip(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 3})
	ctx := context.Background()
	cl, _ := orgWithApp(t, c, "acme", "shop")
	victim := c.Hosts[0]
	var onVictim string
	for i := 0; onVictim == "" && i < 30; i++ {
		m, err := cl.Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.HostClient(victim).Get(ctx, "shop", m.ID); err == nil {
			onVictim = m.ID
		}
	}
	if onVictim == "" {
		t.Fatal("no machine landed on the victim")
	}
	others := []*cluster.Cluster{c.Plane.Cluster, c.Hosts[1].Cluster, c.Hosts[2].Cluster}
	holders := func(id string) []string {
		var out []string
		for _, m := range others {
			if s := m.Snapshot(); s.Machine(id) != nil {
				out = append(out, s.Self)
			}
		}
		return out
	}
	for end := time.Now().Add(10 * time.Second); len(holders(onVictim)) != 3; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("the victim's machine reached only %v", holders(onVictim))
		}
	}
	if err := c.admin.RevokeHost(ctx, victim.ID); err != nil {
		t.Fatal(err)
	}
	// The revocation reached every host before the call returned.
	if hs := holders(onVictim); len(hs) != 0 {
		t.Fatalf("after revocation %v still hold the revoked host's machine", hs)
	}
	// The revoked host changes its facts: a machine made on it directly.
	m, err := c.HostClient(victim).Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	for end := time.Now().Add(5 * time.Second); victim.Cluster.Snapshot().Machine(m.ID) == nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("the victim never published its new machine")
		}
	}
	time.Sleep(3 * time.Second) // gossip, and a gap's repair, many times over
	if hs := append(holders(onVictim), holders(m.ID)...); len(hs) != 0 {
		t.Fatalf("%v took the revoked host's facts", hs)
	}
	for _, h := range c.Hosts[1:] {
		gt, err := host.LoadGossipTrust(h.DataDir())
		if err != nil || gt == nil || len(gt.Revoked) != 1 {
			t.Errorf("%s keeps %+v (%v)", h.ID, gt, err)
		}
	}
}

// TestRevocationReachesAHostThatMissedIt: a host cut off while another was
// revoked missed the revocation's push; the revocation list the plane keeps
// pushing reaches it once it is back, and its gossip then refuses the
// revoked host's facts too.
func TestRevocationReachesAHostThatMissedIt(t *testing.T) {
	defer func(d time.Duration) { server.RevocationPushInterval = d }(server.RevocationPushInterval)
	server.RevocationPushInterval = 200 * time.Millisecond
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 3})
	ctx := context.Background()
	orgWithApp(t, c, "acme", "shop")
	victim, away := c.Hosts[0], c.Hosts[2]
	m, err := c.HostClient(victim).Create(ctx, "shop", api.LaunchMachineInput{Config: demoConfig()})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the other host to see the victim's machine", 10*time.Second, func() bool {
		return away.Cluster.Snapshot().Machine(m.ID) != nil
	})
	c.Net.Kill(away.ID)
	if err := c.admin.RevokeHost(ctx, victim.ID); err != nil {
		t.Fatal(err)
	}
	if gt, err := host.LoadGossipTrust(away.DataDir()); err != nil || gt != nil && len(gt.Revoked) != 0 {
		t.Fatalf("the cut-off host got the revocation's push: %+v %v", gt, err)
	}
	c.Net.Revive(away.ID)
	waitUntil(t, "the host back to refuse the revoked host's facts", 30*time.Second, func() bool {
		return away.Cluster.Snapshot().Machine(m.ID) == nil
	})
}
