package host

import (
	"context"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"github.com/vishvananda/netns"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/mesh/layout"
	"github.com/flamehq/flame/internal/netsim"
)

// TestMachineDNS: a host with the sandbox driver answers its machines at
// fdaa::3, from its cluster's facts and for the asking machine's org: a
// query sent from a machine's network namespace (its address as the
// source) resolves its own app, not another org's.
func TestMachineDNS(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the sandbox driver needs root")
	}
	regAddr, _, digest := sleepImage(t)
	dataDir := t.TempDir()
	d, _, err := NewDriver(DriverConfig{Kind: DriverSandbox, DataDir: dataDir, Registry: regAddr, Index: 92})
	if err != nil {
		t.Fatalf("sandbox driver: %v", err)
	}
	nw := netsim.New(netsim.Config{Seed: 1})
	t.Cleanup(func() { nw.Close() })
	if _, err := nw.AddHost("ams-1"); err != nil {
		t.Fatal(err)
	}
	tr, err := nw.Transport("ams-1", 7946)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(Config{DataDir: dataDir, Region: "ams", Listener: ln, Token: "t", Driver: d,
		Cluster: cluster.Config{HostID: "ams-1", Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		h.DestroyMachines(context.Background())
		h.Close()
		h.Teardown()
	})
	ctx := context.Background()
	c := api.NewClient("http://"+h.Addr(), "t")
	ms := map[string]*api.Machine{}
	for _, app := range []string{"web", "secret"} {
		m, err := c.Create(ctx, app, api.LaunchMachineInput{Config: &api.MachineConfig{Image: "bench/sleep@" + digest}, Org: app + "-org"})
		if err != nil || m.State != api.StateStarted {
			t.Fatalf("create %s: %v %+v", app, err, m)
		}
		ms[app] = m
	}
	ask := func(name string) string {
		q := new(mdns.Msg)
		q.SetQuestion(name, mdns.TypeAAAA)
		var out string
		inMachine(t, ms["web"].ID, func() {
			r, _, err := (&mdns.Client{Net: "udp", Timeout: 2 * time.Second}).Exchange(q, netip.AddrPortFrom(layout.DNS, 53).String())
			if err != nil {
				out = "error: " + err.Error()
				return
			}
			out = mdns.RcodeToString[r.Rcode]
			for _, rr := range r.Answer {
				if a, ok := rr.(*mdns.AAAA); ok {
					out += " " + a.AAAA.String()
				}
			}
		})
		return out
	}
	// The host's facts take a moment to hold the machine: a bounded wait.
	want := "NOERROR " + ms["web"].PrivateIP
	deadline := time.Now().Add(20 * time.Second)
	got := ask("web.internal.")
	for got != want && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
		got = ask("web.internal.")
	}
	if got != want {
		t.Fatalf("web.internal from web's machine: %q, want %q", got, want)
	}
	if got := ask("secret.internal."); got != "NXDOMAIN" {
		t.Errorf("another org's secret.internal from web's machine: %q", got)
	}
}

// inMachine runs f on a thread in machine id's network namespace.
func inMachine(t *testing.T, id string, f func()) {
	t.Helper()
	pid := initPid(t, id)
	ns, err := netns.GetFromPath("/proc/" + strconv.Itoa(pid) + "/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		if err := netns.Set(ns); err != nil {
			t.Error(err)
			return
		}
		f()
	}()
	<-done
}
