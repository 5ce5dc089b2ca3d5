package cli

import "testing"

func TestMeshEndpoint(t *testing.T) {
	for _, c := range []struct{ mesh, gossip, want string }{
		{"10.1.2.3:51820", "0.0.0.0:7946", "10.1.2.3:51820"},
		{"", "10.1.2.3:7946", "10.1.2.3:7947"},
		{"", "[2001:db8::5]:7946", "[2001:db8::5]:7947"},
	} {
		got, err := meshEndpoint(c.mesh, c.gossip)
		if err != nil || got.String() != c.want {
			t.Errorf("meshEndpoint(%q, %q) = %v %v, want %s", c.mesh, c.gossip, got, err, c.want)
		}
	}
	for _, c := range []struct{ mesh, gossip string }{
		{"0.0.0.0:51820", "10.1.2.3:7946"}, {"10.1.2.3:0", "10.1.2.3:7946"}, {"nonsense", "10.1.2.3:7946"},
		{"", "10.1.2.3:65535"},
	} {
		if got, err := meshEndpoint(c.mesh, c.gossip); err == nil {
			t.Errorf("meshEndpoint(%q, %q) = %v, want refused", c.mesh, c.gossip, got)
		}
	}
}
