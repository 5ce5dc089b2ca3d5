package netsim

import (
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkDatagrams sends datagrams between random pairs of 100 hosts
// from parallel senders and reports delivered datagrams per second.
func BenchmarkDatagrams(b *testing.B) {
	for _, lat := range []time.Duration{0, time.Millisecond} {
		b.Run(fmt.Sprintf("latency=%v", lat), func(b *testing.B) {
			n := New(Config{Latency: func(from, to string) time.Duration { return lat }})
			defer n.Close()
			const hosts = 100
			conns := make([]net.PacketConn, hosts)
			var delivered atomic.Int64
			for i := range hosts {
				name := fmt.Sprint("h", i)
				n.AddHost(name)
				conns[i], _ = n.ListenPacket(name, 53)
				go func(c net.PacketConn) {
					buf := make([]byte, 1500)
					for {
						if _, _, err := c.ReadFrom(buf); err != nil {
							return
						}
						delivered.Add(1)
					}
				}(conns[i])
			}
			msg := make([]byte, 512)
			var next atomic.Int64
			b.SetBytes(int64(len(msg)))
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					i := int(next.Add(1))
					conns[i%hosts].WriteTo(msg, conns[(i*7+1)%hosts].LocalAddr())
				}
			})
			waitFor(b, time.Minute, "deliveries", func() bool { return n.pending() == 0 })
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(delivered.Load())/elapsed.Seconds(), "delivered/s")
			b.ReportMetric(float64(delivered.Load())/float64(b.N), "delivered/sent")
		})
	}
}
