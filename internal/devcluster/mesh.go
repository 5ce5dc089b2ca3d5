package devcluster

import (
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/flamehq/flame/internal/mesh"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// MeshConfig gives every host of a dev cluster its private network device
// (internal/mesh). The hosts share one kernel, so each one's TUN is named
// from Instance and its index, and only what comes in from its own bridge
// is routed into it (mesh.LinkConfig.Bridge): a packet from one host's
// machine to another host's goes through both hosts' tunnels, which run
// over the simulated network and so pay the latency between their regions.
type MeshConfig struct {
	// Network is the cluster's network (the instance id's 32 bits); host
	// i is number i+1 in it.
	Network layout.Network
	// Instance names the TUNs (mesh.LinkName).
	Instance string
	// Bridge is the bridge of the host at an index (its driver's).
	Bridge func(index int) string
}

// newMesh makes host id's (at index i) mesh: its key in its data dir, its
// link, its device listening on the simulated network.
func (c *Cluster) newMesh(id string, i int, dataDir string) (*mesh.Mesh, error) {
	mc := c.cfg.Mesh
	if mc == nil {
		return nil, nil
	}
	if i+1 > 0xffff {
		return nil, fmt.Errorf("devcluster: host %s: no host number past 65535 in the private network", id)
	}
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, err
	}
	key, err := mesh.LoadKey(dataDir)
	if err != nil {
		return nil, err
	}
	ip, ok := c.Net.HostIP(id)
	if !ok {
		return nil, fmt.Errorf("devcluster: host %s not on the simulated network", id)
	}
	link, err := mesh.OpenLink(mesh.LinkConfig{Name: mesh.LinkName(mc.Instance, i), Network: mc.Network, Bridge: mc.Bridge(i),
		Logger: c.cfg.Logger.With("host", id)})
	if err != nil {
		return nil, err
	}
	m, err := mesh.New(mesh.Config{
		HostID: id, Network: mc.Network, Host: layout.Host(i + 1), Key: key, Link: link,
		Bind:      &mesh.PacketBind{Listen: func(port int) (net.PacketConn, error) { return c.Net.ListenPacket(id, port) }},
		Advertise: netip.AddrFrom4([4]byte(ip.To4())),
		Logger:    c.cfg.Logger.With("host", id),
	})
	if err != nil {
		link.Close()
		return nil, err
	}
	return m, nil
}
