package api

import "slices"

// RawTCP reports whether a public port with these handlers passes its
// connections through as bytes (Fly's "no handlers", or proxy_proto alone),
// and whether a PROXY protocol header comes first. A port with an http or
// tls handler is not raw: the edge speaks the protocol itself.
func RawTCP(handlers []string) (raw, proxyProto bool) {
	for _, h := range handlers {
		if h != "proxy_proto" {
			return false, false
		}
	}
	return true, slices.Contains(handlers, "proxy_proto")
}

// PROXY protocol versions a proxy_proto port sends
// (proxy_proto_options.version; none is v1).
const (
	ProxyProtoV1 = "v1"
	ProxyProtoV2 = "v2"
)

// MaxTCPPortsPerConfig bounds the public raw TCP ports one machine config
// may declare (a port range counts each port): each is claimed for its app
// platform-wide.
const MaxTCPPortsPerConfig = 256

// TCPPorts returns the public ports a config serves as raw TCP (tcp
// services only), sorted, each once.
func (c *MachineConfig) TCPPorts() []int {
	var out []int
	for _, s := range c.Services {
		if s.Protocol != "tcp" {
			continue
		}
		for _, p := range s.Ports {
			if raw, _ := RawTCP(p.Handlers); !raw {
				continue
			}
			switch {
			case p.Port != nil:
				out = append(out, *p.Port)
			case p.StartPort != nil && p.EndPort != nil:
				for port := *p.StartPort; port <= *p.EndPort && port <= 65535 && len(out) <= MaxTCPPortsPerConfig; port++ {
					out = append(out, port)
				}
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
