// Package layout is the addressing of the private network (6PN), pure: which
// IPv6 address a machine of an org on a host has, which prefixes an org's
// network and a host's share of it are, and, read back from an address,
// whose it is.
//
// An address is fdaa:<network>:<org>:<host>:<machine>:
//
//	bits   0–15   fdaa
//	bits  16–47   the network: one per cluster (its 32 bits; never 0)
//	bits  48–63   the org's number in that network (1–65535)
//	bits  64–79   the host's number in that network (1–65535)
//	bits  80–127  the machine (48 bits)
//
// So an org's network is one /64 (OrgPrefix: what its machines may reach),
// an org's machines on one host one /80 of it (HostPrefix: where a packet
// for them is routed), and a cluster's whole private network one /48
// (NetworkPrefix). The org and the host of any address are read from its
// bits (Locate), which is how the host's DNS server knows which org asks
// and a packet filter which org sends. fdaa::3, the DNS server every
// machine is told to use, is in network 0, which no cluster has.
package layout

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strconv"
)

// Network is a cluster's private network number: the 32 bits after fdaa.
// Zero is no network.
type Network uint32

// Org is an org's number in a network; zero is no org.
type Org uint16

// Host is a host's number in a network; zero is no host.
type Host uint16

// MachineBits is how many low bits of an address name the machine.
const MachineBits = 48

// DNS is the address machines send their DNS queries to, as on Fly.
var DNS = netip.AddrFrom16([16]byte{0: 0xfd, 1: 0xaa, 15: 3})

// ParseNetwork reads a network number from 8 hex digits (an instance id).
func ParseNetwork(s string) (Network, error) {
	if len(s) != 8 {
		return 0, fmt.Errorf("network %q: want 8 hex digits", s)
	}
	v, err := strconv.ParseUint(s, 16, 32)
	if err != nil {
		return 0, fmt.Errorf("network %q: want 8 hex digits", s)
	}
	if v == 0 {
		return 0, fmt.Errorf("network %q: zero is no network", s)
	}
	return Network(v), nil
}

// String is the network as 8 hex digits.
func (n Network) String() string { return fmt.Sprintf("%08x", uint32(n)) }

// Place is where an address belongs: its network, org and host.
type Place struct {
	Network Network
	Org     Org
	Host    Host
}

// Valid reports whether every part of p is set.
func (p Place) Valid() bool { return p.Network != 0 && p.Org != 0 && p.Host != 0 }

func (p Place) bytes() [16]byte {
	var b [16]byte
	b[0], b[1] = 0xfd, 0xaa
	binary.BigEndian.PutUint32(b[2:6], uint32(p.Network))
	binary.BigEndian.PutUint16(b[6:8], uint16(p.Org))
	binary.BigEndian.PutUint16(b[8:10], uint16(p.Host))
	return b
}

// NetworkPrefix is a cluster's whole private network: fdaa:<network>::/48.
func NetworkPrefix(n Network) netip.Prefix {
	return netip.PrefixFrom(Place{Network: n}.addr(), 48)
}

// OrgPrefix is one org's network: fdaa:<network>:<org>::/64.
func OrgPrefix(n Network, o Org) netip.Prefix {
	return netip.PrefixFrom(Place{Network: n, Org: o}.addr(), 64)
}

// HostPrefix is an org's machines on one host: fdaa:<network>:<org>:<host>::/80.
func (p Place) HostPrefix() netip.Prefix { return netip.PrefixFrom(p.addr(), 128-MachineBits) }

func (p Place) addr() netip.Addr { return netip.AddrFrom16(p.bytes()) }

// Addr is the address of machine number m (its low 48 bits) at p; ok is
// false when p is not Valid or m is 0, 1 (the host's own address in the
// prefix) or does not fit in 48 bits.
func (p Place) Addr(m uint64) (netip.Addr, bool) {
	if !p.Valid() || m < 2 || m >= 1<<MachineBits {
		return netip.Addr{}, false
	}
	b := p.bytes()
	b[10] = byte(m >> 40)
	b[11] = byte(m >> 32)
	binary.BigEndian.PutUint32(b[12:16], uint32(m))
	return netip.AddrFrom16(b), true
}

// Gateway is the host's own address in p's prefix (machine number 1): the
// next hop its machines route through.
func (p Place) Gateway() netip.Addr {
	b := p.bytes()
	b[15] = 1
	return netip.AddrFrom16(b)
}

// Locate reads where a is: ok only for an address of the layout with
// every part set (so never for DNS or an address outside fdaa::/16).
func Locate(a netip.Addr) (Place, uint64, bool) {
	if !a.Is6() || a.Is4In6() {
		return Place{}, 0, false
	}
	b := a.As16()
	if b[0] != 0xfd || b[1] != 0xaa {
		return Place{}, 0, false
	}
	p := Place{
		Network: Network(binary.BigEndian.Uint32(b[2:6])),
		Org:     Org(binary.BigEndian.Uint16(b[6:8])),
		Host:    Host(binary.BigEndian.Uint16(b[8:10])),
	}
	m := uint64(b[10])<<40 | uint64(b[11])<<32 | uint64(binary.BigEndian.Uint32(b[12:16]))
	if !p.Valid() {
		return Place{}, 0, false
	}
	return p, m, true
}

// SameOrg reports whether a and b are machines (or gateways) of one org's
// network: the rule that keeps orgs apart.
func SameOrg(a, b netip.Addr) bool {
	pa, _, ok := Locate(a)
	if !ok {
		return false
	}
	pb, _, ok := Locate(b)
	return ok && pa.Network == pb.Network && pa.Org == pb.Org
}
