package mesh

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/flamehq/flame/internal/leftover"
	"github.com/flamehq/flame/internal/lockfile"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// MTU is the TUN's: a 1500-byte path less WireGuard's overhead over IPv6
// UDP (80 bytes), the machines learning it by path MTU discovery.
const MTU = 1420

// LinkConfig configures the kernel side of a host's mesh.
type LinkConfig struct {
	// Name is the TUN's name (at most 15 bytes; LinkName gives one per
	// instance and host). A link of that name that exists already is
	// another's: OpenLink refuses it.
	Name string
	// Network is the cluster's: its NetworkPrefix is routed into the TUN.
	Network layout.Network
	// Bridge, when set, is the host's bridge in a kernel other hosts share
	// (`flame dev`): only what comes in from it is routed into the TUN, by
	// a rule "iif Bridge to NetworkPrefix" and a table of the link's own,
	// both allocated under a lock in LockDir so that Flames sharing the
	// kernel never take one another's. Empty: the route is in the main
	// table, as on a host of its own, where the bridge's prefixes (its
	// orgs' /80s) are more specific and stay on it.
	Bridge string
	// LockDir holds the allocation locks (default /run/flame).
	LockDir string
	// Logger (nil: none) hears of the host's IPv6 forwarding.
	Logger *slog.Logger
}

// LinkName is the TUN name of host number host of an instance: "fw",
// the instance's 8 hex digits, "-", the host number (at most 15 bytes).
func LinkName(instance string, host int) string {
	return "fw" + instance + "-" + strconv.Itoa(host)
}

// Link is a host's TUN and the routing that sends the private network
// into it. Close removes what it made, and only that.
type Link struct {
	cfg   LinkConfig
	tun   tun.Device
	index int
	rule  *netlink.Rule // nil on the main table
	route *netlink.Route
	lock  *os.File
	// record names what the link makes on the host, so that a Flame
	// killed leaves nothing for good (internal/leftover).
	record *leftover.Record
}

// The allocation of a routing table and a rule priority for a Link with a
// Bridge: slot i has table tableBase+i and priority prioBase+i (before the
// main table's 32766), each taken under the lock file mesh-slot-<i>.lock.
const (
	tableBase = 0x6d650000
	prioBase  = 20000
	slots     = 4096
)

// OpenLink makes the TUN, brings it up and routes the network into it.
func OpenLink(cfg LinkConfig) (_ *Link, err error) {
	if n := len(cfg.Name); n == 0 || n > 15 || strings.ContainsAny(cfg.Name, "/ :") {
		return nil, fmt.Errorf("mesh link %q: not an interface name", cfg.Name)
	}
	if cfg.Network == 0 {
		return nil, errors.New("mesh link: no network")
	}
	if cfg.LockDir == "" {
		cfg.LockDir = "/run/flame"
	}
	if _, err := netlink.LinkByName(cfg.Name); err == nil {
		return nil, fmt.Errorf("mesh link %s: exists already: another Flame uses the name", cfg.Name)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	// Its name is its TUN's in its network namespace: agents in
	// namespaces of their own may each have a link of the same name.
	netns, err := leftover.Netns()
	if err != nil {
		return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
	}
	rec, err := leftover.Open(leftover.DefaultDir, "mesh-"+strings.ReplaceAll(netns, ":", "-")+"-"+cfg.Name,
		leftover.NetworkGroup(cfg.Network.String()))
	if err != nil {
		return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
	}
	// A link of the same name killed before left its rule and table:
	// its TUN went with it, so nothing of it is taken over.
	if rep := rec.RemoveInherited(); len(rep.Removed) > 0 || rep.Err != nil {
		cfg.Logger.Info("removed what this link's last run left: "+rep.String(), "link", cfg.Name, "err", rep.Err)
	}
	l := &Link{cfg: cfg, record: rec}
	defer func() {
		if err != nil {
			l.Close()
		}
	}()
	// Routing from a bridge into the TUN is forwarding, which IPv6 does
	// only when it is on for the whole namespace (see leftover).
	if err := rec.Forwarding(cfg.Logger); err != nil {
		return nil, fmt.Errorf("mesh link: %w", err)
	}
	if err := rec.Add(leftover.Link(cfg.Name, "tun")); err != nil {
		return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
	}
	if l.tun, err = tun.CreateTUN(cfg.Name, MTU); err != nil {
		return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
	}
	link, err := netlink.LinkByName(cfg.Name)
	if err != nil {
		return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
	}
	l.index = link.Attrs().Index
	os.WriteFile("/proc/sys/net/ipv6/conf/"+cfg.Name+"/disable_ipv6", []byte("0"), 0o644)
	if err := netlink.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("mesh link %s: up: %w", cfg.Name, err)
	}
	network := layout.NetworkPrefix(cfg.Network)
	dst := &net.IPNet{IP: network.Addr().AsSlice(), Mask: net.CIDRMask(network.Bits(), 128)}
	route := &netlink.Route{LinkIndex: l.index, Dst: dst, Family: netlink.FAMILY_V6}
	if cfg.Bridge != "" {
		slot, lock, err := claimSlot(cfg.LockDir, cfg.Name)
		if err != nil {
			return nil, err
		}
		l.lock = lock
		route.Table = tableBase + slot
		l.rule = netlink.NewRule()
		l.rule.Family = netlink.FAMILY_V6
		l.rule.IifName = cfg.Bridge
		l.rule.Dst = dst
		l.rule.Table = tableBase + slot
		l.rule.Priority = prioBase + slot
		err = rec.Add(leftover.LockFile(lock.Name()), leftover.Table(route.Table),
			leftover.Rule(l.rule.Priority, l.rule.Table, l.rule.IifName, leftover.RuleDst(dst)))
		if err != nil {
			return nil, fmt.Errorf("mesh link %s: %w", cfg.Name, err)
		}
	}
	if err := netlink.RouteAdd(route); err != nil {
		return nil, fmt.Errorf("mesh link %s: route %s: %w", cfg.Name, network, err)
	}
	l.route = route
	if l.rule != nil {
		if err := netlink.RuleAdd(l.rule); err != nil {
			r := l.rule
			l.rule = nil
			return nil, fmt.Errorf("mesh link %s: rule iif %s lookup %d: %w", cfg.Name, r.IifName, r.Table, err)
		}
	}
	return l, nil
}

// claimSlot takes the first slot whose lock is free and whose table and
// priority nothing on the machine uses (a Flame that takes no lock).
func claimSlot(dir, holder string) (int, *os.File, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, nil, fmt.Errorf("mesh link: %w", err)
	}
	rules, err := netlink.RuleList(netlink.FAMILY_ALL)
	if err != nil {
		return 0, nil, fmt.Errorf("mesh link: rules: %w", err)
	}
	used := map[int]bool{}
	for _, r := range rules {
		used[r.Table] = true
		used[r.Priority] = true
	}
	for i := range slots {
		if used[tableBase+i] || used[prioBase+i] {
			continue
		}
		f, err := lockfile.Take(filepath.Join(dir, "mesh-slot-"+strconv.Itoa(i)+".lock"))
		if errors.Is(err, unix.EWOULDBLOCK) {
			continue
		}
		if err != nil {
			return 0, nil, fmt.Errorf("mesh link: lock: %w", err)
		}
		routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: tableBase + i}, netlink.RT_FILTER_TABLE)
		if err != nil || len(routes) > 0 {
			lockfile.Release(f)
			continue
		}
		f.Truncate(0)
		f.WriteAt([]byte(holder+"\n"), 0)
		return i, f, nil
	}
	return 0, nil, errors.New("mesh link: every routing table slot is taken")
}

// TUN is the link's device, for the Mesh (which closes it).
func (l *Link) TUN() tun.Device { return l.tun }

// Close removes the rule and the route, deletes the TUN if it is still
// there (by its index, and only while it has the link's name) and lets go
// of the slot.
func (l *Link) Close() error {
	var errs []error
	if l.rule != nil {
		if err := netlink.RuleDel(l.rule); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("mesh link %s: remove rule: %w", l.cfg.Name, err))
		}
		l.rule = nil
	}
	if l.route != nil {
		if err := netlink.RouteDel(l.route); err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("mesh link %s: remove route: %w", l.cfg.Name, err))
		}
		l.route = nil
	}
	if l.tun != nil {
		l.tun.Close() // a TUN that is not persistent goes with its last descriptor
		if link, err := netlink.LinkByIndex(l.index); err == nil && link.Attrs().Name == l.cfg.Name {
			netlink.LinkDel(link)
		}
		l.tun = nil
	}
	if l.lock != nil {
		lockfile.Release(l.lock)
		l.lock = nil
	}
	if l.record != nil {
		errs = append(errs, l.record.Close())
		l.record = nil
	}
	return errors.Join(errs...)
}
