package netsim

import (
	"context"
	"io"
	"net"
	"testing"
	"testing/synctest"
	"time"
)

// A cut link drops datagrams between its two ends only and holds stream
// segments until it is cleared; other links are untouched.
func TestLinkCut(t *testing.T) {
	n := newNet(t, Config{}, "a", "b", "c")
	l, _ := n.Listen("b", 80)
	accepted := make(chan net.Conn, 1)
	go func() {
		if c, err := l.Accept(); err == nil {
			accepted <- c
		}
	}()
	ab, err := n.Dial(context.Background(), "a", "b:80")
	if err != nil {
		t.Fatal(err)
	}
	ba := <-accepted
	if err := n.SetLink("b", "a", LinkFault{Cut: true}); err != nil {
		t.Fatal(err)
	}
	if f := n.Link("a", "b"); !f.Cut {
		t.Fatalf("link a-b: %+v, want cut both ways", f)
	}
	pa, _ := n.ListenPacket("a", 53)
	pb, _ := n.ListenPacket("b", 53)
	pc, _ := n.ListenPacket("c", 53)
	pa.WriteTo([]byte("a→b"), pb.LocalAddr())
	pa.WriteTo([]byte("a→c"), pc.LocalAddr())
	pc.WriteTo([]byte("c→b"), pb.LocalAddr())
	buf := make([]byte, 64)
	if k, _, err := pc.ReadFrom(buf); err != nil || string(buf[:k]) != "a→c" {
		t.Fatalf("a→c across an untouched link: %q, %v", buf[:k], err)
	}
	if k, _, err := pb.ReadFrom(buf); err != nil || string(buf[:k]) != "c→b" {
		t.Fatalf("b read %q, %v; want only c→b", buf[:k], err)
	}
	if _, err := ab.Write([]byte("held")); err != nil {
		t.Fatal(err)
	}
	ba.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	if _, err := ba.Read(buf); !isTimeout(err) {
		t.Fatalf("read across a cut link: %v", err)
	}
	ba.SetReadDeadline(time.Time{})
	n.ClearLinks()
	if _, err := io.ReadFull(ba, buf[:4]); err != nil || string(buf[:4]) != "held" {
		t.Fatalf("held segment after clear: %q, %v", buf[:4], err)
	}
	pa.WriteTo([]byte("a→b"), pb.LocalAddr())
	if k, _, err := pb.ReadFrom(buf); err != nil || string(buf[:k]) != "a→b" {
		t.Fatalf("after clear: %q, %v", buf[:k], err)
	}
	if err := n.SetLink("a", "nobody", LinkFault{Cut: true}); err == nil {
		t.Fatal("a link to an unknown host was set")
	}
}

// A link's delay adds to its latency, both ways, and leaves other links'.
func TestLinkDelay(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const oneWay, extra = 5 * time.Millisecond, 40 * time.Millisecond
		n := newNet(t, Config{Latency: func(from, to string) time.Duration { return oneWay }}, "a", "b", "c")
		if err := n.SetLink("a", "b", LinkFault{Delay: extra}); err != nil {
			t.Fatal(err)
		}
		pa, _ := n.ListenPacket("a", 0)
		pb, _ := n.ListenPacket("b", 0)
		pc, _ := n.ListenPacket("c", 0)
		buf := make([]byte, 8)
		for _, c := range []struct {
			from, to net.PacketConn
			want     time.Duration
		}{{pa, pb, oneWay + extra}, {pb, pa, oneWay + extra}, {pa, pc, oneWay}} {
			start := time.Now()
			c.from.WriteTo([]byte("x"), c.to.LocalAddr())
			if _, _, err := c.to.ReadFrom(buf); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took != c.want {
				t.Errorf("%v → %v took %v, want %v", c.from.LocalAddr(), c.to.LocalAddr(), took, c.want)
			}
		}
	})
}

// A link's loss drops its share of datagrams and no others'.
func TestLinkLoss(t *testing.T) {
	const sent = 4000
	n := newNet(t, Config{Seed: 7}, "a", "b", "c")
	if err := n.SetLink("a", "b", LinkFault{Loss: 0.3}); err != nil {
		t.Fatal(err)
	}
	pa, _ := n.ListenPacket("a", 0)
	count := func(to net.PacketConn) int {
		got := 0
		buf := make([]byte, 8)
		for i := range sent {
			pa.WriteTo([]byte("x"), to.LocalAddr())
			if i%500 == 499 || i == sent-1 {
				waitFor(t, 5*time.Second, "deliveries", func() bool { return n.pending() == 0 })
				for {
					to.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
					if _, _, err := to.ReadFrom(buf); err != nil {
						break
					}
					got++
				}
			}
		}
		return got
	}
	pb, _ := n.ListenPacket("b", 0)
	pc, _ := n.ListenPacket("c", 0)
	// Three standard deviations of a binomial of 4000 at 0.3 is < 0.022.
	if rate := 1 - float64(count(pb))/sent; rate < 0.3-0.022 || rate > 0.3+0.022 {
		t.Errorf("a→b lost %.4f, want 0.3", rate)
	}
	if got := count(pc); got != sent {
		t.Errorf("a→c: %d of %d arrived across a lossless link", got, sent)
	}
}
