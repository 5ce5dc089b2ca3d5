package proxy

import (
	"bufio"
	"context"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

type deadlineConn struct {
	net.Conn
	n *atomic.Int64
}

func (c deadlineConn) SetDeadline(t time.Time) error {
	c.n.Add(1)
	return c.Conn.SetDeadline(t)
}

func (c deadlineConn) SetReadDeadline(t time.Time) error {
	c.n.Add(1)
	return c.Conn.SetReadDeadline(t)
}

func (c deadlineConn) SetWriteDeadline(t time.Time) error {
	c.n.Add(1)
	return c.Conn.SetWriteDeadline(t)
}

// CloseWrite keeps linger's half-close.
func (c deadlineConn) CloseWrite() error { return c.Conn.(*net.TCPConn).CloseWrite() }

type deadlineListener struct {
	net.Listener
	n *atomic.Int64
}

func (l deadlineListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return deadlineConn{c, l.n}, nil
}

// TestFastPathDeadlinesStandAcrossRequests: on a keep-alive connection the
// fast path does not set (and clear) its deadlines on every request — each
// is a runtime timer, and moving one can wake the network poller. The
// client's idle deadline moves at most once per IdleTimeout/slackDiv and
// the machine's connection's at most once per clientCheckAfter/slackDiv
// (bounds derived from the time the requests took), where every request
// used to set three of each.
func TestFastPathDeadlinesStandAcrossRequests(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go leanBackend(ln)
	edgeLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var client, up atomic.Int64
	var d net.Dialer
	p := startProxy(t, Config{
		HostID: "ams-1", Logger: slog.New(slog.DiscardHandler),
		Edge: deadlineListener{edgeLn, &client},
		DialMachine: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return deadlineConn{c, &up}, nil
		},
	})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReaderSize(c, 16<<10)
	req := []byte("GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
	const requests = 300
	start := time.Now()
	for range requests {
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		if err := readLeanResponse(br); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	// A deadline moves at most once per slack, and each direction's first
	// one is set once (the read and the write of the machine's connection).
	maxClient := 2 + int64(took/(p.cfg.IdleTimeout/slackDiv))
	maxUp := 4 + 2*int64(took/(clientCheckAfter/slackDiv))
	if n := client.Load(); n > maxClient {
		t.Errorf("%d deadlines set on the client's connection over %d requests in %v, want at most %d", n, requests, took, maxClient)
	}
	if n := up.Load(); n > maxUp {
		t.Errorf("%d deadlines set on the machine's connection over %d requests in %v, want at most %d", n, requests, took, maxUp)
	}
	t.Logf("%d requests in %v: %d deadlines set on the client's connection, %d on the machine's", requests, took, client.Load(), up.Load())
}
