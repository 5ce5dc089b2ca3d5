package host

import (
	"fmt"
	"log/slog"
	"net"

	"github.com/flamehq/flame/internal/dns"
	"github.com/flamehq/flame/internal/mesh/layout"
)

// MachineDNS is a driver whose machines ask layout.DNS for names: the host
// answers them there, each machine for its own org (see internal/dns
// machines.go), other names from the host's resolver.
type MachineDNS interface {
	Network() layout.Network
	DNSSockets() (net.PacketConn, net.Listener, error)
}

// hostResolvConf is where the host's resolvers are.
const hostResolvConf = "/etc/resolv.conf"

// newMachineDNS builds the server the driver's machines ask; nil when the
// driver has none (a legacy instance's, or no sandboxes).
func newMachineDNS(md MachineDNS, src dns.Source, log *slog.Logger) (*dns.Server, error) {
	if md.Network() == 0 {
		return nil, nil
	}
	m := &dns.Machines{Network: md.Network()}
	if fwd, err := dns.NewForwarder(hostResolvConf); err == nil {
		m.Forward = fwd
	} else {
		log.Warn("machines' DNS: names outside .internal refused", "err", err)
	}
	pc, ln, err := md.DNSSockets()
	if err != nil {
		return nil, fmt.Errorf("machines' dns: %w", err)
	}
	s, err := dns.New(dns.Config{Source: src, PacketConn: pc, Listener: ln, Logger: log, Machines: m})
	if err != nil {
		pc.Close()
		ln.Close()
		return nil, err
	}
	return s, nil
}
