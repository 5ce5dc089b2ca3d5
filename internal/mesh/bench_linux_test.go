package mesh

import (
	"context"
	"io"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/netsim"
)

// BenchmarkPrivateNetwork compares, between machines of one org on two
// hosts of one kernel, the path through the hosts' tunnels (wireguard-go
// over the simulated network with no added latency, as between two `flame
// dev` hosts next to each other; and over the kernel's UDP on loopback, as
// between agents) with the bare path the kernel takes without the mesh's
// rules (bridge to bridge). It reports each path's median TCP round
// trip of 64 bytes and its one-way TCP throughput, side by side:
//
//	go test -run '^$' -bench PrivateNetwork ./internal/mesh
func BenchmarkPrivateNetwork(b *testing.B) {
	tag := randTag(b)
	network := layout.Network(0xfd000000 | uint32(time.Now().UnixNano()&0xffffff))
	n := netsim.New(netsim.Config{})
	defer n.Close()
	ha := newKernelHost(b, tag, network, 1, 7)
	hb := newKernelHost(b, tag, network, 2, 7)
	ha.startMesh(b, n, tag, network)
	hb.startMesh(b, n, tag, network)
	// The same over the kernel's UDP on loopback, as `flame agent` runs
	// its tunnels, between two more hosts of another network.
	udpNet := network ^ 0x00800000
	ua := newKernelHost(b, tag+"u", udpNet, 1, 7)
	ub := newKernelHost(b, tag+"u", udpNet, 2, 7)
	ua.startMeshOn(b, tag+"u", udpNet, conn.NewStdNetBind(), netip.MustParseAddr("127.0.0.1"))
	ub.startMeshOn(b, tag+"u", udpNet, conn.NewStdNetBind(), netip.MustParseAddr("127.0.0.1"))
	for _, pair := range [][2]*kernelHost{{ha, hb}, {ua, ub}} {
		for _, h := range pair {
			if err := h.mesh.Apply([]*cluster.Host{pair[0].facts, pair[1].facts}); err != nil {
				b.Fatal(err)
			}
		}
	}
	paths := []struct {
		name       string
		from       *kernelHost
		echo, sink string
		set        func()
	}{
		{"tunnel-netsim", ha, hb.echo(b), hb.sink(b), func() {}},
		{"tunnel-udp", ua, ub.echo(b), ub.sink(b), func() {}},
		{"bridge", ha, hb.echo(b), hb.sink(b), func() {
			for _, h := range []*kernelHost{ha, hb} {
				if err := netlink.RuleDel(h.link.rule); err != nil {
					b.Fatal(err)
				}
				h.link.rule = nil
			}
		}},
	}
	for _, p := range paths {
		p.set()
		ha, echo, sink := p.from, p.echo, p.sink
		b.Run(p.name+"/rtt", func(b *testing.B) {
			c := mustDial(b, ha, echo)
			defer c.Close()
			msg := make([]byte, 64)
			roundTrip(c, msg) // the handshake, once
			rtts := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				d, err := roundTrip(c, msg)
				if err != nil {
					b.Fatal(err)
				}
				rtts = append(rtts, d)
			}
			slices.Sort(rtts)
			b.ReportMetric(float64(rtts[len(rtts)/2].Microseconds()), "µs-p50-rtt")
		})
		b.Run(p.name+"/throughput", func(b *testing.B) {
			c := mustDial(b, ha, sink)
			defer c.Close()
			buf := make([]byte, 64<<10)
			b.SetBytes(int64(len(buf)))
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(buf); err != nil {
					b.Fatal(err)
				}
			}
			c.(*net.TCPConn).CloseWrite()
			io.ReadAll(c) // the sink closes once it has read everything
		})
	}
}

func mustDial(b *testing.B, h *kernelHost, addr string) net.Conn {
	ctx, cancel := context.WithTimeout(context.Background(), patience)
	defer cancel()
	c, err := h.dial(b, ctx, addr)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// sink listens on TCP in h's machine and reads each connection to its end.
func (h *kernelHost) sink(t testing.TB) string {
	t.Helper()
	var ln net.Listener
	inNS(t, h.machine, func() {
		var err error
		if ln, err = net.Listen("tcp6", "[::]:0"); err != nil {
			t.Fatal(err)
		}
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(io.Discard, c); c.Close() }()
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	return net.JoinHostPort(h.addr.String(), port)
}
