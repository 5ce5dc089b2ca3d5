package proxy

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/flamehq/flame/internal/proxy/route"
)

// TestTCPAutostart: a raw TCP connection to an app whose only machine is
// stopped (autostart on) starts it — on the edge's host and on one across
// the backhaul — and is held until it is ready, then spliced to it; before,
// the connection was closed at once.
func TestTCPAutostart(t *testing.T) {
	b := startTCPBackend(t, "echo", false)
	for _, on := range []string{"ams-1", "fra-1"} {
		t.Run(on, func(t *testing.T) {
			parkedTCP := func() route.Machine {
				m := tcpMachine("m1", "demo", on, b.addr, route.HandlerTCP, 0)
				m.Started, m.Stopped = false, true
				for i := range m.Services {
					m.Services[i].Autostart = true
				}
				return m
			}
			var edge, far *Proxy
			var mu sync.Mutex // the machine's state, as its host changes it
			ms := []route.Machine{parkedTCP()}
			var backhaul map[string]string
			publish := func(edit func(*route.Machine)) {
				mu.Lock()
				defer mu.Unlock()
				edit(&ms[0])
				edge.setState(route.Facts{Self: "ams-1", Region: "ams", Hosts: testHosts, Machines: ms}, backhaul)
				far.setState(route.Facts{Self: "fra-1", Region: "fra", Hosts: testHosts, Machines: ms}, backhaul)
			}
			starts := make(chan string, 4)
			start := func(ctx context.Context, app, id string) error {
				starts <- app + "/" + id
				go func() {
					// Started, then healthy a moment later, as a booting
					// machine goes.
					publish(func(m *route.Machine) { m.Started, m.Stopped, m.Healthy = true, false, false })
					time.Sleep(50 * time.Millisecond)
					publish(func(m *route.Machine) { m.Healthy = true })
				}()
				return nil
			}
			edge = startProxy(t, Config{HostID: "ams-1", TCPPorts: tcpRange, ListenTCP: tcpListen, Start: start})
			far = startProxy(t, Config{HostID: "fra-1", Start: start})
			backhaul = map[string]string{"fra-1": far.BackhaulAddr()}
			publish(func(*route.Machine) {})
			c, br, greeting := dialTCPEdge(t, edge)
			if greeting != "echo" {
				t.Fatalf("greeting %q: the connection was not held for the start", greeting)
			}
			echo(t, c, br, "echo")
			if got := <-starts; got != "demo/m1" {
				t.Errorf("started %s", got)
			}
			if len(starts) != 0 {
				t.Errorf("started more than once")
			}
		})
	}
}
