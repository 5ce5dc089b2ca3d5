package proxy

import (
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
