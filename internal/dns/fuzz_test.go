package dns

import (
	"testing"

	"github.com/miekg/dns"
)

// FuzzAnswer feeds arbitrary bytes through the server's path: unpack,
// Answer, truncate, pack. It must never panic; whatever it sends back must
// parse again and fit the transport.
func FuzzAnswer(f *testing.F) {
	for _, q := range []*dns.Msg{
		query("web.internal.", dns.TypeAAAA),
		query("top2.nearest.of.web.internal.", dns.TypeAAAA),
		query("vms.web.internal.", dns.TypeTXT),
		query("_apps.internal.", dns.TypeTXT),
		query("a2000001.vm.web.internal.", dns.TypeANY),
		query("example.com.", dns.TypeA),
	} {
		b, err := q.Pack()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
		q.SetEdns0(1400, true)
		if b, err = q.Pack(); err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{0xab, 0xcd, 0x01, 0x00, 0x00, 0x05, 0, 0, 0, 0, 0, 0, 0xff})
	big := bigSource()
	big.ins = append(big.ins, testSource().ins...)

	f.Fuzz(func(t *testing.T, b []byte) {
		for _, udp := range []bool{true, false} {
			out := reply(b, big, DefaultTTL, udp)
			if out == nil {
				continue
			}
			if udp && len(out) > ednsSize {
				t.Fatalf("udp answer of %d bytes", len(out))
			}
			r := new(dns.Msg)
			if err := r.Unpack(out); err != nil {
				t.Fatalf("answer does not unpack: %v", err)
			}
			if !r.Response {
				t.Fatal("answer without QR")
			}
		}
		// The pure core, directly: Answer on whatever parses, then a pack
		// round trip.
		q := new(dns.Msg)
		if q.Unpack(b) != nil {
			return
		}
		r := Answer(q, big)
		out, err := r.Pack()
		if err != nil {
			t.Fatalf("pack answer to %v: %v", q, err)
		}
		back := new(dns.Msg)
		if err := back.Unpack(out); err != nil {
			t.Fatalf("answer does not unpack: %v", err)
		}
		if back.Id != q.Id || back.Rcode != r.Rcode || len(back.Answer) != len(r.Answer) {
			t.Fatalf("round trip changed the answer: %v -> %v", r, back)
		}
	})
}
