package devcluster

import (
	"context"
	"log/slog"
	"net/http"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/driver"
	"github.com/flamehq/flame/internal/driver/fake"
)

// TestForgedMachineNeverServed: a member holding the gossip key (stolen)
// but never enrolled joins the dev cluster and publishes a machine of an
// app "payments" at its own address. No host and not the control plane
// believe it: the machine is in no view, no DNS answer and no edge route.
func TestForgedMachineNeverServed(t *testing.T) {
	c := startPlaneDev(t, []string{"ams"}, func(string) driver.Driver { return fake.New() })
	ctx := context.Background()
	h := c.Hosts[0]
	if _, err := c.Net.AddHost("mallory"); err != nil {
		t.Fatal(err)
	}
	tr, err := c.Net.Transport("mallory", 7946)
	if err != nil {
		t.Fatal(err)
	}
	mallory, err := cluster.New(cluster.Config{HostID: "mallory", Region: "ams", Transport: tr,
		GossipKeys: [][]byte{c.GossipKey()}, Logger: slog.New(slog.DiscardHandler),
		Capacity: cluster.Resources{CPUs: 1000, MemoryMB: 1 << 20}})
	if err != nil {
		t.Fatal(err)
	}
	if err := mallory.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mallory.Close() })
	if n, err := mallory.Join([]string{h.Cluster.GossipAddr()}); err != nil || n != 1 {
		t.Fatalf("the key holder could not join: %d, %v", n, err)
	}
	ip, _ := c.Net.HostIP("mallory")
	port := 80
	payments := cluster.Machine{ID: "payments01", App: "payments", Org: "personal", Region: "ams", State: "started",
		InstanceID: "01JPAYMENTS", PrivateIP: "fdaa:0:1::66", ProcessGroup: "app",
		Services: []cluster.Service{{Protocol: "tcp", InternalPort: 8080,
			Ports: []cluster.Port{{Port: port, Handlers: []string{"http"}}}}}}
	waitUntil(t, "the host to see the key holder as a member", func() bool { return h.Cluster.Snapshot().Host("mallory") != nil })
	before := h.Cluster.Stats()
	if err := mallory.Publish(cluster.HostFacts{Machines: []cluster.Machine{payments}}); err != nil {
		t.Fatal(err)
	}
	edge := &http.Client{Timeout: 5 * time.Second}
	for end := time.Now().Add(4 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		for _, m := range []*cluster.Cluster{h.Cluster, c.Plane.Cluster} {
			if s := m.Snapshot(); s.Machine(payments.ID) != nil || len(s.AppMachines("payments")) != 0 {
				t.Fatalf("%s believes the forged machine", s.Self)
			}
		}
		if r := query(t, h.DNSAddr, "payments.internal", mdns.TypeAAAA); len(r.Answer) != 0 {
			t.Fatalf("payments.internal answers %v (mallory is %s)", r.Answer, ip)
		}
		if r := query(t, h.DNSAddr, "vms.payments.internal", mdns.TypeTXT); len(r.Answer) != 0 {
			t.Fatalf("vms.payments.internal answers %v", r.Answer)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+h.EdgeAddr+"/", nil)
	req.Host = "payments.localhost"
	resp, err := edge.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode < 400 {
		t.Errorf("the edge served payments: %s", resp.Status)
	}
	if after := h.Cluster.Stats(); after.Unverified+after.Dropped == before.Unverified+before.Dropped {
		t.Error("the host refused nothing: the forged facts never reached it")
	}
}
