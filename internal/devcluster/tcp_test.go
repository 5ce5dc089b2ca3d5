package devcluster

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/proxy"
)

const tcpEchoImage = "flame/tcp-echo"

// runTCPEcho is a machine with a raw TCP service behind proxy_proto: it
// reads the PROXY v2 header of each connection, greets with its region and
// the client address the header named, then echoes lines.
func runTCPEcho() {
	ln, err := net.Listen("tcp", "127.0.0.1:"+os.Getenv("PORT"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			os.Exit(1)
		}
		go func() {
			defer c.Close()
			br := bufio.NewReader(c)
			// Signature, version 2 PROXY, TCP over IPv4, 12 address
			// bytes: source, destination, their ports.
			var hdr [28]byte
			_, err := io.ReadFull(br, hdr[:])
			if err != nil || string(hdr[:16]) != "\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" {
				fmt.Fprintf(c, "bad PROXY header %x\n", hdr)
				return
			}
			src := netip.AddrPortFrom(netip.AddrFrom4([4]byte(hdr[16:20])), binary.BigEndian.Uint16(hdr[24:26]))
			fmt.Fprintf(c, "%s %s\n", os.Getenv("FLY_REGION"), src)
			for {
				line, err := br.ReadString('\n')
				if err != nil {
					return
				}
				fmt.Fprintf(c, "echo %s", line)
			}
		}()
	}
}

// TestEdgeServesRawTCP: a raw TCP service (proxy_proto, version 2) is
// served at the edge on its public port: from a machine in another region, across the
// simulated backhaul at that distance, then from one on the edge's host;
// the machine learns the client's real address.
func TestEdgeServesRawTCP(t *testing.T) {
	ctx := context.Background()
	public := freePort(t)
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1,
		EdgeTCPPorts: proxy.PortRange{Lo: public, Hi: public}}, map[string]string{tcpEchoImage: "tcp-echo"})
	byHost := map[string]*Host{}
	for _, h := range c.Hosts {
		byHost[h.ID] = h
	}
	if ip := byHost["iad-1"].EdgeTCPIP; ip != "127.0.0.2" {
		t.Errorf("the iad edge serves raw TCP at %q, want the next loopback address", ip)
	}
	ams := byHost["ams-1"]
	create := func(on string) {
		t.Helper()
		port := freePort(t)
		_, err := c.HostClient(byHost[on]).Create(ctx, "db", api.LaunchMachineInput{Config: &api.MachineConfig{
			Image: tcpEchoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
			Services: []api.MachineService{{Protocol: "tcp", InternalPort: port,
				Ports: []api.MachinePort{{Port: ptr(public), Handlers: []string{"proxy_proto"},
					ProxyProtoOptions: &api.ProxyProtoOptions{Version: api.ProxyProtoV2}}}}},
		}})
		if err != nil {
			t.Fatalf("create on %s: %v", on, err)
		}
	}
	dial := func() (region string, took time.Duration) {
		t.Helper()
		start := time.Now()
		conn, err := net.Dial("tcp", ams.Proxy.TCPAddrs()[public])
		if err != nil {
			t.Fatalf("dial the ams edge's raw TCP port: %v", err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		br := bufio.NewReader(conn)
		greeting, err := br.ReadString('\n')
		if err != nil {
			return "", time.Since(start)
		}
		took = time.Since(start)
		f := strings.Fields(greeting)
		if len(f) != 2 || f[1] != conn.LocalAddr().String() {
			t.Fatalf("greeting %q: the machine did not see the client's address %s", greeting, conn.LocalAddr())
		}
		fmt.Fprintf(conn, "hello\n")
		if line, err := br.ReadString('\n'); err != nil || line != "echo hello\n" {
			t.Fatalf("echo: %q %v", line, err)
		}
		return f[0], took
	}

	create("iad-1")
	waitUntil(t, "the ams edge serving the port", func() bool { return ams.Proxy.TCPAddrs()[public] != "" })
	var region string
	var took time.Duration
	waitUntil(t, "a connection answered from iad", func() bool {
		region, took = dial()
		return region == "iad"
	})
	// The hop's connect and its upgrade each cross to iad and back.
	if rtt := geo.RTT(mustRegion(t, "ams"), mustRegion(t, "iad")); took < 2*rtt {
		t.Errorf("answered from iad in %v, under two round trips of %v", took, rtt)
	}

	create("ams-1")
	waitUntil(t, "a connection answered on the edge's host", func() bool {
		region, _ = dial()
		return region == "ams"
	})
}
