package mesh

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/tuntest"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/netsim"
)

const testNetwork layout.Network = 0x0badcafe

// simHost is one host of a test: its mesh over a netsim host, a channel TUN
// and the facts it publishes.
type simHost struct {
	id    string
	num   layout.Host
	mesh  *Mesh
	tun   *tuntest.ChannelTUN
	facts *cluster.Host
}

func newSimHost(t *testing.T, n *netsim.Network, id string, num layout.Host, orgs ...layout.Org) *simHost {
	t.Helper()
	ip, err := n.AddHost(id)
	if err != nil {
		t.Fatal(err)
	}
	key, err := LoadKey(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ct := tuntest.NewChannelTUN()
	m, err := New(Config{
		HostID: id, Network: testNetwork, Host: num, Key: key, TUN: ct.TUN(),
		Bind:      &PacketBind{Listen: func(port int) (net.PacketConn, error) { return n.ListenPacket(id, port) }},
		Advertise: netip.AddrFrom4([4]byte(ip.To4())),
		Logger:    slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	h := &cluster.Host{ID: id, Region: "ams", Status: cluster.StatusAlive, Addrs: map[string]string{}}
	Advertise(h.Addrs, m.PublicKey(), m.Endpoint())
	for i, o := range orgs {
		a, _ := layout.Place{Network: testNetwork, Org: o, Host: num}.Addr(uint64(i + 2))
		h.Machines = append(h.Machines, &cluster.Machine{ID: fmt.Sprintf("m%d", i), PrivateIP: a.String(), Host: id})
	}
	return &simHost{id: id, num: num, mesh: m, tun: ct, facts: h}
}

// addr is machine m of org o on h.
func (h *simHost) addr(o layout.Org, m uint64) netip.Addr {
	a, _ := layout.Place{Network: testNetwork, Org: o, Host: h.num}.Addr(m)
	return a
}

func apply(t *testing.T, h *simHost, view ...*simHost) {
	t.Helper()
	var hosts []*cluster.Host
	for _, v := range view {
		hosts = append(hosts, v.facts)
	}
	if err := h.mesh.Apply(hosts); err != nil {
		t.Fatal(err)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(string(bytes.TrimSpace(b)))
	return len(b), nil
}

// packet is an IPv6 datagram (no next header) from src to dst.
func packet(src, dst netip.Addr, payload string) []byte {
	b := make([]byte, 40+len(payload))
	b[0] = 6 << 4
	binary.BigEndian.PutUint16(b[4:6], uint16(len(payload)))
	b[6] = 59 // no next header
	b[7] = 64
	s, d := src.As16(), dst.As16()
	copy(b[8:24], s[:])
	copy(b[24:40], d[:])
	copy(b[40:], payload)
	return b
}

// receive waits for the next packet out of h's TUN.
func receive(t *testing.T, h *simHost, within time.Duration) []byte {
	t.Helper()
	select {
	case p := <-h.tun.Inbound:
		return p
	case <-time.After(within):
		t.Fatalf("nothing came out of %s's TUN in %v", h.id, within)
		return nil
	}
}

// patience bounds waits for what must happen; it is generous because the
// machine is busy, and only a failure waits it out.
const patience = 30 * time.Second

func TestPacketCrossesToPeerPrefix(t *testing.T) {
	const oneWay = 40 * time.Millisecond
	n := netsim.New(netsim.Config{Latency: func(from, to string) time.Duration { return oneWay }})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7, 9)
	b := newSimHost(t, n, "b", 2, 7, 9)
	apply(t, a, a, b)
	apply(t, b, a, b)

	if got := a.mesh.Peers(); len(got) != 1 || got[0].Host != "b" || len(got[0].Prefixes) != 2 {
		t.Fatalf("a's peers = %+v, want b with its two orgs' prefixes", got)
	}
	want := packet(a.addr(7, 2), b.addr(7, 2), "hello")
	a.tun.Outbound <- want
	if got := receive(t, b, patience); !bytes.Equal(got, want) {
		t.Fatalf("b's TUN gave %x, want %x", got, want)
	}
	// With the session up, one packet takes at least the link's one-way
	// latency, and the reply at least the same back.
	start := time.Now()
	back := packet(b.addr(7, 2), a.addr(7, 2), "and back")
	b.tun.Outbound <- back
	if got := receive(t, a, patience); !bytes.Equal(got, back) {
		t.Fatalf("a's TUN gave %x, want %x", got, back)
	}
	if d := time.Since(start); d < oneWay {
		t.Errorf("a packet crossed in %v, under the link's %v", d, oneWay)
	}
	start = time.Now()
	a.tun.Outbound <- packet(a.addr(9, 3), b.addr(9, 3), "b's other prefix")
	receive(t, b, patience)
	if d := time.Since(start); d < oneWay {
		t.Errorf("a packet crossed in %v, under the link's %v", d, oneWay)
	}
}

func TestSpoofedSourceDropped(t *testing.T) {
	n := netsim.New(netsim.Config{})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7)
	b := newSimHost(t, n, "b", 2, 7)
	apply(t, a, a, b)
	apply(t, b, a, b)
	// Sources a does not hold: b's own prefix, another org's, another
	// network's. Each leaves a (its device checks only where a packet
	// goes) and b's device drops it; the good packet sent after them is
	// the first out of b's TUN.
	other, _ := layout.Place{Network: testNetwork + 1, Org: 7, Host: 1}.Addr(2)
	for _, src := range []netip.Addr{b.addr(7, 5), a.addr(8, 2), other} {
		a.tun.Outbound <- packet(src, b.addr(7, 2), "spoofed")
	}
	good := packet(a.addr(7, 2), b.addr(7, 2), "good")
	a.tun.Outbound <- good
	if got := receive(t, b, patience); !bytes.Equal(got, good) {
		t.Fatalf("b's TUN first gave %x, want the good packet", got)
	}
	select {
	case p := <-b.tun.Inbound:
		t.Fatalf("b's TUN gave another packet: %x", p)
	default:
	}
}

func TestHostNotInFactsGetsNothing(t *testing.T) {
	n := netsim.New(netsim.Config{})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7)
	b := newSimHost(t, n, "b", 2, 7)
	c := newSimHost(t, n, "c", 3, 7)
	// a knows only b; c (not in a's facts) knows a and tries.
	apply(t, a, a, b)
	apply(t, b, a, b)
	apply(t, c, a, c)
	if got := a.mesh.Peers(); len(got) != 1 || got[0].Host != "b" {
		t.Fatalf("a's peers = %+v, want only b", got)
	}
	// a has no route for c's prefix: nothing is sent for it.
	_, _, sent0, _ := n.Stats("a")
	a.tun.Outbound <- packet(a.addr(7, 2), c.addr(7, 2), "to a stranger")

	c.tun.Outbound <- packet(c.addr(7, 2), a.addr(7, 2), "from a stranger")
	deadline := time.Now().Add(patience)
	for {
		if _, _, _, recv := n.Stats("a"); recv > 0 {
			break // c's handshake reached a
		}
		if time.Now().After(deadline) {
			t.Fatal("c's handshake never reached a")
		}
		time.Sleep(time.Millisecond)
	}
	// The control: b's packet crosses to a after a has c's handshake.
	good := packet(b.addr(7, 2), a.addr(7, 2), "from b")
	b.tun.Outbound <- good
	if got := receive(t, a, patience); !bytes.Equal(got, good) {
		t.Fatalf("a's TUN first gave %x, want b's packet", got)
	}
	if _, _, _, recv := n.Stats("c"); recv != 0 {
		t.Errorf("c received %d packets: a answered a host it does not know", recv)
	}
	if _, _, sent, _ := n.Stats("a"); sent-sent0 == 0 {
		t.Error("a sent nothing at all: the control did not run")
	}
	select {
	case p := <-a.tun.Inbound:
		t.Fatalf("a's TUN gave another packet: %x", p)
	case p := <-c.tun.Inbound:
		t.Fatalf("c's TUN gave a packet: %x", p)
	default:
	}
}

func TestDeadPeerRemoved(t *testing.T) {
	n := netsim.New(netsim.Config{})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7)
	b := newSimHost(t, n, "b", 2, 7)
	apply(t, a, a, b)
	if len(a.mesh.Peers()) != 1 {
		t.Fatalf("a's peers = %+v", a.mesh.Peers())
	}
	dead := *b.facts
	dead.Status = cluster.StatusDead
	if err := a.mesh.Apply([]*cluster.Host{a.facts, &dead}); err != nil {
		t.Fatal(err)
	}
	if got := a.mesh.Peers(); len(got) != 0 {
		t.Fatalf("a still has %+v after b died", got)
	}
	if d := a.mesh.dev.LookupPeer(device.NoisePublicKey(b.mesh.PublicKey())); d != nil {
		t.Fatal("b's key is still a peer of a's device")
	}
}

func TestOrgsNeverCrossTheTunnel(t *testing.T) {
	n := netsim.New(netsim.Config{})
	defer n.Close()
	a := newSimHost(t, n, "a", 1, 7, 9)
	b := newSimHost(t, n, "b", 2, 7, 9)
	apply(t, a, a, b)
	apply(t, b, a, b)
	// From org 7 to org 9 (both prefixes b's, both a's sources allowed):
	// dropped before the tunnel. The packet within org 9 sent after it is
	// the first out of b's TUN.
	a.tun.Outbound <- packet(a.addr(7, 2), b.addr(9, 2), "across orgs")
	a.tun.Outbound <- packet(a.addr(7, 2), layout.DNS, "to the resolver")
	good := packet(a.addr(9, 2), b.addr(9, 2), "within org 9")
	a.tun.Outbound <- good
	if got := receive(t, b, patience); !bytes.Equal(got, good) {
		t.Fatalf("b's TUN first gave %x, want the packet within org 9", got)
	}
}

func TestOrgTUNWriteDropsAcrossOrgs(t *testing.T) {
	ct := tuntest.NewChannelTUN()
	ot := &orgTUN{Device: ct.TUN()}
	a7, _ := layout.Place{Network: testNetwork, Org: 7, Host: 1}.Addr(2)
	b7, _ := layout.Place{Network: testNetwork, Org: 7, Host: 2}.Addr(2)
	b9, _ := layout.Place{Network: testNetwork, Org: 9, Host: 2}.Addr(2)
	const off = 16
	pad := func(p []byte) []byte { return append(make([]byte, off), p...) }
	done := make(chan error, 1)
	go func() {
		_, err := ot.Write([][]byte{pad(packet(a7, b9, "across")), pad(packet(a7, b7, "within")), pad([]byte{0x45, 0})}, off)
		done <- err
	}()
	if got := <-ct.Inbound; !bytes.Equal(got, packet(a7, b7, "within")) {
		t.Fatalf("TUN got %x, want only the packet within org 7", got)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-ct.Inbound:
		t.Fatalf("TUN got another packet: %x", p)
	default:
	}
}
