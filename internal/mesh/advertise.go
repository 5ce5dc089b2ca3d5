package mesh

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// The names of a host's advertised addresses (cluster.Config.Addrs) that
// carry its mesh: its WireGuard endpoint and public key.
const (
	AddrEndpoint = "mesh"
	AddrKey      = "mesh-key"
)

// Advertise adds a host's mesh to its advertised addresses.
func Advertise(addrs map[string]string, key PublicKey, endpoint netip.AddrPort) {
	addrs[AddrEndpoint] = endpoint.String()
	addrs[AddrKey] = key.String()
}

// Peer is another host as this host's device has it.
type Peer struct {
	Host     string // its cluster id
	Key      PublicKey
	Endpoint netip.AddrPort
	// Prefixes are its allowed IPs: the HostPrefix of every org with a
	// machine on it, sorted.
	Prefixes []netip.Prefix
}

// Plan is the peers a host (self, number host of network) configures for
// its cluster view: every other host that is up and advertises a valid key
// and endpoint, with the prefixes of its machines' private addresses that
// are in network, name a host other than self's number and no other
// host's machines claim too (a prefix two hosts claim goes to neither, so
// one host cannot draw another's traffic). A host with no prefix is still
// a peer: its machines may come. Peers are sorted by host id.
func Plan(self string, network layout.Network, host layout.Host, hosts []*cluster.Host) []Peer {
	claims := map[netip.Prefix]string{}
	contested := map[netip.Prefix]bool{}
	for _, h := range hosts {
		for _, m := range h.Machines {
			a, err := netip.ParseAddr(m.PrivateIP)
			if err != nil {
				continue
			}
			p, _, ok := layout.Locate(a)
			if !ok || p.Network != network {
				continue
			}
			pre := p.HostPrefix()
			if owner, ok := claims[pre]; ok && owner != h.ID {
				contested[pre] = true
			}
			claims[pre] = h.ID
			if p.Host == host && h.ID != self {
				contested[pre] = true
			}
		}
	}
	var peers []Peer
	for _, h := range hosts {
		if h.ID == self || !h.Up() {
			continue
		}
		key, err := ParsePublicKey(h.Addrs[AddrKey])
		if err != nil {
			continue
		}
		ep, err := netip.ParseAddrPort(h.Addrs[AddrEndpoint])
		if err != nil || ep.Port() == 0 || !ep.Addr().IsValid() || ep.Addr().IsUnspecified() {
			continue
		}
		pr := Peer{Host: h.ID, Key: key, Endpoint: ep}
		for pre, owner := range claims {
			if owner == h.ID && !contested[pre] {
				pr.Prefixes = append(pr.Prefixes, pre)
			}
		}
		slices.SortFunc(pr.Prefixes, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
		peers = append(peers, pr)
	}
	slices.SortFunc(peers, func(a, b Peer) int {
		switch {
		case a.Host < b.Host:
			return -1
		case a.Host > b.Host:
			return 1
		}
		return 0
	})
	// Two hosts advertising one key would make one peer of the device:
	// neither is configured.
	seen := map[PublicKey]int{}
	for _, p := range peers {
		seen[p.Key]++
	}
	return slices.DeleteFunc(peers, func(p Peer) bool { return seen[p.Key] > 1 })
}

// PublicKey is a host's WireGuard public key.
type PublicKey [32]byte

// String is the key in base64, as WireGuard writes keys.
func (k PublicKey) String() string { return base64.StdEncoding.EncodeToString(k[:]) }

// ParsePublicKey reads a key in base64.
func ParsePublicKey(s string) (PublicKey, error) {
	var k PublicKey
	if len(s) != base64.StdEncoding.EncodedLen(len(k)) {
		return k, fmt.Errorf("mesh key %q: want %d bytes in base64", s, len(k))
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("mesh key %q: want %d bytes in base64", s, len(k))
	}
	copy(k[:], b)
	if k == (PublicKey{}) {
		return k, fmt.Errorf("mesh key: all zero")
	}
	return k, nil
}
