package cluster

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/netsim"
	"github.com/hashicorp/memberlist"
)

// TestMux: datagrams and streams sent on one side of a mux arrive on the
// same side of the other host's mux, and the untagged side is byte for byte
// the plain transport.
func TestMux(t *testing.T) {
	n := netsim.New(netsim.Config{Seed: 1})
	t.Cleanup(func() { n.Close() })
	muxes := map[string]*mux{}
	addrs := map[string]string{}
	for _, h := range []string{"a", "b"} {
		if _, err := n.AddHost(h); err != nil {
			t.Fatal(err)
		}
		tr, err := n.Transport(h, 7946)
		if err != nil {
			t.Fatal(err)
		}
		muxes[h], addrs[h] = newMux(tr, tagWait), tr.Addr()
	}
	// A plain transport of a third host talks to a's global side.
	if _, err := n.AddHost("c"); err != nil {
		t.Fatal(err)
	}
	plain, err := n.Transport("c", 7946)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { plain.Shutdown() })

	packet := func(ch <-chan *memberlist.Packet) []byte {
		t.Helper()
		select {
		case p := <-ch:
			return p.Buf
		case <-time.After(5 * time.Second):
			t.Fatal("no packet")
			return nil
		}
	}
	a, b := muxes["a"], muxes["b"]
	for _, tc := range []struct {
		from, to *muxPort
		toHost   string
		msg      []byte
	}{
		{a.global, b.global, "b", []byte{0, 1, 2}},
		{a.region, b.region, "b", []byte{0, 1, 2}},
		{b.region, a.region, "a", []byte{regionTag, regionTag}}, // a tag byte inside is data
		{b.global, a.global, "a", []byte{}},
	} {
		if _, err := tc.from.WriteTo(tc.msg, addrs[tc.toHost]); err != nil {
			t.Fatal(err)
		}
		if got := packet(tc.to.PacketCh()); !bytes.Equal(got, tc.msg) {
			t.Errorf("packet %x arrived as %x", tc.msg, got)
		}
	}
	if _, err := plain.WriteTo([]byte("plain"), addrs["a"]); err != nil {
		t.Fatal(err)
	}
	if got := packet(a.global.PacketCh()); string(got) != "plain" {
		t.Errorf("plain packet arrived as %q", got)
	}
	select {
	case p := <-a.region.PacketCh():
		t.Errorf("stray packet on the regional side: %x", p.Buf)
	case p := <-b.global.PacketCh():
		t.Errorf("stray packet on b's global side: %x", p.Buf)
	default:
	}

	stream := func(from, to *muxPort, msg string) { // a to b
		t.Helper()
		c, err := from.DialTimeout(addrs["b"], time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
		var s net.Conn
		select {
		case s = <-to.StreamCh():
		case <-time.After(5 * time.Second):
			t.Fatal("no stream")
		}
		defer s.Close()
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(s, got); err != nil || string(got) != msg {
			t.Errorf("stream %q arrived as %q (%v)", msg, got, err)
		}
	}
	stream(a.global, b.global, "\x06push-pull")
	stream(a.region, b.region, "\x06push-pull")
	stream(a.global, b.global, string([]byte{regionTag + 1}))

	// The transport stays up until both sides are shut down.
	a.region.Shutdown()
	if _, err := b.global.WriteTo([]byte{1}, addrs["a"]); err != nil {
		t.Fatal(err)
	}
	packet(a.global.PacketCh())
	a.global.Shutdown()
	if _, err := b.global.DialTimeout(addrs["a"], 100*time.Millisecond); err == nil {
		t.Error("dialled a shut mux")
	}
	b.global.Shutdown()
	b.region.Shutdown()
}
