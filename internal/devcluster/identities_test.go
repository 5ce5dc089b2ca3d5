package devcluster

import (
	"crypto/tls"
	"io"
	"net"
	"sync"
	"testing"
)

// tlsForward serves plain TCP on loopback and carries each connection to
// host h's API over mutual TLS with the control plane's certificate: a test
// client that speaks plain HTTP reaches the host's HTTP server through it,
// as the control plane does.
func tlsForward(t *testing.T, c *Cluster, h *Host) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.enroller.Load().ControlTLS(h.ID)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var open []net.Conn
	track := func(cs ...net.Conn) {
		mu.Lock()
		open = append(open, cs...)
		mu.Unlock()
	}
	wg.Go(func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := tls.Dial("tcp", h.Addr(), cfg)
			if err != nil {
				t.Errorf("forward to %s: %v", h.ID, err)
				in.Close()
				continue
			}
			track(in, out)
			pipe := func(dst, src net.Conn) {
				io.Copy(dst, src)
				dst.Close()
				src.Close()
			}
			wg.Go(func() { pipe(out, in) })
			wg.Go(func() { pipe(in, out) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return ln.Addr().String()
}
