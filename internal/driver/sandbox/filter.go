package sandbox

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// The packet filter that keeps a driver's machines to their org (nftables,
// in two tables of the driver's own, both called filterTable(bridge): one
// of the bridge family, one of the inet family; nothing else on the machine
// is touched).
//
// The bridge table sees every frame a sandbox sends, before the bridge
// forwards it to another port or hands it to the host: its base chain
// jumps, by the input port's index (a verdict map, ports), to a chain of the
// machine's own ("m<index>"), which lets through only
//
//   - frames from the machine's MAC address carrying IPv6 (no ARP, no IPv4,
//     no VLAN tags);
//   - neighbour discovery: router and neighbour solicitations, and
//     neighbour advertisements for the machine's own address only (no
//     router advertisements or redirects: a machine never routes others);
//   - from the machine's own address: to its org's network (OrgPrefix:
//     its org's machines, here or on other hosts, and the org's gateway
//     here, which is how replies to the host's connections go back), to
//     the private network's DNS (layout.DNS, port 53), and to anything
//     outside fdaa::/16 and multicast (the world, through the host).
//
// Everything else is dropped: another org's machines, whatever the
// bridge, other Flames' networks, spoofed sources.
//
// The inet table guards the host itself: what reaches the host from the
// bridge (its input hook) is let in only as part of a connection the host
// opened (conntrack: the proxy's, health checks'), as neighbour discovery,
// or as DNS to layout.DNS; the rest is dropped. Into the bridge from other
// links (the forward hook) go replies and packets from the driver's own
// network (other hosts' machines, whose own hosts filtered them). Its
// postrouting chain masquerades what the machines send to the world
// behind the host's address.
//
// A machine's chain and map entry are added before its workload runs
// (attach) and removed with its veth (teardown). New replaces a table a
// driver before it left; Close removes both tables when no machine of the
// driver has a chain, and else leaves them to the next driver on the same
// state, whose Adopt fills them again (the sandboxes keep running across a
// restart of the agent, and so does their filter).

// filterTable is the name of the driver's tables.
func filterTable(bridge string) string { return "flame-" + bridge }

// filter is a driver's packet filter.
type filter struct {
	bridge  string
	network layout.Network
	br      *nftables.Table // bridge family
	inet    *nftables.Table
	ports   *nftables.Set // input port index → jump to the machine's chain
}

func newFilter(bridge string, network layout.Network) *filter {
	name := filterTable(bridge)
	br := &nftables.Table{Name: name, Family: nftables.TableFamilyBridge}
	return &filter{
		bridge:  bridge,
		network: network,
		br:      br,
		inet:    &nftables.Table{Name: name, Family: nftables.TableFamilyINet},
		ports: &nftables.Set{Table: br, Name: "ports", KeyType: nftables.TypeIFIndex,
			DataType: nftables.TypeVerdict, IsMap: true},
	}
}

// install makes the tables afresh, replacing what a driver before left.
func (f *filter) install() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	f.remove(c)
	_ = c.Flush() // the tables may not exist

	c.AddTable(f.br)
	accept := nftables.ChainPolicyAccept
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: f.br, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-200), Policy: &accept})
	if err := c.AddSet(f.ports, nil); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	c.AddRule(&nftables.Rule{Table: f.br, Chain: pre, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIF, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: f.ports.Name, SetID: f.ports.ID, IsDestRegSet: true, DestRegister: 0},
	}})

	c.AddTable(f.inet)
	input := c.AddChain(&nftables.Chain{Name: "input", Table: f.inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	fromBridge := ifname(expr.MetaKeyIIFNAME, f.bridge, expr.CmpOpEq)
	rule := func(ch *nftables.Chain, parts ...[]expr.Any) {
		var ex []expr.Any
		for _, p := range parts {
			ex = append(ex, p...)
		}
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: ex})
	}
	rule(input, fromBridge, ctEstablished(), verdict(expr.VerdictAccept))
	rule(input, fromBridge, isIP6(), ndp(), verdict(expr.VerdictAccept))
	rule(input, fromBridge, isIP6(), dnsTo(unix.IPPROTO_UDP), verdict(expr.VerdictAccept))
	rule(input, fromBridge, isIP6(), dnsTo(unix.IPPROTO_TCP), verdict(expr.VerdictAccept))
	rule(input, fromBridge, verdict(expr.VerdictDrop))

	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: f.inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	toBridge := ifname(expr.MetaKeyOIFNAME, f.bridge, expr.CmpOpEq)
	notFromBridge := ifname(expr.MetaKeyIIFNAME, f.bridge, expr.CmpOpNeq)
	rule(fwd, toBridge, notFromBridge, ctEstablished(), verdict(expr.VerdictAccept))
	rule(fwd, toBridge, notFromBridge, isIP6(), addrIn(8, layout.NetworkPrefix(f.network), expr.CmpOpEq), verdict(expr.VerdictAccept))
	rule(fwd, toBridge, notFromBridge, verdict(expr.VerdictDrop))

	nat := c.AddChain(&nftables.Chain{Name: "postrouting", Table: f.inet, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	rule(nat, fromBridge, ifname(expr.MetaKeyOIFNAME, f.bridge, expr.CmpOpNeq), isIP6(),
		addrIn(24, netip.MustParsePrefix("fdaa::/16"), expr.CmpOpNeq), []expr.Any{&expr.Masq{}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install %s: %w", f.br.Name, err)
	}
	return nil
}

// remove queues the deletion of both tables.
func (f *filter) remove(c *nftables.Conn) {
	c.DelTable(f.br)
	c.DelTable(f.inet)
}

// close removes both tables unless a machine's chain is left in them.
func (f *filter) close() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	elems, err := c.GetSetElements(f.ports)
	if err == nil && len(elems) > 0 {
		return nil
	}
	f.remove(c)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: remove %s: %w", f.br.Name, err)
	}
	return nil
}

func machineChain(port int) string { return "m" + strconv.Itoa(port) }

// allow installs machine's chain for the host end (index port) of its veth:
// its MAC, its address, its org's network.
func (f *filter) allow(port int, mac []byte, addr netip.Addr, org layout.Org) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	name := machineChain(port)
	ch := &nftables.Chain{Name: name, Table: f.br}
	// A leftover of an earlier veth with the same index goes first.
	c.SetDeleteElements(f.ports, []nftables.SetElement{{Key: portKey(port)}})
	c.FlushChain(ch)
	c.DelChain(ch)
	_ = c.Flush()

	c.AddChain(ch)
	rule := func(parts ...[]expr.Any) {
		var ex []expr.Any
		for _, p := range parts {
			ex = append(ex, p...)
		}
		c.AddRule(&nftables.Rule{Table: f.br, Chain: ch, Exprs: ex})
	}
	drop, accept := verdict(expr.VerdictDrop), verdict(expr.VerdictAccept)
	own := netip.PrefixFrom(addr, 128)
	// Its own MAC, IPv6 only.
	rule(load(expr.PayloadBaseLLHeader, 6, 6), cmp(expr.CmpOpNeq, mac), drop)
	rule(notIP6(), drop)
	// Neighbour discovery: no advertisement but of its own address, no
	// router advertisements or redirects.
	rule(icmp6Type(136), load(expr.PayloadBaseTransportHeader, 8, 16), cmp(expr.CmpOpNeq, addr.AsSlice()), drop)
	rule(icmp6Type(134), drop)
	rule(icmp6Type(137), drop)
	rule(addrIn(8, netip.MustParsePrefix("fe80::/10"), expr.CmpOpEq), ndp(), accept)
	// Its own source only.
	rule(addrIn(8, own, expr.CmpOpNeq), drop)
	rule(addrIn(24, layout.OrgPrefix(f.network, org), expr.CmpOpEq), accept)
	rule(addrIn(24, netip.MustParsePrefix("ff02::/16"), expr.CmpOpEq), ndp(), accept)
	rule(dnsTo(unix.IPPROTO_UDP), accept)
	rule(dnsTo(unix.IPPROTO_TCP), accept)
	for _, p := range []string{"fdaa::/16", "ff00::/8", "fe80::/10", "::/8"} {
		rule(addrIn(24, netip.MustParsePrefix(p), expr.CmpOpEq), drop)
	}
	rule(accept)
	c.SetAddElements(f.ports, []nftables.SetElement{{Key: portKey(port),
		VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: name}}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: filter of port %d: %w", port, err)
	}
	return nil
}

// forget removes the chain of the veth whose host end had index port.
func (f *filter) forget(port int) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	ch := &nftables.Chain{Name: machineChain(port), Table: f.br}
	c.SetDeleteElements(f.ports, []nftables.SetElement{{Key: portKey(port)}})
	c.FlushChain(ch)
	c.DelChain(ch)
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("nftables: forget port %d: %w", port, err)
	}
	return nil
}

func portKey(port int) []byte { return binaryutil.NativeEndian.PutUint32(uint32(port)) }

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func load(base expr.PayloadBase, off, n uint32) []expr.Any {
	return []expr.Any{&expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n}}
}

func cmp(op expr.CmpOp, data []byte) []expr.Any {
	return []expr.Any{&expr.Cmp{Op: op, Register: 1, Data: data}}
}

// ifname compares the input or output interface's name with name.
func ifname(key expr.MetaKey, name string, op expr.CmpOp) []expr.Any {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: b}}
}

func ctEstablished() []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED),
			Xor:  binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

func isIP6() []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}}}
}

// notIP6 matches a frame that does not carry IPv6 (bridge family: the
// ethertype).
func notIP6() []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyPROTOCOL, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.BigEndian.PutUint16(unix.ETH_P_IPV6)}}
}

// l4 matches the transport protocol (after any extension headers).
func l4(proto byte) []expr.Any {
	return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}}}
}

func icmp6Type(t byte) []expr.Any {
	return append(l4(unix.IPPROTO_ICMPV6), append(load(expr.PayloadBaseTransportHeader, 0, 1), cmp(expr.CmpOpEq, []byte{t})...)...)
}

// ndp matches router and neighbour solicitations and neighbour
// advertisements (ICMPv6 133, 135, 136; 134 is dropped before) with the
// hop limit of 255 that neighbour discovery demands.
func ndp() []expr.Any {
	ex := l4(unix.IPPROTO_ICMPV6)
	ex = append(ex, load(expr.PayloadBaseTransportHeader, 0, 1)...)
	ex = append(ex, cmp(expr.CmpOpGte, []byte{133})...)
	ex = append(ex, cmp(expr.CmpOpLte, []byte{136})...)
	ex = append(ex, cmp(expr.CmpOpNeq, []byte{134})...)
	ex = append(ex, load(expr.PayloadBaseNetworkHeader, 7, 1)...)
	return append(ex, cmp(expr.CmpOpEq, []byte{255})...)
}

// dnsTo matches proto (UDP or TCP) to port 53 of layout.DNS.
func dnsTo(proto byte) []expr.Any {
	ex := load(expr.PayloadBaseNetworkHeader, 24, 16)
	ex = append(ex, cmp(expr.CmpOpEq, layout.DNS.AsSlice())...)
	ex = append(ex, l4(proto)...)
	ex = append(ex, load(expr.PayloadBaseTransportHeader, 2, 2)...)
	return append(ex, cmp(expr.CmpOpEq, binaryutil.BigEndian.PutUint16(53))...)
}

// addrIn compares the IPv6 address at off of the network header (8 the
// source, 24 the destination) with prefix.
func addrIn(off uint32, prefix netip.Prefix, op expr.CmpOp) []expr.Any {
	ex := load(expr.PayloadBaseNetworkHeader, off, 16)
	mask := make([]byte, 16)
	for i := range prefix.Bits() {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 16, Mask: mask, Xor: make([]byte, 16)})
	return append(ex, cmp(op, prefix.Masked().Addr().AsSlice())...)
}
