package leftover

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// cgroupDrain bounds the wait for a cgroup's killed processes to go.
const cgroupDrain = 5 * time.Second

// removeCgroupTree kills whatever runs in the cgroup dir and below it and
// removes them all, children first.
func removeCgroupTree(rep *Report, dir string) error {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("cgroup %s: %w", dir, err)
	}
	var errs []error
	for _, e := range entries {
		if e.IsDir() {
			errs = append(errs, removeCgroupTree(rep, filepath.Join(dir, e.Name())))
		}
	}
	// cgroup v2 kills the whole subtree at once; v1 one process at a time.
	os.WriteFile(filepath.Join(dir, "cgroup.kill"), []byte("1"), 0o644)
	deadline := time.Now().Add(cgroupDrain)
	wait := time.Millisecond
	killed := map[int]bool{}
	for {
		err := unix.Rmdir(dir)
		if err == nil {
			rep.Removed["cgroup"]++
			break
		}
		if errors.Is(err, unix.ENOENT) {
			break
		}
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			errs = append(errs, fmt.Errorf("remove cgroup %s: %w", dir, err))
			break
		}
		if b, rerr := os.ReadFile(filepath.Join(dir, "cgroup.procs")); rerr == nil {
			for f := range strings.FieldsSeq(string(b)) {
				if pid, perr := strconv.Atoi(f); perr == nil && pid > 0 && pid != os.Getpid() {
					if unix.Kill(pid, unix.SIGKILL) == nil && !killed[pid] {
						killed[pid] = true
						rep.Removed["process"]++
					}
				}
			}
		}
		time.Sleep(wait)
		wait = min(2*wait, 50*time.Millisecond)
	}
	return errors.Join(errs...)
}

var nftFamilies = map[string]nftables.TableFamily{
	"inet": nftables.TableFamilyINet, "ip": nftables.TableFamilyIPv4, "ip6": nftables.TableFamilyIPv6,
	"bridge": nftables.TableFamilyBridge, "arp": nftables.TableFamilyARP, "netdev": nftables.TableFamilyNetdev,
}

// removeNFTable deletes an nftables table, if it exists.
func removeNFTable(rep *Report, t Thing) error {
	family, ok := nftFamilies[t.Type]
	if !ok {
		return fmt.Errorf("nftables table %s: unknown family %q", t.Name, t.Type)
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	ts, err := c.ListTablesOfFamily(family)
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	for _, have := range ts {
		if have.Name == t.Name {
			c.DelTable(have)
			if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("nftables: remove %s %s: %w", t.Type, t.Name, err)
			}
			rep.Removed["nftables table"]++
		}
	}
	return nil
}

// removeRule deletes an IPv6 policy rule matching t in full.
func removeRule(rep *Report, t Thing) error {
	rules, err := netlink.RuleList(netlink.FAMILY_V6)
	if err != nil {
		return fmt.Errorf("rules: %w", err)
	}
	for _, r := range rules {
		dst := ""
		if r.Dst != nil {
			dst = r.Dst.String()
		}
		if r.Priority != t.Priority || r.Table != t.Table || r.IifName != t.Iif || dst != t.Dst {
			continue
		}
		if err := netlink.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove rule %d: %w", t.Priority, err)
		}
		rep.Removed["rule"]++
	}
	return nil
}

// removeTable deletes the routes of a routing table.
func removeTable(rep *Report, table int) error {
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("routes of table %d: %w", table, err)
	}
	for _, r := range routes {
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("remove a route of table %d: %w", table, err)
		}
		rep.Removed["route"]++
	}
	return nil
}

// removeLink deletes the interface t names, if it is of t's kind; a
// bridge's veth ports first.
func removeLink(rep *Report, t Thing) error {
	l, err := netlink.LinkByName(t.Name)
	if _, notFound := err.(netlink.LinkNotFoundError); notFound {
		return nil
	}
	if err != nil {
		return fmt.Errorf("link %s: %w", t.Name, err)
	}
	if t.Type != "" && l.Type() != t.Type {
		rep.Left = append(rep.Left, fmt.Sprintf("link %s: a %s, not the %s recorded", t.Name, l.Type(), t.Type))
		return nil
	}
	if l.Type() == "bridge" {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("links: %w", err)
		}
		for _, p := range links {
			if p.Attrs().MasterIndex == l.Attrs().Index && p.Type() == "veth" {
				if err := netlink.LinkDel(p); err == nil {
					rep.Removed["veth"]++
				} else if !errors.Is(err, unix.ENODEV) {
					return fmt.Errorf("delete veth %s of %s: %w", p.Attrs().Name, t.Name, err)
				}
			}
		}
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s %s: %w", l.Type(), t.Name, err)
	}
	rep.Removed[l.Type()]++
	return nil
}

// RuleDst is how a rule's destination is recorded.
func RuleDst(n *net.IPNet) string {
	if n == nil {
		return ""
	}
	return n.String()
}
