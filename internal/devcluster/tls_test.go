package devcluster

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/host"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestHTTPSEdges: with EdgeTLSAddr every region's edge serves HTTPS with
// the cluster's local CA (its certificate on disk for clients), HTTP/1.1
// and HTTP/2; force_https on port 80 sends a client to its region's HTTPS
// listener.
func TestHTTPSEdges(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{Regions: []string{"ams", "iad"}, HostsPerRegion: 1, EdgeTLSAddr: "127.0.0.1:0"}, nil)
	if _, err := os.Stat(c.CAPath()); err != nil {
		t.Fatalf("the CA's certificate: %v", err)
	}
	port := freePort(t)
	ams := c.Hosts[0]
	if ams.EdgeTLSAddr == "" || c.Hosts[1].EdgeTLSAddr == "" {
		t.Fatalf("HTTPS edges: %q %q", ams.EdgeTLSAddr, c.Hosts[1].EdgeTLSAddr)
	}
	_, err := api.NewClient(ams.APIURL, "t").Create(ctx, "demo", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: host.DemoImage, Env: map[string]string{"PORT": strconv.Itoa(port)},
		Services: []api.MachineService{{
			Protocol: "tcp", InternalPort: port,
			Ports: []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}, ForceHTTPS: true},
				{Port: ptr(443), Handlers: []string{"tls", "http"}}},
			Checks: []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
		}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the machine routable on 443", func() bool {
		tgs := ams.Proxy.Table().Targets("demo", 443)
		return len(tgs) == 1 && tgs[0].Excluded == route.Included
	})
	// Every name resolves to loopback, as *.localhost does for curl.
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		_, p, _ := net.SplitHostPort(addr)
		return (&net.Dialer{}).DialContext(ctx, network, net.JoinHostPort("127.0.0.1", p))
	}
	for _, h2 := range []bool{false, true} {
		tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: c.CA().Pool()}, ForceAttemptHTTP2: h2, DialContext: dial}
		if !h2 {
			tr.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
		}
		client := &http.Client{Transport: tr, Timeout: 30 * time.Second}
		// Plain HTTP first: redirected to this region's HTTPS edge, followed.
		resp, err := client.Get("http://demo.localhost:" + portOf(ams.EdgeAddr) + "/")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || resp.Request.URL.String() != "https://demo.localhost:"+portOf(ams.EdgeTLSAddr)+"/" || resp.TLS == nil {
			t.Fatalf("h2=%v: %d at %v: %s", h2, resp.StatusCode, resp.Request.URL, b)
		}
		if want := map[bool]int{false: 1, true: 2}[h2]; resp.ProtoMajor != want {
			t.Errorf("h2=%v: HTTP/%d", h2, resp.ProtoMajor)
		}
		var id struct {
			Env map[string]string `json:"env"`
		}
		if err := json.Unmarshal(b, &id); err != nil || id.Env["FLY_REGION"] != "ams" {
			t.Errorf("h2=%v: not the demo app's answer: %s", h2, b)
		}
	}
}

func portOf(addr string) string {
	_, p, _ := net.SplitHostPort(addr)
	return p
}
