package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// client is where the front says its client is.
var entryClient = &net.TCPAddr{IP: net.ParseIP("203.0.113.7"), Port: 40123}

// dialEntry connects to an entry listener as the front does: the PROXY v2
// header naming the client, then what the client sent.
func dialEntry(t *testing.T, addr string, client net.Addr) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(30 * time.Second))
	if client != nil {
		if _, err := c.Write(EntryHeader(client, c.LocalAddr())); err != nil {
			t.Fatal(err)
		}
	}
	return c, bufio.NewReader(c)
}

// TestEntryNamesTheClient: behind a front, on the edge's entry listener,
// the machine is told the client the front names — Fly-Client-IP, and the
// last X-Forwarded-For — not the address the connection came from, and not
// what the client forged in those headers; on both edge paths, for two
// requests on one kept-alive connection.
func TestEntryNamesTheClient(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		b := startBackend(t, "m")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		edge := startProxy(t, Config{HostID: "ams-1", Edge: EntryListener(ln, 10*time.Second), DisableFastPath: netHTTP})
		edge.setState(factsOne(b), nil)
		c, br := dialEntry(t, edge.EdgeAddr(), entryClient)
		for i := range 2 {
			fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\nFly-Client-IP: 6.6.6.6\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatalf("request %d: %v", i, err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			s := decode(t, string(body))
			if got := s.Header.Get("Fly-Client-IP"); got != "203.0.113.7" {
				t.Errorf("request %d: Fly-Client-IP %q, want the front's client 203.0.113.7", i, got)
			}
			if got := s.Header.Get("X-Forwarded-For"); got != "6.6.6.6, 203.0.113.7" {
				t.Errorf("request %d: X-Forwarded-For %q, want the client's own list then 203.0.113.7", i, got)
			}
		}
	})
}

// TestEntryWithoutHeaderRefused: a connection to the entry listener that
// does not open with a PROXY v2 header — a client that reached it, or one
// sending v1 — is closed unanswered; the edge's public listener reads no
// PROXY header at all: one sent there is a malformed request.
func TestEntryWithoutHeaderRefused(t *testing.T) {
	bothPaths(t, func(t *testing.T, netHTTP bool) {
		b := startBackend(t, "m")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		entry := startProxy(t, Config{HostID: "ams-1", Edge: EntryListener(ln, 10*time.Second), DisableFastPath: netHTTP})
		entry.setState(factsOne(b), nil)
		for _, opening := range []string{"", "PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\n"} {
			c, br := dialEntry(t, entry.EdgeAddr(), nil)
			fmt.Fprintf(c, "%sGET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n", opening)
			if resp, err := http.ReadResponse(br, nil); err == nil {
				t.Errorf("opening %q: answered %d, want the connection closed", opening, resp.StatusCode)
			}
		}
		if b.hits.Load() != 0 {
			t.Errorf("the machine took %d requests", b.hits.Load())
		}

		public := startProxy(t, Config{HostID: "ams-1", DisableFastPath: netHTTP})
		public.setState(factsOne(b), nil)
		c, br := dialEntry(t, public.EdgeAddr(), entryClient)
		fmt.Fprintf(c, "GET / HTTP/1.1\r\nHost: demo.localhost\r\n\r\n")
		if resp, err := http.ReadResponse(br, nil); err == nil && resp.StatusCode != http.StatusBadRequest {
			t.Errorf("a PROXY header on the public listener: %d, want 400 or the connection closed", resp.StatusCode)
		}
		if b.hits.Load() != 0 {
			t.Errorf("the machine took %d requests", b.hits.Load())
		}
	})
}

// TestEntryTCPNamesTheClient: a raw TCP port served on an entry listener
// sends its machine a PROXY header naming the front's client.
func TestEntryTCPNamesTheClient(t *testing.T) {
	b := startTCPBackend(t, "pp", true)
	var addr string
	edge := startProxy(t, Config{HostID: "ams-1", TCPPorts: tcpRange, ListenTCP: func(port int) (net.Listener, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		addr = ln.Addr().String()
		return EntryListener(ln, 10*time.Second), nil
	}})
	edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts,
		Machines: []route.Machine{tcpMachine("m1", "demo", "ams-1", b.addr, route.HandlerProxyProtoV2, 0)}}, nil)
	waitFor(t, "the raw TCP port served", func() bool { return edge.TCPAddrs()[tcpPort] != "" })
	c, br := dialEntry(t, edge.TCPAddrs()[tcpPort], entryClient)
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("pp v2 %s %s", entryClient, addr)
	if got := strings.TrimSuffix(line, "\n"); got != want {
		t.Fatalf("the machine saw %q, want %q", got, want)
	}
	echo(t, c, br, "pp")
}
