package devcluster

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"
)

// TestKeptPacket: a kept UDP socket drops what arrives while no lease
// holds it, hands the next lease what arrives after, and a lease's read
// deadline, moved while a read waits, ends that read.
func TestKeptPacket(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	k := keepPacket(pc)
	defer pc.Close()
	c, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.Write([]byte("dropped")) // no lease: the host is dead
	time.Sleep(50 * time.Millisecond)
	l := k.lease()
	c.Write([]byte("kept"))
	b := make([]byte, 16)
	l.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := l.ReadFrom(b)
	if err != nil || string(b[:n]) != "kept" {
		t.Fatalf("read %q, %v; want the datagram sent once leased", b[:n], err)
	}
	if _, err := l.WriteTo([]byte("back"), from); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(b); err != nil || string(b[:n]) != "back" {
		t.Fatalf("the answer: %q, %v", b[:n], err)
	}
	// A read waiting with no deadline ends when one is set in the past.
	l.SetReadDeadline(time.Time{})
	ended := make(chan error, 1)
	go func() { _, _, err := l.ReadFrom(b); ended <- err }()
	time.Sleep(20 * time.Millisecond)
	l.SetReadDeadline(time.Now())
	select {
	case err := <-ended:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("read after the deadline moved: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a moved deadline did not end the waiting read")
	}
	l.Close()
	if _, _, err := l.ReadFrom(b); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read on a closed lease: %v", err)
	}
	// The socket stays bound for the next lease.
	if _, err := net.ListenPacket("udp", pc.LocalAddr().String()); err == nil {
		t.Fatal("the address was free once the lease closed")
	}
}
