package mesh

import (
	"bytes"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/flamehq/flame/internal/netsim"
)

// TestRestartedHostRenewsSessions restarts a host's mesh — a new device
// with the same key at the same endpoint, as `flame agent` started again on
// its data dir — while its peer keeps the session it had. The restarted
// device knows nothing of that session and drops what comes under it; left
// to itself the peer would only renew it when its own timer fires,
// KeepaliveTimeout + RekeyTimeout after it first sends unanswered. The
// restarted host (Config.Restarted) handshakes with each peer as it
// configures it, so the peer's packets cross again well before
// KeepaliveTimeout.
func TestRestartedHostRenewsSessions(t *testing.T) {
	const oneWay = 5 * time.Millisecond
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return oneWay }})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7)
	b := newSimHost(t, n, "b", 2, 7)
	apply(t, a, a, b)
	apply(t, b, a, b)
	first := packet(a.addr(7, 2), b.addr(7, 2), "before")
	a.tun.Outbound <- first
	if got := receive(t, b, patience); !bytes.Equal(got, first) {
		t.Fatalf("b's TUN gave %x, want %x", got, first)
	}

	// b restarts: same key, same port; a's configuration of b does not
	// change (same key, endpoint and prefixes), so a keeps its session.
	key := b.mesh.cfg.Key
	port := b.mesh.Endpoint().Port()
	advertise := b.mesh.Endpoint().Addr()
	if err := b.mesh.Close(); err != nil {
		t.Fatal(err)
	}
	ct := tuntest.NewChannelTUN()
	m, err := New(Config{
		HostID: "b", Network: testNetwork, Host: b.num, Key: key, TUN: ct.TUN(), Port: port, Restarted: true,
		Bind:      &PacketBind{Listen: func(port int) (net.PacketConn, error) { return n.ListenPacket("b", port) }},
		Advertise: advertise,
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	if m.Endpoint() != netip.AddrPortFrom(advertise, port) {
		t.Fatalf("restarted at %v, want %v", m.Endpoint(), netip.AddrPortFrom(advertise, port))
	}
	b.mesh, b.tun = m, ct
	apply(t, b, a, b)

	// a sends on, a packet every few round trips, until one comes out of
	// the new device's TUN. A handshake is three one-way trips; before
	// KeepaliveTimeout is hundreds of them, and a's own timer cannot have
	// fired yet.
	start := time.Now()
	deadline := time.After(device.KeepaliveTimeout)
	tick := time.NewTicker(10 * oneWay)
	defer tick.Stop()
	for {
		p := packet(a.addr(7, 2), b.addr(7, 2), "after")
		select {
		case a.tun.Outbound <- p:
		case <-deadline:
			t.Fatalf("nothing crossed to the restarted host in %v: the peer kept its stale session", device.KeepaliveTimeout)
		}
		select {
		case got := <-ct.Inbound:
			if !bytes.Equal(got, p) && !bytes.Equal(got[40:], []byte("after")) {
				t.Fatalf("the restarted host's TUN gave %x", got)
			}
			t.Logf("crossed again %v after the restart", time.Since(start).Round(time.Millisecond))
			return
		case <-tick.C:
		case <-deadline:
			t.Fatalf("nothing crossed to the restarted host in %v: the peer kept its stale session", device.KeepaliveTimeout)
		}
	}
}
