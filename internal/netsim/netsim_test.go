package netsim

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"testing/synctest"
	"time"
)

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// pending is how many deliveries are scheduled and not yet made.
func (n *Network) pending() int { return int(n.sched.inFlight.Load()) }

func newNet(t testing.TB, cfg Config, hosts ...string) *Network {
	t.Helper()
	n := New(cfg)
	t.Cleanup(func() { n.Close() })
	for _, h := range hosts {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

func ip(t testing.TB, n *Network, name string) string {
	t.Helper()
	a, ok := n.HostIP(name)
	if !ok {
		t.Fatalf("no host %s", name)
	}
	return a.String()
}

func addr(t testing.TB, n *Network, name string, port int) string {
	return net.JoinHostPort(ip(t, n, name), itoa(port))
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestAddHost(t *testing.T) {
	n := newNet(t, Config{})
	seen := map[string]bool{}
	for i := range 600 {
		a, err := n.AddHost("h" + itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		if a.To4() == nil || a[0] != 10 || a[3] == 0 || a[3] == 255 {
			t.Fatalf("address %v", a)
		}
		if seen[a.String()] {
			t.Fatalf("address %v given twice", a)
		}
		seen[a.String()] = true
	}
	if _, err := n.AddHost("h1"); err == nil {
		t.Fatal("AddHost accepted a duplicate name")
	}
	if _, err := n.AddHost(""); err == nil {
		t.Fatal("AddHost accepted an empty name")
	}
	if _, err := n.Listen("nope", 80); !errors.Is(err, ErrUnknownHost) {
		t.Fatalf("Listen on unknown host: %v", err)
	}
}

// TestDatagramLatency: a datagram takes exactly its link's latency, in
// virtual time (the network runs on timers and channels alone, so a
// synctest bubble runs it on a clock no load can stretch).
func TestDatagramLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const oneWay = 50 * time.Millisecond
		n := newNet(t, Config{Latency: func(from, to string) time.Duration { return oneWay }}, "a", "b")
		pa, err := n.ListenPacket("a", 0)
		if err != nil {
			t.Fatal(err)
		}
		pb, err := n.ListenPacket("b", 53)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := n.ListenPacket("b", 53); !errors.Is(err, syscall.EADDRINUSE) {
			t.Fatalf("second bind: %v", err)
		}
		buf := make([]byte, 100)
		for i := range 3 {
			start := time.Now()
			if _, err := pa.WriteTo([]byte("ping"), &net.UDPAddr{IP: net.ParseIP(ip(t, n, "b")), Port: 53}); err != nil {
				t.Fatal(err)
			}
			k, from, err := pb.ReadFrom(buf)
			if err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			if string(buf[:k]) != "ping" || from.String() != pa.LocalAddr().String() {
				t.Fatalf("got %q from %v", buf[:k], from)
			}
			if took != oneWay {
				t.Errorf("datagram %d took %v, want %v", i, took, oneWay)
			}
		}
		if sb, rb, sp, rp := n.Stats("a"); sb != 12 || rb != 0 || sp != 3 || rp != 0 {
			t.Errorf("stats of a: %d %d %d %d", sb, rb, sp, rp)
		}
		if sb, rb, sp, rp := n.Stats("b"); sb != 0 || rb != 12 || sp != 0 || rp != 3 {
			t.Errorf("stats of b: %d %d %d %d", sb, rb, sp, rp)
		}
		// A read deadline ends a read that nothing answers, when it passes.
		start := time.Now()
		pb.SetReadDeadline(start.Add(20 * time.Millisecond))
		if _, _, err := pb.ReadFrom(buf); !isTimeout(err) || time.Since(start) != 20*time.Millisecond {
			t.Fatalf("read past deadline: %v after %v", err, time.Since(start))
		}
	})
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestStreamLatency: a connect and an echo take exactly two trips, in
// virtual time.
func TestStreamLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const oneWay = 40 * time.Millisecond
		n := newNet(t, Config{Latency: func(from, to string) time.Duration { return oneWay }}, "a", "b")
		l, err := n.Listen("b", 80)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			defer c.Close()
			io.Copy(c, c) // echo
		}()
		start := time.Now()
		c, err := n.Dial(context.Background(), "a", "b:80")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if took := time.Since(start); took != 2*oneWay {
			t.Errorf("connect took %v, want %v", took, 2*oneWay)
		}
		if c.RemoteAddr().String() != addr(t, n, "b", 80) {
			t.Errorf("remote address %v", c.RemoteAddr())
		}
		buf := make([]byte, 5)
		for range 3 {
			start = time.Now()
			if _, err := c.Write([]byte("hello")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, buf); err != nil {
				t.Fatal(err)
			}
			if took := time.Since(start); took != 2*oneWay {
				t.Errorf("echo took %v, want %v", took, 2*oneWay)
			}
		}
	})
}

func TestStreamOrderWithJitter(t *testing.T) {
	n := newNet(t, Config{
		Seed:    7,
		Latency: func(from, to string) time.Duration { return time.Millisecond },
		Jitter:  5 * time.Millisecond,
	}, "a", "b")
	l, err := n.Listen("b", 0)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 10<<20+123) // more than the window
	for i := range want {
		want[i] = byte(i * 7 / 5)
	}
	got := make(chan []byte, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		b, _ := io.ReadAll(c)
		got <- b
	}()
	c, err := n.Dial(context.Background(), "a", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(want); off += 100_000 {
		if _, err := c.Write(want[off:min(off+100_000, len(want))]); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	if b := <-got; !bytes.Equal(b, want) {
		t.Fatalf("received %d bytes, not the %d written in order", len(b), len(want))
	}
}

func TestRefusedAndUnreachable(t *testing.T) {
	n := newNet(t, Config{}, "a", "b")
	_, err := n.Dial(context.Background(), "a", "b:81")
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial to a closed port: %v", err)
	}
	if _, err := n.Dial(context.Background(), "a", "10.99.0.1:80"); err == nil {
		t.Fatal("dial to an address of no host succeeded")
	}
	if _, err := n.Dial(context.Background(), "a", "b"); err == nil {
		t.Fatal("dial without a port succeeded")
	}
	l, _ := n.Listen("b", 81)
	l.Close()
	if _, err := n.Dial(context.Background(), "a", "b:81"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial to a closed listener: %v", err)
	}
	if _, err := l.Accept(); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("accept on a closed listener: %v", err)
	}
}

func TestLossRate(t *testing.T) {
	const sent = 20000
	for _, loss := range []float64{0, 0.1, 0.5} {
		n := newNet(t, Config{Seed: 42, Loss: loss}, "a", "b")
		pa, _ := n.ListenPacket("a", 0)
		pb, _ := n.ListenPacket("b", 0)
		received := make(chan int)
		go func() {
			k := 0
			buf := make([]byte, 16)
			for {
				if _, _, err := pb.ReadFrom(buf); err != nil {
					received <- k
					return
				}
				k++
			}
		}()
		// In batches smaller than the receive queue, so none overflow it.
		for i := range sent {
			pa.WriteTo([]byte("x"), pb.LocalAddr())
			if i%500 == 499 {
				waitFor(t, 5*time.Second, "deliveries", func() bool { return n.pending() == 0 })
				waitFor(t, 5*time.Second, "reads", func() bool {
					pc := pb.(*packetConn)
					pc.mu.Lock()
					defer pc.mu.Unlock()
					return len(pc.q) == 0
				})
			}
		}
		pb.Close()
		got := <-received
		rate := 1 - float64(got)/sent
		// Three standard deviations of a binomial at this size is < 0.011.
		if rate < loss-0.011 || rate > loss+0.011 {
			t.Errorf("loss %.2f: measured %.4f (%d of %d arrived)", loss, rate, got, sent)
		}
	}
}

func TestPartitionAndHeal(t *testing.T) {
	n := newNet(t, Config{Latency: func(from, to string) time.Duration { return 5 * time.Millisecond }}, "a", "b", "c")
	l, _ := n.Listen("b", 80)
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	// A stream opened before the partition stalls during it and resumes.
	ab, err := n.Dial(context.Background(), "a", "b:80")
	if err != nil {
		t.Fatal(err)
	}
	ba := <-accepted

	n.Partition([]string{"a"}, []string{"b", "c"})

	// Datagrams across are lost; within a side they arrive.
	pa, _ := n.ListenPacket("a", 53)
	pb, _ := n.ListenPacket("b", 53)
	pc, _ := n.ListenPacket("c", 53)
	pa.WriteTo([]byte("a→b"), pb.LocalAddr())
	pc.WriteTo([]byte("c→b"), pb.LocalAddr())
	buf := make([]byte, 64)
	k, from, err := pb.ReadFrom(buf)
	if err != nil || string(buf[:k]) != "c→b" || from.String() != pc.LocalAddr().String() {
		t.Fatalf("read %q from %v: %v", buf[:k], from, err)
	}

	// Dials across wait for their context.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	_, err = n.Dial(ctx, "a", "b:80")
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) || !isTimeout(err) {
		t.Fatalf("dial across a partition: %v", err)
	}
	if _, err := ab.Write([]byte("held")); err != nil {
		t.Fatal(err)
	}
	ba.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	if _, err := ba.Read(buf); !isTimeout(err) {
		t.Fatalf("read across a partition: %v", err)
	}
	ba.SetReadDeadline(time.Time{})

	// A dial waiting without a deadline goes through once healed.
	dialed := make(chan error, 1)
	go func() {
		c, err := n.Dial(context.Background(), "a", "b:80")
		if err == nil {
			c.Close()
		}
		dialed <- err
	}()
	n.Heal()
	if err := <-dialed; err != nil {
		t.Fatalf("dial after heal: %v", err)
	}
	if _, err := io.ReadFull(ba, buf[:4]); err != nil || string(buf[:4]) != "held" {
		t.Fatalf("held segment after heal: %q, %v", buf[:4], err)
	}
	pa.WriteTo([]byte("a→b"), pb.LocalAddr())
	if k, _, err := pb.ReadFrom(buf); err != nil || string(buf[:k]) != "a→b" {
		t.Fatalf("after heal: %q, %v", buf[:k], err)
	}
}

func TestKillRevive(t *testing.T) {
	n := newNet(t, Config{}, "a", "b")
	pa, _ := n.ListenPacket("a", 53)
	pb, _ := n.ListenPacket("b", 53)
	l, _ := n.Listen("b", 80)
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	n.Kill("b")
	pa.WriteTo([]byte("lost"), pb.LocalAddr())
	pb.WriteTo([]byte("lost too"), pa.LocalAddr())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	if _, err := n.Dial(ctx, "a", "b:80"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("dial to a dead host: %v", err)
	}
	cancel()
	waitFor(t, time.Second, "deliveries", func() bool { return n.pending() == 0 })
	if _, _, _, rp := n.Stats("b"); rp != 0 {
		t.Fatalf("a dead host received %d datagrams", rp)
	}
	if _, _, _, rp := n.Stats("a"); rp != 0 {
		t.Fatalf("a dead host's datagram arrived")
	}

	n.Revive("b")
	c, err := n.Dial(context.Background(), "a", "b:80")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("back"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "back" {
		t.Fatalf("echo after revive: %q, %v", buf, err)
	}
	pa.WriteTo([]byte("hi"), pb.LocalAddr())
	if k, _, err := pb.ReadFrom(buf); err != nil || string(buf[:k]) != "hi" {
		t.Fatalf("datagram after revive: %q, %v", buf[:k], err)
	}
}

func TestCloseAndEOF(t *testing.T) {
	n := newNet(t, Config{Latency: func(from, to string) time.Duration { return 2 * time.Millisecond }}, "a", "b")
	l, _ := n.Listen("b", 80)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("bye"))
		c.Close()
	}()
	c, err := n.Dial(context.Background(), "a", "b:80")
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "bye" {
		t.Fatalf("read %q, %v", b, err)
	}
	// The peer is gone and its end of stream arrived: writes are reset.
	if _, err := c.Write([]byte("x")); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write to a closed peer: %v", err)
	}
	c.Close()
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

func TestHTTP(t *testing.T) {
	n := newNet(t, Config{Latency: func(from, to string) time.Duration { return time.Millisecond }}, "client", "server")
	l, err := n.Listen("server", 8080)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello "+r.RemoteAddr[:strings.LastIndexByte(r.RemoteAddr, ':')])
	})}
	go srv.Serve(l)
	defer srv.Close()
	tr := &http.Transport{DialContext: n.DialerFrom("client")}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 5 * time.Second}
	for _, u := range []string{"http://" + addr(t, n, "server", 8080) + "/", "http://server:8080/"} {
		for range 3 {
			resp, err := client.Get(u)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if want := "hello " + ip(t, n, "client"); string(body) != want {
				t.Fatalf("body %q, want %q", body, want)
			}
		}
	}
}

func TestCloseLeavesNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	n := New(Config{Latency: func(from, to string) time.Duration { return time.Millisecond }})
	n.AddHost("a")
	n.AddHost("b")
	l, _ := n.Listen("b", 80)
	p, _ := n.ListenPacket("b", 53)
	tr, _ := n.Transport("b", 7946)
	go l.Accept()
	go p.ReadFrom(make([]byte, 10))
	server := make(chan net.Conn, 1)
	l2, _ := n.Listen("b", 81)
	go func() { c, _ := l2.Accept(); server <- c }()
	c, err := n.Dial(context.Background(), "a", "b:81")
	if err != nil {
		t.Fatal(err)
	}
	go c.Read(make([]byte, 10))
	go (<-server).Read(make([]byte, 10))
	n.Partition([]string{"a"})
	go n.Dial(context.Background(), "a", "b:80") // waits for a heal that never comes
	tr.WriteTo([]byte("x"), "10.0.0.1:1")
	n.Close()
	waitFor(t, 5*time.Second, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before })
	if _, err := n.AddHost("c"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("AddHost after Close: %v", err)
	}
}
