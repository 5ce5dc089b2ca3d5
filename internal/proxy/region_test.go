package proxy

import (
	"fmt"
	"net"
	"net/http"
	"testing"

	"github.com/flamehq/flame/internal/proxy/route"
)

// TestRegionShedAndRecover: every machine of an app in the edge's region
// resets the requests it takes. The requests are served from the next region all along;
// once the region's breaker opens, they go there without trying the sick
// region first (whose machines' own breakers are still closed: no machine
// failed often enough alone). When the region heals, a trickle of probes
// closes its breaker after the backoff and the traffic comes home. Another
// app's traffic stays in the region all along.
func TestRegionShedAndRecover(t *testing.T) {
	rst, resets := startResetter(t)
	f1 := startBackend(t, "f1")
	d := newSwitchDialer(t)
	clock := newTestClock()
	edge := startProxy(t, Config{HostID: "ams-1", Now: clock.now, DialMachine: d.redirect(rst)})
	far := startProxy(t, Config{HostID: "fra-1"})
	backhaul := map[string]string{"ams-1": edge.BackhaulAddr(), "fra-1": far.BackhaulAddr()}
	// Six machines in ams, each its own healthy backend; while the region
	// is sick their connections go to the resetter.
	const n = 6
	// Another app's machine in ams is fine.
	o1 := startBackend(t, "o1")
	ms := []route.Machine{machine("f1", "fra-1", f1.addr), ofApp(machine("o1", "ams-1", o1.addr), "other", ""), ofApp(machine("o2", "fra-1", f1.addr), "other", "")}
	home := map[string]*backend{}
	for i := range n {
		b := startBackend(t, fmt.Sprint("a", i))
		home[b.name] = b
		ms = append(ms, machine(b.name, "ams-1", b.addr))
		d.set(b.addr.String(), true)
	}
	for _, p := range []*Proxy{edge, far} {
		p.setState(route.Facts{Self: p.cfg.HostID, Region: p.cfg.Region, Hosts: testHosts, Machines: ms}, backhaul)
	}
	ask := func() string {
		t.Helper()
		resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "demo.localhost", nil)
		if resp.StatusCode != 200 {
			t.Fatalf("%d %s", resp.StatusCode, body)
		}
		return decode(t, body).Machine
	}

	// Each request tries the six, then fra answers: after ⌈20/6⌉ requests
	// the region has failed RegionMinAttempts times.
	for i := range (route.RegionMinAttempts + n - 1) / n {
		if got := ask(); got != "f1" {
			t.Fatalf("request %d answered by %s", i, got)
		}
	}
	if st := edge.regions.state("demo", "ams"); st != route.RegionOpen {
		t.Fatalf("region breaker %v after %d resets", st, resets.Load())
	}
	for name := range home {
		if st, _ := edge.strikes.states(name, "ams-1"); st != stateClosed {
			t.Fatalf("machine %s's own breaker is %v: the test would not show the region's", name, st)
		}
	}
	// Another app's traffic stays in the region.
	if resp, body := get(t, http.DefaultClient, edge.EdgeAddr(), "other.localhost", nil); resp.StatusCode != 200 || decode(t, body).Machine != "o1" {
		t.Fatalf("another app: %d %s", resp.StatusCode, body)
	}
	before := resets.Load()
	for range 20 {
		if got := ask(); got != "f1" {
			t.Fatalf("shed region answered (%s)", got)
		}
	}
	if resets.Load() != before {
		t.Errorf("the shed region was tried %d times", resets.Load()-before)
	}

	// The region heals; it is still shed until the backoff ends.
	for _, b := range home {
		d.set(b.addr.String(), false)
	}
	if got := ask(); got != "f1" {
		t.Fatalf("healed but open: answered by %s", got)
	}
	clock.advance(route.RegionOpenBase)
	fromFra, homeRun := 0, 0
	for i := 0; homeRun < 20; i++ {
		if i == 50*route.RegionProbeEvery {
			t.Fatalf("traffic never came home: region %v", edge.regions.state("demo", "ams"))
		}
		if ask() == "f1" {
			fromFra++
			homeRun = 0
		} else {
			homeRun++
		}
	}
	if st := edge.regions.state("demo", "ams"); st != route.RegionClosed {
		t.Errorf("region breaker %v after the traffic came home", st)
	}
	if fromFra == 0 {
		t.Error("half-open sent everything home at once, not a trickle")
	}
	if resets.Load() != before {
		t.Error("the resetter was reached after the region healed")
	}
}

// redirect makes the switch dialer send the connections of a machine that
// is down to addr (a resetter) instead of refusing them.
func (d *switchDialer) redirect(addr *net.TCPAddr) DialFunc {
	d.refusing = addr.String()
	return d.dial
}
