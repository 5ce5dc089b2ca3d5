package proccluster

import (
	"fmt"
	"net"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netns"
)

// Each host's namespace has one nftables table, fwTable, with an input and
// an output chain that accept by default; a partition adds drop rules for
// the addresses of the other side, and heal flushes both chains. The table
// lives in the host's namespace and goes with it.
const fwTable = "flame-partition"

// firewall is the nftables table of one host's namespace.
type firewall struct{ path string }

// with calls f with a connection to nftables in the namespace and the
// table's chains, then sends what f queued.
func (fw firewall) with(f func(c *nftables.Conn, t *nftables.Table, in, out *nftables.Chain)) error {
	ns, err := netns.GetFromPath(fw.path)
	if err != nil {
		return err
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return fmt.Errorf("nftables in %s: %w", fw.path, err)
	}
	accept := nftables.ChainPolicyAccept
	t := &nftables.Table{Name: fwTable, Family: nftables.TableFamilyIPv4}
	in := &nftables.Chain{Name: "input", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept}
	out := &nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityFilter, Policy: &accept}
	f(c, t, in, out)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables in %s: %w", fw.path, err)
	}
	return nil
}

// create makes the table and its chains.
func (fw firewall) create() error {
	return fw.with(func(c *nftables.Conn, t *nftables.Table, in, out *nftables.Chain) {
		c.AddTable(t)
		c.AddChain(in)
		c.AddChain(out)
	})
}

// drop adds rules dropping every packet from and to the peers' addresses.
func (fw firewall) drop(peers []net.IP) error {
	return fw.with(func(c *nftables.Conn, t *nftables.Table, in, out *nftables.Chain) {
		for _, ip := range peers {
			// ip saddr <peer> drop (input), ip daddr <peer> drop (output):
			// the IPv4 header's source address is at 12, the destination
			// at 16.
			c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: dropAddr(12, ip)})
			c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: dropAddr(16, ip)})
		}
	})
}

func dropAddr(offset uint32, ip net.IP) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip.To4()},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}
}

// flush removes every rule.
func (fw firewall) flush() error {
	return fw.with(func(c *nftables.Conn, t *nftables.Table, in, out *nftables.Chain) {
		c.FlushChain(in)
		c.FlushChain(out)
	})
}

// rules counts the rules in the table's chains.
func (fw firewall) rules() (int, error) {
	ns, err := netns.GetFromPath(fw.path)
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	c, err := nftables.New(nftables.WithNetNSFd(int(ns)))
	if err != nil {
		return 0, err
	}
	t := &nftables.Table{Name: fwTable, Family: nftables.TableFamilyIPv4}
	n := 0
	for _, ch := range []string{"input", "output"} {
		rs, err := c.GetRules(t, &nftables.Chain{Name: ch, Table: t})
		if err != nil {
			return 0, fmt.Errorf("nftables in %s: %w", fw.path, err)
		}
		n += len(rs)
	}
	return n, nil
}
