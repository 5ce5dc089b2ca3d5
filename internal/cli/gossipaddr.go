package cli

import (
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/pflag"
)

// defaultGossipPort is where gossip listens when --gossip-addr names no
// address: on the API address's host.
const defaultGossipPort = 7946

// gossipFlags are where the cluster's gossip binds: the host's private
// address, never every interface unless said so.
type gossipFlags struct {
	addr string
	any  bool
}

func addGossipFlags(fs *pflag.FlagSet, f *gossipFlags, what string) {
	fs.StringVar(&f.addr, "gossip-addr", "", "address the cluster's gossip binds to: "+what+"'s private address (default: --api-addr's host, port 7946)")
	fs.BoolVar(&f.any, "gossip-any-interface", false, "allow --gossip-addr to bind every interface (0.0.0.0 or ::): anything that reaches the port, a sandbox's bridge included, can then knock")
}

// bind returns the address and port gossip binds to; apiAddr supplies the
// address when --gossip-addr is not given.
func (f gossipFlags) bind(apiAddr string) (string, int, error) {
	addr := f.addr
	if addr == "" {
		h, _, err := net.SplitHostPort(apiAddr)
		if err != nil {
			return "", 0, usageError{fmt.Errorf("--gossip-addr: from --api-addr: %w", err)}
		}
		addr = net.JoinHostPort(h, strconv.Itoa(defaultGossipPort))
	}
	h, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, usageError{fmt.Errorf("--gossip-addr: %w", err)}
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return "", 0, usageError{fmt.Errorf("--gossip-addr: bad port %q", p)}
	}
	if h == "" {
		h = "0.0.0.0"
	}
	ip := net.ParseIP(h)
	switch {
	case ip == nil:
		return "", 0, usageError{fmt.Errorf("--gossip-addr: %q is not an IP address", h)}
	case ip.IsUnspecified() && !f.any:
		return "", 0, usageError{fmt.Errorf("--gossip-addr %s binds every interface: give this host's private address (or --gossip-any-interface)", h)}
	}
	return h, port, nil
}
