package api

import (
	"slices"
	"testing"
)

func TestRawTCP(t *testing.T) {
	for _, tc := range []struct {
		handlers []string
		raw, pp  bool
	}{
		{nil, true, false},
		{[]string{}, true, false},
		{[]string{"proxy_proto"}, true, true},
		{[]string{"http"}, false, false},
		{[]string{"tls", "http"}, false, false},
		{[]string{"tls"}, false, false},
		{[]string{"proxy_proto", "tls"}, false, false},
		{[]string{"pg_tls"}, false, false},
	} {
		raw, pp := RawTCP(tc.handlers)
		if raw != tc.raw || pp != tc.pp {
			t.Errorf("%q: raw %v proxy_proto %v, want %v %v", tc.handlers, raw, pp, tc.raw, tc.pp)
		}
	}
}

func TestConfigTCPPorts(t *testing.T) {
	n := func(v int) *int { return &v }
	c := &MachineConfig{Services: []MachineService{
		{Protocol: "tcp", Ports: []MachinePort{
			{Port: n(5432)},
			{Port: n(80), Handlers: []string{"http"}},
			{StartPort: n(7000), EndPort: n(7002), Handlers: []string{"proxy_proto"}},
		}},
		{Protocol: "tcp", Ports: []MachinePort{{Port: n(5432)}}},
		{Protocol: "udp", Ports: []MachinePort{{Port: n(53)}}},
	}}
	if got, want := c.TCPPorts(), []int{5432, 7000, 7001, 7002}; !slices.Equal(got, want) {
		t.Errorf("TCPPorts %v, want %v", got, want)
	}
	// A huge range is cut short past the limit, not expanded whole.
	c = &MachineConfig{Services: []MachineService{{Protocol: "tcp", Ports: []MachinePort{{StartPort: n(1), EndPort: n(65535)}}}}}
	if got := len(c.TCPPorts()); got != MaxTCPPortsPerConfig+1 {
		t.Errorf("a range of every port: %d ports, want %d (one past the limit)", got, MaxTCPPortsPerConfig+1)
	}
}
