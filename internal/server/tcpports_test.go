package server_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/flamehq/flame/api"
)

// tcpConfig is the demo config with a raw TCP service on each public port
// (handlers as given: none is raw TCP).
func tcpConfig(handlers []string, ports ...int) *api.MachineConfig {
	c := demoConfig()
	s := api.MachineService{Protocol: "tcp", InternalPort: 5432}
	for _, p := range ports {
		s.Ports = append(s.Ports, api.MachinePort{Port: &p, Handlers: handlers})
	}
	c.Services = []api.MachineService{s}
	return c
}

// TestRawTCPPortsBelongToOneApp: the first app whose machine or group
// declares a raw TCP public port holds it; another app's create, update or
// group naming it is refused with 409 naming the port (HTTP ports are
// shared as ever); the port is free again once the holder is deleted.
func TestRawTCPPortsBelongToOneApp(t *testing.T) {
	c := startDev(t, devOptions{regions: []string{"ams"}, perReg: 1})
	ctx := context.Background()
	acme, _ := orgWithApp(t, c, "acme", "db")
	rival, _ := orgWithApp(t, c, "rival", "other")

	_, err := acme.CreateMachine(ctx, "db", api.LaunchMachineInput{Config: tcpConfig(nil, 15432), Region: "ams"})
	if err != nil {
		t.Fatal(err)
	}
	// The holder declares it again, and another port with proxy_proto.
	if _, err := acme.CreateMachine(ctx, "db", api.LaunchMachineInput{Config: tcpConfig([]string{"proxy_proto"}, 15432, 15433), Region: "ams"}); err != nil {
		t.Fatalf("the holder declaring its port again: %v", err)
	}
	refused := func(what string, err error, port string) {
		t.Helper()
		if status(err) != http.StatusConflict || !strings.Contains(err.Error(), "port "+port) {
			t.Errorf("%s: %v, want 409 naming port %s", what, err, port)
		}
	}
	_, err = rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: tcpConfig(nil, 15432), Region: "ams"})
	refused("create", err, "15432")
	_, err = rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: tcpConfig([]string{"proxy_proto"}, 15433), Region: "ams"})
	refused("create with proxy_proto", err, "15433")
	_, err = rival.PutGroup(ctx, "other", api.Group{Name: "app", Config: tcpConfig(nil, 15432), Regions: map[string]int{"ams": 1}})
	refused("group", err, "15432")
	// An HTTP service on the same port number is no raw TCP claim.
	om, err := rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: tcpConfig([]string{"http"}, 15432), Region: "ams"})
	if err != nil {
		t.Fatalf("an HTTP port of the same number: %v", err)
	}
	_, err = rival.UpdateMachine(ctx, api.MachineRef{App: "other", ID: om.ID}, api.LaunchMachineInput{Config: tcpConfig(nil, 15432)})
	refused("update", err, "15432")
	// A refused config claims none of its ports: 15434 stays free.
	_, err = rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: tcpConfig(nil, 15434, 15432), Region: "ams"})
	refused("create of two ports", err, "15432")
	if _, err := acme.CreateMachine(ctx, "db", api.LaunchMachineInput{Config: tcpConfig(nil, 15434), Region: "ams"}); err != nil {
		t.Fatalf("a port a refused config named: %v", err)
	}
	// Too many raw ports in one config.
	big := tcpConfig(nil)
	lo, hi := 20000, 20000+api.MaxTCPPortsPerConfig
	big.Services[0].Ports = []api.MachinePort{{StartPort: &lo, EndPort: &hi}}
	if _, err := rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: big, Region: "ams"}); status(err) != http.StatusUnprocessableEntity {
		t.Errorf("%d raw TCP ports: %v, want 422", hi-lo+1, err)
	}

	if err := acme.DeleteApp(ctx, "db"); err != nil {
		t.Fatal(err)
	}
	if _, err := rival.CreateMachine(ctx, "other", api.LaunchMachineInput{Config: tcpConfig(nil, 15432, 15433), Region: "ams"}); err != nil {
		t.Fatalf("after the holder was deleted: %v", err)
	}
}
