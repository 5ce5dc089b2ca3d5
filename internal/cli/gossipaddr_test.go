package cli

import (
	"errors"
	"testing"
)

// TestGossipBind: gossip binds to the address given, else the API's host;
// every interface only when said so.
func TestGossipBind(t *testing.T) {
	for _, c := range []struct {
		addr, api string
		any       bool
		host      string
		port      int
		usage     bool
	}{
		{"", "10.0.0.5:4281", false, "10.0.0.5", 7946, false},
		{"10.0.0.5:7000", "127.0.0.1:4281", false, "10.0.0.5", 7000, false},
		{"", "0.0.0.0:4281", false, "", 0, true},
		{"0.0.0.0:7946", "127.0.0.1:4281", false, "", 0, true},
		{"[::]:7946", "127.0.0.1:4281", false, "", 0, true},
		{":7946", "127.0.0.1:4281", false, "", 0, true},
		{"0.0.0.0:7946", "127.0.0.1:4281", true, "0.0.0.0", 7946, false},
		{"host.example:7946", "127.0.0.1:4281", false, "", 0, true},
		{"10.0.0.5:99999", "127.0.0.1:4281", false, "", 0, true},
	} {
		h, p, err := gossipFlags{addr: c.addr, any: c.any}.bind(c.api)
		var ue usageError
		if c.usage != errors.As(err, &ue) || h != c.host || p != c.port {
			t.Errorf("--gossip-addr %q (api %s, any %v) = %q %d %v", c.addr, c.api, c.any, h, p, err)
		}
	}
}
