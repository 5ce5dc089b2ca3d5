package sandbox

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flamehq/flame/internal/mesh/layout"
)

// The packet filter that keeps a driver's machines to their org (nftables,
// in two tables of the driver's own, both called filterTable(bridge): one
// of the bridge family, one of the inet family; nothing else on the machine
// is touched).
//
// The bridge table sees every frame a sandbox sends, before the bridge
// forwards it to another port or hands it to the host. A frame that comes
// in from a port of the driver's machines (set ports, by interface index)
// goes through one chain, guard, whose rules are the same for every
// machine and whose facts are per machine, in sets keyed by the port: its
// MAC address (macs), its address (srcs) and its org's network (nets, the
// /64's first 64 bits). So a machine's start adds four set elements in one
// transaction and its end deletes them: no chain is made or removed per
// machine (a chain's removal waits for the kernel's RCU grace periods:
// milliseconds). Guard lets through only
//
//   - frames from the port's MAC address carrying IPv6 (no ARP, no IPv4,
//     no VLAN tags);
//   - neighbour discovery: router and neighbour solicitations, and
//     neighbour advertisements for the port's own address only (no
//     router advertisements or redirects: a machine never routes others);
//   - from the port's own address: to its org's network (OrgPrefix: its
//     org's machines, here or on other hosts, and the org's gateway here,
//     which is how replies to the host's connections go back), to the
//     private network's DNS (layout.DNS, port 53), and to anything outside
//     fdaa::/16, link-local, multicast and ::/8 (the world, through the
//     host).
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
// A machine's elements are added before its workload runs (attach) and
// removed at its teardown. Close removes the tables when no machine of the
// driver is in them, and else leaves them to the next driver on the same
// state (the sandboxes keep running across a restart of the agent, and so
// does their filter): New replaces them in one transaction with tables of
// its own that keep the elements of the veths still on the bridge, and
// Adopt takes those machines over.

// filterTable is the name of the driver's tables.
func filterTable(bridge string) string { return "flame-" + bridge }

// The 32-bit registers concatenated keys are built in.
const (
	reg0 = 8 // NFT_REG32_00
	reg1 = 9 // NFT_REG32_01
)

// filter is a driver's packet filter.
type filter struct {
	bridge  string
	network layout.Network
	br      *nftables.Table // bridge family
	inet    *nftables.Table
	ports   *nftables.Set // the machines' ports (interface index)
	macs    *nftables.Set // port . MAC address
	srcs    *nftables.Set // port . address
	nets    *nftables.Set // port . first 64 bits of the org's network
}

func newFilter(bridge string, network layout.Network) *filter {
	name := filterTable(bridge)
	br := &nftables.Table{Name: name, Family: nftables.TableFamilyBridge}
	concat := func(ts ...nftables.SetDatatype) nftables.SetDatatype {
		t, err := nftables.ConcatSetType(ts...)
		if err != nil {
			panic(err) // three types at most: never
		}
		return t
	}
	return &filter{
		bridge:  bridge,
		network: network,
		br:      br,
		inet:    &nftables.Table{Name: name, Family: nftables.TableFamilyINet},
		ports:   &nftables.Set{Table: br, Name: "ports", KeyType: nftables.TypeIFIndex},
		macs: &nftables.Set{Table: br, Name: "macs", Concatenation: true,
			KeyType: concat(nftables.TypeIFIndex, nftables.TypeEtherAddr)},
		srcs: &nftables.Set{Table: br, Name: "srcs", Concatenation: true,
			KeyType: concat(nftables.TypeIFIndex, nftables.TypeIP6Addr)},
		nets: &nftables.Set{Table: br, Name: "nets", Concatenation: true,
			KeyType: concat(nftables.TypeIFIndex, nftables.TypeInteger, nftables.TypeInteger)},
	}
}

// install makes the tables afresh, replacing what a driver before left.
func (f *filter) install() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	// The tables a driver before left are replaced in the same
	// transaction, keeping the elements of its machines whose veths are
	// still ports of the bridge: their sandboxes run on, filtered all along,
	// until Adopt takes them over.
	keep := map[*nftables.Set][]nftables.SetElement{}
	if ts, err := c.ListTables(); err == nil {
		for _, t := range ts {
			if t.Name == f.br.Name && (t.Family == f.br.Family || t.Family == f.inet.Family) {
				if t.Family == f.br.Family {
					keep = f.liveElements(c)
				}
				c.DelTable(t)
			}
		}
	}

	c.AddTable(f.br)
	accept := nftables.ChainPolicyAccept
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: f.br, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(-200), Policy: &accept})
	guard := c.AddChain(&nftables.Chain{Name: "guard", Table: f.br})
	for _, set := range []*nftables.Set{f.ports, f.macs, f.srcs, f.nets} {
		if err := c.AddSet(set, keep[set]); err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
	}
	rule := func(ch *nftables.Chain, parts ...[]expr.Any) {
		var ex []expr.Any
		for _, p := range parts {
			ex = append(ex, p...)
		}
		c.AddRule(&nftables.Rule{Table: ch.Table, Chain: ch, Exprs: ex})
	}
	drop, accept_ := verdict(expr.VerdictDrop), verdict(expr.VerdictAccept)
	rule(pre, []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIF, Register: 1},
		&expr.Lookup{SourceRegister: 1, SetName: f.ports.Name, SetID: f.ports.ID},
		&expr.Verdict{Kind: expr.VerdictJump, Chain: guard.Name},
	})
	// Its own MAC, IPv6 only.
	rule(guard, portAnd(load8(expr.PayloadBaseLLHeader, 6, 6), f.macs, true), drop)
	rule(guard, notIP6(), drop)
	// Neighbour discovery: no advertisement but of its own address, no
	// router advertisements or redirects.
	rule(guard, icmp6Type(136), portAnd(load8(expr.PayloadBaseTransportHeader, 8, 16), f.srcs, true), drop)
	rule(guard, icmp6Type(134), drop)
	rule(guard, icmp6Type(137), drop)
	rule(guard, addrIn(8, netip.MustParsePrefix("fe80::/10"), expr.CmpOpEq), ndp(), accept_)
	// Its own source only.
	rule(guard, portAnd(load8(expr.PayloadBaseNetworkHeader, 8, 16), f.srcs, true), drop)
	rule(guard, portAnd(load8(expr.PayloadBaseNetworkHeader, 24, 8), f.nets, false), accept_)
	// Neighbour discovery from its own address, to its neighbours'
	// solicited-node groups or link-local addresses (the host asks for a
	// machine from its link-local address when it forwards to it).
	rule(guard, addrIn(24, netip.MustParsePrefix("ff02::/16"), expr.CmpOpEq), ndp(), accept_)
	rule(guard, addrIn(24, netip.MustParsePrefix("fe80::/10"), expr.CmpOpEq), ndp(), accept_)
	rule(guard, dnsTo(unix.IPPROTO_UDP), accept_)
	rule(guard, dnsTo(unix.IPPROTO_TCP), accept_)
	for _, p := range []string{"fdaa::/16", "ff00::/8", "fe80::/10", "::/8"} {
		rule(guard, addrIn(24, netip.MustParsePrefix(p), expr.CmpOpEq), drop)
	}

	c.AddTable(f.inet)
	input := c.AddChain(&nftables.Chain{Name: "input", Table: f.inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	fromBridge := ifname(expr.MetaKeyIIFNAME, f.bridge, expr.CmpOpEq)
	rule(input, fromBridge, ctEstablished(), accept_)
	rule(input, fromBridge, isIP6(), ndp(), accept_)
	rule(input, fromBridge, isIP6(), dnsTo(unix.IPPROTO_UDP), accept_)
	rule(input, fromBridge, isIP6(), dnsTo(unix.IPPROTO_TCP), accept_)
	rule(input, fromBridge, drop)

	fwd := c.AddChain(&nftables.Chain{Name: "forward", Table: f.inet, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	toBridge := ifname(expr.MetaKeyOIFNAME, f.bridge, expr.CmpOpEq)
	notFromBridge := ifname(expr.MetaKeyIIFNAME, f.bridge, expr.CmpOpNeq)
	rule(fwd, toBridge, notFromBridge, ctEstablished(), accept_)
	rule(fwd, toBridge, notFromBridge, isIP6(), addrIn(8, layout.NetworkPrefix(f.network), expr.CmpOpEq), accept_)
	rule(fwd, toBridge, notFromBridge, drop)

	nat := c.AddChain(&nftables.Chain{Name: "postrouting", Table: f.inet, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	rule(nat, fromBridge, ifname(expr.MetaKeyOIFNAME, f.bridge, expr.CmpOpNeq), isIP6(),
		addrIn(24, netip.MustParsePrefix("fdaa::/16"), expr.CmpOpNeq), []expr.Any{&expr.Masq{}})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: install %s: %w", f.br.Name, err)
	}
	return nil
}

// liveElements reads the elements of the tables in place whose port is
// still a port of the bridge.
func (f *filter) liveElements(c *nftables.Conn) map[*nftables.Set][]nftables.SetElement {
	br, err := netlink.LinkByName(f.bridge)
	if err != nil {
		return nil
	}
	links, err := netlink.LinkList()
	if err != nil {
		return nil
	}
	live := map[string]bool{}
	for _, l := range links {
		if l.Attrs().MasterIndex == br.Attrs().Index {
			live[string(portKey(l.Attrs().Index))] = true
		}
	}
	out := map[*nftables.Set][]nftables.SetElement{}
	for _, set := range []*nftables.Set{f.ports, f.macs, f.srcs, f.nets} {
		es, err := c.GetSetElements(set)
		if err != nil {
			continue
		}
		for _, e := range es {
			if len(e.Key) >= 4 && live[string(e.Key[:4])] {
				out[set] = append(out[set], nftables.SetElement{Key: e.Key})
			}
		}
	}
	return out
}

// close removes both tables unless a machine is left in them (any case
// with all).
func (f *filter) close(all bool) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if elems, err := c.GetSetElements(f.ports); !all && err == nil && len(elems) > 0 {
		return nil
	}
	// Only the tables that exist: a transaction that deletes one that does
	// not fails whole.
	ts, err := c.ListTables()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for _, t := range ts {
		if t.Name == f.br.Name && (t.Family == f.br.Family || t.Family == f.inet.Family) {
			c.DelTable(t)
		}
	}
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: remove %s: %w", f.br.Name, err)
	}
	return nil
}

// port is one machine's facts in the filter.
type port struct {
	index int
	mac   []byte
	addr  netip.Addr
	org   layout.Org
}

func (p port) elements(f *filter) map[*nftables.Set][]nftables.SetElement {
	key := portKey(p.index)
	mac := append(append(slices.Clone(key), p.mac...), 0, 0)
	net := layout.OrgPrefix(f.network, p.org).Addr().As16()
	one := func(k []byte) []nftables.SetElement { return []nftables.SetElement{{Key: k}} }
	return map[*nftables.Set][]nftables.SetElement{
		f.ports: one(key),
		f.macs:  one(mac),
		f.srcs:  one(append(slices.Clone(key), p.addr.AsSlice()...)),
		f.nets:  one(append(slices.Clone(key), net[:8]...)),
	}
}

// allow lets the machine behind port p send what its org may.
func (f *filter) allow(p port) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for set, es := range p.elements(f) {
		if err := c.SetAddElements(set, es); err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: filter of port %d: %w", p.index, err)
	}
	return nil
}

// forget removes what allow added for p.
func (f *filter) forget(p port) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for set, es := range p.elements(f) {
		if err := c.SetDeleteElements(set, es); err != nil {
			return fmt.Errorf("nftables: %w", err)
		}
	}
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("nftables: forget port %d: %w", p.index, err)
	}
	return nil
}

// portAnd looks the input port and the value loaded (by load8) up in set:
// a match when absent with not, when present without.
func portAnd(value []expr.Any, set *nftables.Set, not bool) []expr.Any {
	ex := []expr.Any{&expr.Meta{Key: expr.MetaKeyIIF, Register: reg0}}
	ex = append(ex, value...)
	return append(ex, &expr.Lookup{SourceRegister: reg0, SetName: set.Name, SetID: set.ID, Invert: not})
}

// load8 loads n bytes of the header at off into the register after the
// port's, for a concatenated key.
func load8(base expr.PayloadBase, off, n uint32) []expr.Any {
	return []expr.Any{&expr.Payload{DestRegister: reg1, Base: base, Offset: off, Len: n}}
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
