package mesh

import (
	"net/netip"

	"golang.zx2c4.com/wireguard/tun"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// orgTUN is the TUN as the device sees it: only IPv6 packets between two
// addresses of one org's network (layout.SameOrg) pass, both ways. The
// hosts' packet filters keep orgs apart too; this keeps the tunnels from
// ever carrying a packet between orgs, whatever a host's filter lets by.
type orgTUN struct {
	tun.Device
}

// sameOrg reports whether p is an IPv6 packet between two addresses of one
// org's network.
func sameOrg(p []byte) bool {
	if len(p) < 40 || p[0]>>4 != 6 {
		return false
	}
	return layout.SameOrg(netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40])))
}

// Read drops, from what the host sends, every packet that is not within
// one org, keeping the rest in order.
func (t *orgTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for {
		n, err := t.Device.Read(bufs, sizes, offset)
		kept := 0
		for i := range n {
			if !sameOrg(bufs[i][offset : offset+sizes[i]]) {
				continue
			}
			if kept != i {
				// Copied, not swapped: each buffer belongs to the
				// device's element at its index.
				copy(bufs[kept][offset:], bufs[i][offset:offset+sizes[i]])
				sizes[kept] = sizes[i]
			}
			kept++
		}
		if kept > 0 || err != nil || n == 0 {
			return kept, err
		}
	}
}

// Write drops, from what the peers send, every packet that is not within
// one org.
func (t *orgTUN) Write(bufs [][]byte, offset int) (int, error) {
	kept := bufs[:0:0]
	for _, b := range bufs {
		if len(b) >= offset && sameOrg(b[offset:]) {
			kept = append(kept, b)
		}
	}
	if len(kept) == 0 {
		return len(bufs), nil
	}
	if _, err := t.Device.Write(kept, offset); err != nil {
		return 0, err
	}
	return len(bufs), nil
}
