package proxy

import (
	"encoding/binary"
	"net"
	"net/netip"
	"strconv"
)

// proxyHeaderV1 is the PROXY protocol (version 1, text) header that tells a
// machine who connected: the client's address and the edge address it
// connected to. Addresses of different families are both written as IPv6;
// an address that is not IP ("UNKNOWN") tells the machine to use the
// connection's own.
func proxyHeaderV1(client, edge netip.AddrPort) []byte {
	src, dst := client.Addr().Unmap(), edge.Addr().Unmap()
	if !src.IsValid() || !dst.IsValid() {
		return []byte("PROXY UNKNOWN\r\n")
	}
	fam := "TCP4"
	if !src.Is4() || !dst.Is4() {
		fam = "TCP6"
		src, dst = netip.AddrFrom16(src.As16()), netip.AddrFrom16(dst.As16())
	}
	b := make([]byte, 0, 108) // the longest header the protocol allows
	b = append(b, "PROXY "...)
	b = append(b, fam...)
	b = append(b, ' ')
	b = src.AppendTo(b)
	b = append(b, ' ')
	b = dst.AppendTo(b)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(client.Port()), 10)
	b = append(b, ' ')
	b = strconv.AppendUint(b, uint64(edge.Port()), 10)
	return append(b, "\r\n"...)
}

// addrPortOf reads a connection's address as an IP and port; the zero
// value when it is not one.
func addrPortOf(a net.Addr) netip.AddrPort {
	if a == nil {
		return netip.AddrPort{}
	}
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return ap
}

// proxyV2Sig opens every PROXY protocol version 2 header.
const proxyV2Sig = "\r\n\r\n\x00\r\nQUIT\n"

// proxyHeaderV2 is the PROXY protocol version 2 (binary) header for the
// same facts as proxyHeaderV1: TCP over IPv4, or over IPv6 when either
// address is IPv6 (the other mapped); addresses that are not IP send the
// LOCAL command, which tells the machine to use the connection's own.
func proxyHeaderV2(client, edge netip.AddrPort) []byte {
	src, dst := client.Addr().Unmap(), edge.Addr().Unmap()
	b := make([]byte, 0, 16+36)
	b = append(b, proxyV2Sig...)
	if !src.IsValid() || !dst.IsValid() {
		return append(b, 0x20, 0x00, 0, 0) // version 2, LOCAL; no address
	}
	b = append(b, 0x21) // version 2, PROXY
	if src.Is4() && dst.Is4() {
		b = append(b, 0x11, 0, 12) // TCP over IPv4; 12 address bytes
		s, d := src.As4(), dst.As4()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	} else {
		b = append(b, 0x21, 0, 36) // TCP over IPv6; 36 address bytes
		s, d := src.As16(), dst.As16()
		b = append(b, s[:]...)
		b = append(b, d[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, client.Port())
	return binary.BigEndian.AppendUint16(b, edge.Port())
}
