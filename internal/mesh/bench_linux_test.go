package mesh

import (
	"context"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/netsim"
)

// BenchmarkPrivateNetwork compares, between machines of one org on two
// hosts of one kernel, the path through the hosts' tunnels (wireguard-go
// over the simulated network, no added latency: two hosts of one region
// next to each other) with the bare path the kernel takes without the
// mesh's rules (bridge to bridge). It reports each path's median TCP round
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
	for _, h := range []*kernelHost{ha, hb} {
		if err := h.mesh.Apply([]*cluster.Host{ha.facts, hb.facts}); err != nil {
			b.Fatal(err)
		}
	}
	echo := hb.echo(b)
	sink := hb.sink(b)
	paths := []struct {
		name string
		set  func()
	}{
		{"tunnel", func() {}},
		{"bridge", func() {
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
