package devcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/flamehq/flame/api"
	"github.com/flamehq/flame/internal/cluster"
	"github.com/flamehq/flame/internal/geo"
	"github.com/flamehq/flame/internal/proxy/route"
)

// TestGlobalEntryNearestEdge: the global entry hands a request to the edge
// nearest to its client — the ams edge for a client in ams (the default),
// syd's for one that says it is in syd, syd's for one in nrt (no edge
// there) — paying at least the round trip from the client's region to that
// edge on the simulated network; an unknown region is refused with 400
// naming the known ones. The regions endpoint lists every edge and the
// global entry.
func TestGlobalEntryNearestEdge(t *testing.T) {
	ctx := context.Background()
	c := startExecCluster(t, Config{HostsPerRegion: 1,
		Cluster:      cluster.Config{Capacity: cluster.Resources{CPUs: 16, MemoryMB: 16 * 1024}},
		ControlPlane: true,
	}, map[string]string{upgraderImage: "echo-upgrader"})
	if c.GlobalAddr == "" {
		t.Fatal("no global entry")
	}

	// The regions endpoint names every edge and the global entry.
	tok, err := c.Plane.AddOrg(ctx, "personal", "Personal")
	if err != nil {
		t.Fatal(err)
	}
	regs, err := api.NewClient(c.Plane.URL(), tok).Regions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	edges := c.Edges()
	if regs.Global != c.GlobalAddr || len(regs.Regions) != len(edges) {
		t.Fatalf("regions %+v, want global %s and %d regions", regs, c.GlobalAddr, len(edges))
	}
	for _, r := range regs.Regions {
		if r.Edge == "" || r.Edge != edges[r.Code] {
			t.Errorf("region %s lists edge %q, want %q", r.Code, r.Edge, edges[r.Code])
		}
	}

	// One demo machine in each region, and an app "ws" whose one machine,
	// in syd, switches protocols and echoes.
	syd := c.Hosts[len(c.Hosts)-1]
	wsPort := freePort(t)
	if _, err := c.HostClient(syd).Create(ctx, "ws", api.LaunchMachineInput{Config: &api.MachineConfig{
		Image: upgraderImage, Env: map[string]string{"PORT": strconv.Itoa(wsPort)},
		Services: []api.MachineService{{
			Protocol: "tcp", InternalPort: wsPort,
			Ports:  []api.MachinePort{{Port: ptr(80), Handlers: []string{"http"}}},
			Checks: []api.MachineServiceCheck{{Type: ptr("tcp"), Interval: api.Dur(100 * time.Millisecond)}},
		}},
	}}); err != nil {
		t.Fatalf("create ws on %s: %v", syd.ID, err)
	}
	machines := map[string]string{} // id → region
	for _, h := range c.Hosts {
		port := freePort(t)
		m, err := c.HostClient(h).Create(ctx, "demo", api.LaunchMachineInput{Config: demoConfig(port)})
		if err != nil {
			t.Fatalf("create on %s: %v", h.ID, err)
		}
		machines[m.ID] = h.Region
	}
	for _, h := range c.Hosts {
		seen := ""
		defer func() {
			if t.Failed() && seen != "" {
				t.Logf("the %s edge's table last held: %s", h.Region, seen)
			}
		}()
		waitUntil(t, "every machine routable at the "+h.Region+" edge", func() bool {
			n := 0
			seen = ""
			for _, tg := range h.Proxy.Table().Targets("demo", 80) {
				seen += fmt.Sprintf("%s on %s: %s; ", tg.MachineID, tg.Host, tg.Excluded)
				if tg.Excluded == route.Included {
					n++
				}
			}
			return n == 3
		})
	}

	client := &http.Client{Timeout: 30 * time.Second}
	ask := func(clientRegion string) (status int, region string, body string, took time.Duration) {
		t.Helper()
		req, _ := http.NewRequest("GET", "http://"+c.GlobalAddr+"/", nil)
		req.Host = "demo.localhost"
		if clientRegion != "" {
			req.Header.Set(ClientRegionHeader, clientRegion)
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("request at the global entry (client in %q): %v", clientRegion, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		took = time.Since(start)
		if resp.StatusCode != 200 {
			return resp.StatusCode, "", string(b), took
		}
		var id struct {
			Env map[string]string `json:"env"`
		}
		if err := json.Unmarshal(b, &id); err != nil {
			t.Fatalf("not the demo app's answer: %s", b)
		}
		if got := machines[id.Env["FLY_MACHINE_ID"]]; got == "" || got != id.Env["FLY_REGION"] {
			t.Fatalf("answer from an unknown machine: %s", b)
		}
		return 200, id.Env["FLY_REGION"], string(b), took
	}
	for _, tc := range []struct{ client, edge, answer string }{
		{"", "ams", "ams"},    // the default client region, the first
		{"syd", "syd", "syd"}, // the header moves the client
		{"SYD", "syd", "syd"},
		{"nrt", "syd", "syd"}, // no edge in nrt: syd's is nearest
		{"lhr", "ams", "ams"},
		{"ams", "ams", "ams"},
	} {
		from := tc.client
		if from == "" {
			from = "ams"
		}
		// Each request pays at least one round trip from the client to
		// its edge (the request there, the answer back).
		floor := geo.RTT(mustRegion(t, strings.ToLower(from)), mustRegion(t, tc.edge))
		for i := range 3 {
			status, region, body, took := ask(tc.client)
			if status != 200 || region != tc.answer {
				t.Fatalf("client %q, request %d: %d from %q (%s), want 200 from %s", tc.client, i, status, region, body, tc.answer)
			}
			if i == 0 {
				t.Logf("client %q: answered from %s through the %s edge in %v (round trip to it %v)", tc.client, region, tc.edge, took, floor)
			}
			if took < floor {
				t.Errorf("client %q, request %d: answered in %v, under the round trip of %v to the %s edge", tc.client, i, took, floor, tc.edge)
			}
		}
	}
	checkEntryNamesClient(t, c.GlobalAddr)

	// An upgrade passes through the entry and the edge both ways: a
	// client in ams reaches the ws machine in syd.
	waitUntil(t, "the ws machine routable at the ams edge", func() bool {
		tg := c.Hosts[0].Proxy.Table().Targets("ws", 80)
		return len(tg) == 1 && tg[0].Excluded == route.Included
	})
	conn, err := net.DialTimeout("tcp", c.GlobalAddr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: ws.localhost\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade through the global entry: %v %v", resp, err)
	}
	for _, msg := range []string{"hello\n", "again\n"} {
		io.WriteString(conn, msg)
		if got, err := br.ReadString('\n'); err != nil || got != msg {
			t.Fatalf("echo through the upgraded connection: %q %v, want %q", got, err, msg)
		}
	}

	for _, bad := range []string{"xyz", "ams,syd", strings.Repeat("a", 4000)} {
		status, _, body, _ := ask(bad)
		if status != http.StatusBadRequest || !strings.Contains(body, "known regions are") || !strings.Contains(body, "syd") {
			t.Errorf("client region %.20q: %d %s, want 400 naming the known regions", bad, status, body)
		}
	}
}

// upgraderImage is the image of a machine that switches any request asking
// for "Upgrade: echo" to echoing what it reads.
const upgraderImage = "flame/echo-upgrader"

// runEchoUpgrader serves upgraderImage on $PORT until killed.
func runEchoUpgrader() {
	err := http.ListenAndServe("127.0.0.1:"+os.Getenv("PORT"), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		io.WriteString(conn, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		io.Copy(conn, brw)
	}))
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

// checkEntryNamesClient: a client at 127.0.0.2 (the entry's hop to the edge
// comes from elsewhere) that forges Fly-Client-IP and X-Forwarded-For
// reaches the demo machine through the global entry, near and far: the
// machine is told the client's own address, and not the forged ones.
func checkEntryNamesClient(t *testing.T, global string) {
	t.Helper()
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext}}
	defer client.CloseIdleConnections()
	for _, from := range []string{"ams", "syd", "ams"} {
		req, _ := http.NewRequest("GET", "http://"+global+"/", nil)
		req.Host = "demo.localhost"
		req.Header.Set(ClientRegionHeader, from)
		req.Header.Set("Fly-Client-IP", "6.6.6.6")
		req.Header.Set("X-Forwarded-For", "6.6.6.6")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("from 127.0.0.2 in %s: %v", from, err)
		}
		var id struct {
			Request struct {
				Headers map[string]string `json:"headers"`
			} `json:"request"`
		}
		err = json.NewDecoder(resp.Body).Decode(&id)
		resp.Body.Close()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("from 127.0.0.2 in %s: %d %v", from, resp.StatusCode, err)
		}
		h := id.Request.Headers
		if h["Fly-Client-Ip"] != "127.0.0.2" || h["X-Forwarded-For"] != "127.0.0.2" {
			t.Errorf("client at 127.0.0.2 in %s, forging 6.6.6.6: the machine saw Fly-Client-IP %q, X-Forwarded-For %q; want 127.0.0.2 for both",
				from, h["Fly-Client-Ip"], h["X-Forwarded-For"])
		}
	}
}
