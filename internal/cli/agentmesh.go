package cli

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"

	"github.com/spf13/pflag"
	"golang.zx2c4.com/wireguard/conn"

	"github.com/flamehq/flame/internal/driver/sandbox"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/mesh"
	"github.com/flamehq/flame/internal/mesh/layout"
)

func addMeshFlag(fs *pflag.FlagSet, f *agentFlags) {
	fs.StringVar(&f.meshAddr, "mesh-addr", "", "UDP address (ip:port) of this host's WireGuard endpoint for the private network, which other hosts must reach (with --host-id and the sandbox driver; default: the gossip address's IP, or this machine's first global one, at the gossip port + 1)")
}

// agentPlace is where the agent's host is in the private network: what its
// enrollment gave it, else (a cluster of agents without a control plane)
// its instance's network and number 1.
func agentPlace(dataDir string) (layout.Network, layout.Host, error) {
	n, h, ok, err := host.LoadPlace(dataDir)
	if err != nil || ok {
		return n, h, err
	}
	return 0, 0, nil
}

// agentMesh is a clustered sandbox host's private network device: its TUN
// routing the cluster's network in the host's own namespace, its tunnels
// over the kernel's UDP at --mesh-addr. Nil for the exec driver or without
// root.
func agentMesh(f agentFlags, kind string, network layout.Network, hostNumber layout.Host) (*mesh.Mesh, error) {
	if kind != host.DriverSandbox || os.Geteuid() != 0 {
		return nil, nil
	}
	instance, err := sandbox.LoadInstance(f.dataDir)
	if err != nil {
		return nil, err
	}
	if network == 0 {
		if network, err = layout.ParseNetwork(instance); err != nil {
			return nil, nil // state from before instance ids keeps its layout, and has no mesh
		}
		hostNumber = 1
	}
	gh, gp, err := f.gossip.bind(f.apiAddr)
	if err != nil {
		return nil, err
	}
	ep, err := meshEndpoint(f.meshAddr, net.JoinHostPort(gh, strconv.Itoa(gp)))
	if err != nil {
		return nil, usageError{fmt.Errorf("--mesh-addr: %w", err)}
	}
	// A key already kept was a device's before this one: its peers may
	// hold sessions with that device, to renew at once.
	_, err = os.Stat(filepath.Join(f.dataDir, mesh.KeyFile))
	restarted := err == nil
	key, err := mesh.LoadKey(f.dataDir)
	if err != nil {
		return nil, err
	}
	link, err := mesh.OpenLink(mesh.LinkConfig{Name: mesh.LinkName(instance, 0), Network: network})
	if err != nil {
		return nil, err
	}
	m, err := mesh.New(mesh.Config{HostID: f.hostID, Network: network, Host: hostNumber, Key: key, Link: link,
		Bind: conn.NewStdNetBind(), Port: ep.Port(), Advertise: ep.Addr(), Restarted: restarted})
	if err != nil {
		link.Close()
		return nil, err
	}
	return m, nil
}

// meshEndpoint is the address other hosts reach this one's tunnels at.
func meshEndpoint(meshAddr, gossipAddr string) (netip.AddrPort, error) {
	if meshAddr != "" {
		ap, err := netip.ParseAddrPort(meshAddr)
		if err != nil || ap.Port() == 0 || ap.Addr().IsUnspecified() {
			return netip.AddrPort{}, fmt.Errorf("%q: want ip:port that other hosts reach", meshAddr)
		}
		return ap, nil
	}
	h, p, err := net.SplitHostPort(gossipAddr)
	if err != nil {
		return netip.AddrPort{}, err
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 1 || port >= 65535 {
		return netip.AddrPort{}, fmt.Errorf("no default beside gossip address %q: set it", gossipAddr)
	}
	ip, err := netip.ParseAddr(h)
	if err != nil || ip.IsUnspecified() {
		if ip, err = firstGlobalAddr(); err != nil {
			return netip.AddrPort{}, err
		}
	}
	return netip.AddrPortFrom(ip.Unmap(), uint16(port+1)), nil
}

// firstGlobalAddr is this machine's first address another machine could
// reach: not loopback, not link-local, not in the private network.
func firstGlobalAddr() (netip.Addr, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return netip.Addr{}, err
	}
	private := netip.MustParsePrefix("fdaa::/16")
	for _, a := range addrs {
		n, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || private.Contains(ip) || !ip.IsGlobalUnicast() {
			continue
		}
		return ip, nil
	}
	return netip.Addr{}, fmt.Errorf("no address of this machine other hosts could reach: set it")
}
