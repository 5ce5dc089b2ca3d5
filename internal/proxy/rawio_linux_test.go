package proxy

import (
	"bufio"
	"bytes"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// readSyscalls is how many read system calls the process has made
// (/proc/self/io, all its threads).
func readSyscalls(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		t.Fatalf("read syscalls are counted in /proc/self/io: %v", err)
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "syscr: "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no syscr in /proc/self/io: %q", b)
	return 0
}

// TestFastPathWaitsForAnswersWithoutReading: the edge writes a request to
// its machine and waits for the answer without a read that comes back
// empty (EAGAIN) first. The machine answers each request 1 ms after reading
// it, so every read made before the answer is one in vain. Counted over the
// whole process, one request is: the client's write, then its read in vain
// and its read of the answer (2); the edge's read of the request, after
// one in vain while the client had not sent it (2); the machine's read of
// the request and its read in vain for the next (2); and the edge's reads
// of the answer: 2 when it reads before the answer can have come, 1 when
// it does not. So 8 reads per request before, at most 7 now.
func TestFastPathWaitsForAnswersWithoutReading(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	resp := []byte("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n\r\nhello\n")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 16<<10)
				n := 0
				for {
					k, err := c.Read(buf[n:])
					if err != nil {
						return
					}
					n += k
					if i := bytes.Index(buf[:n], []byte("\r\n\r\n")); i >= 0 {
						time.Sleep(time.Millisecond)
						if _, err := c.Write(resp); err != nil {
							return
						}
						n = copy(buf, buf[i+4:n])
					}
				}
			}()
		}
	}()
	p := startProxy(t, Config{HostID: "ams-1", Logger: slog.New(slog.DiscardHandler)})
	p.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: []route.Machine{machine("m1", "ams-1", ln.Addr().(*net.TCPAddr))}}, nil)
	c, err := net.Dial("tcp", p.EdgeAddr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := []byte("GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
	br := bufio.NewReaderSize(c, 16<<10)
	one := func() {
		t.Helper()
		if _, err := c.Write(req); err != nil {
			t.Fatal(err)
		}
		if err := readLeanResponse(br); err != nil {
			t.Fatal(err)
		}
	}
	one() // the connection to the machine opens, and is pooled
	const n = 200
	before := readSyscalls(t)
	for range n {
		one()
	}
	per := float64(readSyscalls(t)-before) / n
	t.Logf("%.2f reads per request (the client's, the edge's and the machine's)", per)
	if per > 7.5 {
		t.Errorf("%.2f reads per request: the edge reads its machine's connection before the answer can have come", per)
	}
}
